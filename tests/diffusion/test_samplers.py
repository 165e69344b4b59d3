"""Samplers: every intermediate step against diffusers' schedulers, and final samples against Gaussian data."""

import math

import pytest
import torch
from diffusers import CogVideoXDPMScheduler, DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from dit.diffusion.samplers import cogvideox_dpm, ddim, ddpm, dpm_solver
from dit.diffusion.schedules import make_schedule, spaced_timesteps

DIFFUSERS_PREDICTION = {"eps": "epsilon", "v": "v_prediction"}
SCHEDULES = {  # ours (make_schedule args) -> the same schedule in diffusers' config terms
    "linear": (dict(name="linear"), dict(beta_schedule="linear")),
    "cosine": (dict(name="cosine"), dict(beta_schedule="squaredcos_cap_v2")),
    "scaled_linear_zero_snr": (
        dict(name="scaled_linear", beta_start=0.00085, beta_end=0.012, zero_terminal_snr=True),
        dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True),
    ),
}


def make_denoiser(alphas_cumprod: torch.Tensor, prediction: str, seed: int = 0):
    """A fixed nonlinear model: x0_hat = tanh((w1 x + w2 roll(x)) (1 + t / T)), returned as the eps or v consistent
    with it. Predicting a bounded x0 keeps trajectories O(1), so absolute step differences mean what they say.
    (Elementwise on purpose: a tiny matmul costs milliseconds on a busy 2-core machine.)"""
    w1, w2 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    abar = alphas_cumprod.double()

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = abar[t].to(x.dtype).reshape(-1, 1, 1, 1)
        s = 1 + t.to(x.dtype).reshape(-1, 1, 1, 1) / len(abar)
        x0 = torch.tanh((w1.to(x.dtype) * x + w2.to(x.dtype) * x.roll(1, dims=-1)) * s)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return eps if prediction == "eps" else a.sqrt() * eps - (1 - a).sqrt() * x0

    return fn


def float64_tables(scheduler):
    """diffusers does its per-step coefficient arithmetic in float32 (1 - a_t / a_prev near t = 0 keeps ~3 digits);
    ours does it in float64 from the same float32 table. Upcasting diffusers' table (same values) makes both sides do
    the same arithmetic, so the comparison tests the algorithm. Unmodified float32 diffusers: see *_stock tests."""
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    if hasattr(scheduler, "final_alpha_cumprod"):
        scheduler.final_alpha_cumprod = scheduler.final_alpha_cumprod.double()
    if hasattr(scheduler, "one"):
        scheduler.one = scheduler.one.double()
    return scheduler


def reference(scheduler, fn, noise, steps, generator=None, **step_kwargs) -> list[torch.Tensor]:
    scheduler.set_timesteps(steps)
    x, xs = noise.clone(), []
    for t in scheduler.timesteps:
        x = scheduler.step(fn(x, t.expand(x.shape[0])), t, x, generator=generator, **step_kwargs).prev_sample
        xs.append(x)
    return xs


def ours(sampler, fn, noise, schedule, **kwargs) -> list[torch.Tensor]:
    xs = []
    out = sampler(fn, noise.clone(), schedule, callback=lambda i, x: xs.append(x), **kwargs)
    assert torch.equal(out, xs[-1])
    return xs


def max_step_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b)
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def setup(schedule: str, prediction: str, dtype: torch.dtype):
    ours_kw, theirs_kw = SCHEDULES[schedule]
    sched = make_schedule(**ours_kw)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=dtype)
    return sched, dict(theirs_kw, prediction_type=DIFFUSERS_PREDICTION[prediction]), noise


def cases(schedules=tuple(SCHEDULES), skip=()):  # eps at zero terminal SNR is undefined at t = T-1 (diffusers: inf)
    return [(s, p) for s in schedules for p in ("eps", "v")
            if not (s.endswith("zero_snr") and p == "eps") and (s, p) not in skip]


# ---- DDIM ---------------------------------------------------------------------------------------------------------
# Measured, all cases (float64, diffusers' table upcast): max |diff| 7e-15 at any step; float32 stock: 7.9e-6.


@pytest.mark.parametrize("schedule,prediction", cases())
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_matches_diffusers(schedule, prediction, eta, spacing):
    if schedule.endswith("zero_snr") and eta > 0:
        pytest.skip("diffusers gives NaN here: sqrt(1 - a_prev - std^2) of a rounding-negative number at t = T-1")
    sched, cfg, noise = setup(schedule, prediction, torch.float64)
    fn = make_denoiser(sched.alphas_cumprod, prediction)
    ref = float64_tables(DDIMScheduler(clip_sample=False, timestep_spacing=spacing, **cfg))
    # eta = 1: both draw one normal tensor per step from identically seeded generators -> identical noise
    theirs = reference(ref, fn, noise, 50, generator=torch.Generator().manual_seed(7), eta=eta)
    mine = ours(ddim, fn, noise, sched, steps=50, eta=eta, prediction=prediction, timestep_spacing=spacing,
                generator=torch.Generator().manual_seed(7))
    assert max_step_diff(mine, theirs) <= 1e-10


def test_ddim_eta1_zero_terminal_snr_is_finite():
    sched, _, noise = setup("scaled_linear_zero_snr", "v", torch.float32)
    fn = make_denoiser(sched.alphas_cumprod, "v")
    xs = ours(ddim, fn, noise, sched, steps=50, eta=1.0, prediction="v", timestep_spacing="trailing")
    assert all(torch.isfinite(x).all() for x in xs)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddim_matches_diffusers_stock_float32(prediction):
    sched, cfg, noise = setup("linear", prediction, torch.float32)
    fn = make_denoiser(sched.alphas_cumprod, prediction)
    theirs = reference(DDIMScheduler(clip_sample=False, **cfg), fn, noise, 50)
    assert max_step_diff(ours(ddim, fn, noise, sched, steps=50, prediction=prediction), theirs) <= 1e-5


def test_ddim_clip_matches_diffusers_clipped_model_output():
    sched, cfg, noise = setup("linear", "eps", torch.float64)
    fn = make_denoiser(sched.alphas_cumprod, "eps")
    ref = float64_tables(DDIMScheduler(clip_sample=True, clip_sample_range=0.5, **cfg))
    theirs = reference(ref, fn, noise, 50, use_clipped_model_output=True)
    assert max_step_diff(ours(ddim, fn, noise, sched, steps=50, clip_x0=0.5), theirs) <= 1e-10
    assert max_step_diff(ours(ddim, fn, noise, sched, steps=50), theirs) > 1e-3  # the clip did bite


@pytest.mark.parametrize("spacing,steps", [("linspace", 50), ("trailing", 30), ("leading", 30)])
def test_ddim_eta1_equals_ddpm_for_any_spacing(spacing, steps):
    """DDIM with eta = 1 is DDPM's ancestral step. diffusers' DDPMScheduler steps to the next listed timestep for
    every spacing (its DDIMScheduler does only for "leading"), so this checks our linspace / uneven trailing."""
    sched, cfg, noise = setup("linear", "eps", torch.float64)
    fn = make_denoiser(sched.alphas_cumprod, "eps")
    ref = float64_tables(DDPMScheduler(clip_sample=False, timestep_spacing=spacing, **cfg))
    theirs = reference(ref, fn, noise, steps, generator=torch.Generator().manual_seed(3))
    mine = ours(ddim, fn, noise, sched, steps=steps, eta=1.0, timestep_spacing=spacing,
                generator=torch.Generator().manual_seed(3))
    assert max_step_diff(mine, theirs) <= 1e-8  # DDPM's variance floor of 1e-20 at the very last trailing step


# ---- DDPM ---------------------------------------------------------------------------------------------------------
# Measured (float64, upcast table): 2.1e-14 over all 1000 steps, 9e-16 over 50. Stock float32 diffusers drifts
# 1.1e-4 over 1000 steps and 1.04e-5 over 50 (its float32 beta_t = 1 - a_t / a_prev, ~4 digits near t = 0).


@pytest.mark.parametrize("schedule,prediction", cases(("linear", "scaled_linear_zero_snr")))
@pytest.mark.parametrize("steps", [None, 50])
def test_ddpm_matches_diffusers(schedule, prediction, steps):
    sched, cfg, noise = setup(schedule, prediction, torch.float64)
    fn = make_denoiser(sched.alphas_cumprod, prediction)
    ref = float64_tables(DDPMScheduler(clip_sample=False, **cfg))
    theirs = reference(ref, fn, noise, steps or 1000, generator=torch.Generator().manual_seed(5))
    mine = ours(ddpm, fn, noise, sched, steps=steps, prediction=prediction, generator=torch.Generator().manual_seed(5))
    assert len(mine) == (steps or 1000)
    assert max_step_diff(mine, theirs) <= 1e-10


def test_ddpm_matches_diffusers_stock_float32():  # measured 1.04e-5, see above
    sched, cfg, noise = setup("linear", "eps", torch.float32)
    fn = make_denoiser(sched.alphas_cumprod, "eps")
    ref = DDPMScheduler(clip_sample=False, **cfg)
    theirs = reference(ref, fn, noise, 50, generator=torch.Generator().manual_seed(5))
    mine = ours(ddpm, fn, noise, sched, steps=50, generator=torch.Generator().manual_seed(5))
    assert max_step_diff(mine, theirs) <= 5e-5


# ---- DPM-Solver++(2M) ---------------------------------------------------------------------------------------------
# diffusers' DPMSolverMultistepScheduler always computes in float32, so this compares float32 runs, stock.
# Not cosine + eps: at t = 999 its abar is 2.4e-9, and x0 = (x - sigma eps) / alpha cancels 1 - 6e-8 relative in
# float32 to a 1e-3 relative error in x0 on each side, independently: the runs differ by up to 7.5e-4 for that.
# Measured: 3.1e-6 at most (linear eps/v, cosine v, scaled-linear zero-SNR v; 10/25/50 steps, all spacings).


@pytest.mark.parametrize("schedule,prediction", cases(skip=[("cosine", "eps")]))
@pytest.mark.parametrize("steps,spacing", [(50, "linspace"), (10, "linspace"), (25, "leading"), (50, "trailing")])
def test_dpm_solver_matches_diffusers(schedule, prediction, steps, spacing):
    sched, cfg, noise = setup(schedule, prediction, torch.float32)
    fn = make_denoiser(sched.alphas_cumprod, prediction)
    theirs = reference(DPMSolverMultistepScheduler(timestep_spacing=spacing, **cfg), fn, noise, steps)
    mine = ours(dpm_solver, fn, noise, sched, steps=steps, prediction=prediction, timestep_spacing=spacing)
    assert max_step_diff(mine, theirs) <= 1e-5


# ---- CogVideoX's stochastic DPM-Solver++(2M) -----------------------------------------------------------------------


def cogvideox_reference(scheduler, fn, noise, steps, generator) -> list[torch.Tensor]:
    """CogVideoXDPMScheduler driven as CogVideoXPipeline drives it: the last x0 prediction and timestep passed back."""
    scheduler.set_timesteps(steps)
    ts, x, old, xs = scheduler.timesteps, noise.clone(), None, []
    for i, t in enumerate(ts):
        x, old = scheduler.step(fn(x, t.expand(x.shape[0])), old_pred_original_sample=old, timestep=t,
                                timestep_back=ts[i - 1] if i > 0 else None, sample=x, generator=generator,
                                return_dict=False)
        xs.append(x)
    return xs


@pytest.mark.parametrize("schedule,prediction,spacing,steps,snr_shift", [
    ("scaled_linear_zero_snr", "v", "trailing", 50, 1.0),  # CogVideoX-5B / 1.5's scheduler_config
    ("scaled_linear_zero_snr", "v", "trailing", 7, 3.0),  # (2B's SNR shift)
    ("linear", "eps", "leading", 25, 1.0),
    ("cosine", "v", "linspace", 20, 1.0),
])
def test_cogvideox_dpm_matches_diffusers_draw_for_draw(schedule, prediction, spacing, steps, snr_shift):
    """Every step, with both sides drawing from identically seeded generators (two draws where the second-order
    step replaces the first-order one): the same noise, so the same samples. diffusers' table is set to ours (in
    float64, as its scaled-linear one is; its step reads nothing else of the schedule), so both do the same
    arithmetic: measured equal bit for bit."""
    ours_kw, theirs_kw = SCHEDULES[schedule]
    sched = make_schedule(**ours_kw, snr_shift_scale=snr_shift)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    fn = make_denoiser(sched.alphas_cumprod, prediction)
    ref = CogVideoXDPMScheduler(**theirs_kw, prediction_type=DIFFUSERS_PREDICTION[prediction], snr_shift_scale=1.0,
                                timestep_spacing=spacing)
    ref.alphas_cumprod = sched.alphas_cumprod.double()
    theirs = cogvideox_reference(ref, fn, noise, steps, torch.Generator().manual_seed(7))
    mine = ours(cogvideox_dpm, fn, noise, sched, steps=steps, prediction=prediction, timestep_spacing=spacing,
                generator=torch.Generator().manual_seed(7))
    assert max_step_diff(mine, theirs) <= 1e-7
    other = cogvideox_dpm(fn, noise.clone(), sched, steps=steps, prediction=prediction, timestep_spacing=spacing,
                          generator=torch.Generator().manual_seed(8))  # stochastic: another seed, another sample
    assert (other - mine[-1]).abs().max() > 1e-3


def test_cogvideox_dpm_matches_stock_diffusers_at_cogvideox_5b_settings():
    """Unmodified: diffusers' float64 table against our float32 one (measured 1.6e-5 over 50 steps)."""
    ours_kw, theirs_kw = SCHEDULES["scaled_linear_zero_snr"]
    sched = make_schedule(**ours_kw)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    fn = make_denoiser(sched.alphas_cumprod, "v")
    ref = CogVideoXDPMScheduler(**theirs_kw, prediction_type="v_prediction", snr_shift_scale=1.0,
                                timestep_spacing="trailing")
    theirs = cogvideox_reference(ref, fn, noise, 50, torch.Generator().manual_seed(7))
    mine = ours(cogvideox_dpm, fn, noise, sched, steps=50, prediction="v", timestep_spacing="trailing",
                generator=torch.Generator().manual_seed(7))
    assert max_step_diff(mine, theirs) <= 5e-5


# ---- analytic: data ~ N(MU, S^2) per dimension, exact eps --------------------------------------------------------
MU, S = 0.5, 0.3


@pytest.fixture
def one_thread():
    """65,536-element float64 steps run ~50x slower with 2 intra-op threads on a busy 2-core CI box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def gaussian_eps(schedule):
    """E[eps | x_t] for x0 ~ N(MU, S^2): (x_t - sqrt(abar) MU) sqrt(1 - abar) / (abar S^2 + 1 - abar)."""
    abar = schedule.alphas_cumprod.double()

    def fn(x, t):
        a = abar[t].to(x.dtype).reshape(-1, *[1] * (x.ndim - 1))
        return (x - a.sqrt() * MU) * (1 - a).sqrt() / (a * S**2 + 1 - a)

    return fn


# Measured relative errors |mean - MU| / MU, |std - S| / S (65,536 samples, float64, seed 0):
#   linear: DDIM eta 0, 1000 steps 0.26%, 0.14% | eta 1, 1000 steps 0.26%, 1.71% | DDPM 1000 0.26%, 1.71%
#           DDIM eta 0, 50 steps 0.27%, 8.0%     | DPM-Solver++ 50 steps 0.25%, 1.6% | 20 steps 0.22%, 13.8%
#   cosine: DDIM eta 1, 50 steps 0.10%, 9.0%
# linear DDIM eta 1 at 50 steps is 15.7% narrow: see test_ancestral_std_matches_variance_recursion.
ANALYTIC = [
    ("linear", ddim, dict(steps=1000, eta=0.0), 0.02),
    ("linear", ddim, dict(steps=1000, eta=1.0), 0.02),
    ("linear", ddpm, dict(), 0.02),
    ("linear", ddim, dict(steps=50, eta=0.0), 0.15),
    ("cosine", ddim, dict(steps=50, eta=1.0), 0.15),
    ("linear", dpm_solver, dict(steps=50), 0.15),
    ("linear", dpm_solver, dict(steps=20), 0.15),
]


@pytest.mark.parametrize("schedule,sampler,kwargs,tol", ANALYTIC)
def test_samplers_recover_gaussian_data(schedule, sampler, kwargs, tol, one_thread):
    sched = make_schedule(schedule)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(16, 4096, generator=gen, dtype=torch.float64)
    if sampler is not dpm_solver:
        kwargs = dict(kwargs, generator=gen)
    x = sampler(gaussian_eps(sched), noise, sched, **kwargs)
    assert abs(x.mean().item() - MU) / MU <= tol
    assert abs(x.std().item() - S) / S <= tol


def test_ancestral_std_matches_variance_recursion(one_thread):
    """With few steps, ancestral sampling with DDPM's "fixed_small" posterior variance is too narrow for this data
    (a property of the method, Bao et al. 2022): the exact recursion var' = (dmean/dx)^2 var + sigma^2 predicts
    -15.7% for linear / 50 steps, and the sampler reproduces it."""
    sched = make_schedule("linear")
    abar, ts, var = sched.alphas_cumprod.tolist(), spaced_timesteps(1000, 50), 1.0
    for i, t in enumerate(ts):
        a, a_prev = abar[t], abar[ts[i + 1]] if i + 1 < len(ts) else 1.0
        dx0_dx = math.sqrt(a) * S**2 / (a * S**2 + 1 - a)
        beta = 1 - a / a_prev
        dmean_dx = math.sqrt(a_prev) * beta / (1 - a) * dx0_dx + math.sqrt(1 - beta) * (1 - a_prev) / (1 - a)
        var = dmean_dx**2 * var + (1 - a_prev) / (1 - a) * beta
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(16, 4096, generator=gen, dtype=torch.float64)
    x = ddim(gaussian_eps(sched), noise, sched, steps=50, eta=1.0, generator=gen)
    assert math.sqrt(var) / S - 1 == pytest.approx(-0.157, abs=0.002)
    assert x.std().item() == pytest.approx(math.sqrt(var), rel=0.01)
    assert x.mean().item() == pytest.approx(MU, rel=0.01)
