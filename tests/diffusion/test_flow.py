"""Rectified flow: grids and samplers against diffusers' schedulers step by step, the exact Gaussian velocity field,
training σ draws, and the shift functions."""

import math

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.training_utils import compute_density_for_timestep_sampling

from dit.config import DiffusionConfig
from dit.diffusion.flow import (
    dynamic_mu,
    flow_sigmas,
    flow_solver_grid,
    flow_unipc_grid,
    latent_tokens,
    sample_sigmas,
    sampling_shift,
    shift_sigmas,
    time_shift,
)
from dit.diffusion.samplers import flow_dpm_solver, flow_euler, flow_unipc

SHIFTS = {"shift1": dict(shift=1.0), "shift3": dict(shift=3.0), "dynamic": dict(mu=dynamic_mu(1024))}


def make_velocity(seed: int = 0):
    """A fixed nonlinear model that depends on t: x0_hat = tanh((w1 x + w2 roll(x)) (1 + σ)), returned as the velocity
    (x - x0_hat) / σ consistent with it (x = (1 - σ) x0 + σ ε, v = ε - x0). Bounded x0_hat keeps trajectories O(1)."""
    w1, w2 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.dtype.is_floating_point and t.shape == (x.shape[0],)
        s = (t / 1000).reshape(-1, 1, 1, 1)
        x0 = torch.tanh((w1 * x + w2 * x.roll(1, dims=-1)) * (1 + s))
        return (x - x0) / s

    return fn


def noise(b: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def reference(scheduler, fn, x: torch.Tensor, steps: int, mu: float | None) -> list[torch.Tensor]:
    """Drive a diffusers scheduler with fn as its pipelines do; every intermediate sample."""
    scheduler.set_timesteps(steps, mu=mu)
    xs = []
    for t in scheduler.timesteps:
        x = scheduler.step(fn(x, t.expand(x.shape[0]).float()), t, x).prev_sample
        xs.append(x)
    return xs


def collect(sampler, fn, x: torch.Tensor, steps: int, **kwargs) -> list[torch.Tensor]:
    xs: list[torch.Tensor] = []
    final = sampler(fn, x, steps=steps, callback=lambda i, y: xs.append(y), **kwargs)
    assert torch.equal(final, xs[-1]) and len(xs) == steps
    return xs


# ---- grids -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2, 7, 28, 50])
@pytest.mark.parametrize("kind", SHIFTS)
def test_flow_sigmas_are_diffusers_euler_grid(kind, steps):
    kw = SHIFTS[kind]
    sch = FlowMatchEulerDiscreteScheduler(shift=kw.get("shift", 1.0), use_dynamic_shifting="mu" in kw)
    sch.set_timesteps(steps, mu=kw.get("mu"))
    ours = flow_sigmas(steps, **kw)
    assert ours.dtype == torch.float32 and ours.shape == (steps + 1,)
    assert torch.equal(ours, sch.sigmas)  # bit for bit
    assert ours[0] == 1 and ours[-1] == 0


@pytest.mark.parametrize("steps", [2, 5, 40])
@pytest.mark.parametrize("kind", ["ltx", "stretch"])
def test_flow_sigmas_ltx_grid_and_shift_terminal_are_diffusers(kind, steps):
    """LTXPipeline passes sigmas=linspace(1, 1/N, N) to a dynamic-shift scheduler with shift_terminal 0.1; a static
    shift with a terminal uses the table grid."""
    from diffusers.pipelines.ltx.pipeline_ltx import calculate_shift

    if kind == "ltx":
        sch = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift_terminal=0.1)
        mu = calculate_shift(3 * 4 * 6, 1024, 4096, 0.95, 2.05)
        sch.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        ours = flow_sigmas(steps, mu=mu, terminal=0.1, grid="steps")
    else:
        sch = FlowMatchEulerDiscreteScheduler(shift=3.0, shift_terminal=0.2)
        sch.set_timesteps(steps)
        ours = flow_sigmas(steps, shift=3.0, terminal=0.2)
    torch.testing.assert_close(ours, sch.sigmas, atol=1e-6, rtol=0)
    assert ours[-2].item() == pytest.approx(0.1 if kind == "ltx" else 0.2, abs=1e-6)


def test_flow_sigmas_one_step_grid_is_not_stretched():
    """One level (σ = 1) cannot be stretched to a terminal (diffusers divides 0 by 0 there): one Euler step to 0."""
    assert torch.equal(flow_sigmas(1, mu=1.0, terminal=0.1, grid="steps"), torch.tensor([1.0, 0.0]))


def test_flow_sigmas_static_shift_applies_twice_to_the_last_level_as_diffusers():
    """diffusers shifts its training table, then the grid between the table's ends again:
    σ_min = shift(shift(1/1000))."""
    sigmas = flow_sigmas(10, shift=3.0).double()
    assert sigmas[-2].item() == pytest.approx(shift_sigmas(shift_sigmas(1e-3, 3.0), 3.0), rel=1e-6)
    assert flow_sigmas(10)[-2].item() == pytest.approx(1e-3, rel=1e-6)


@pytest.mark.parametrize("steps", [1, 2, 10, 50])
@pytest.mark.parametrize("kind", SHIFTS)
def test_flow_solver_grid_is_diffusers_dpm_solver_grid(kind, steps):
    kw = SHIFTS[kind]
    sch = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                      flow_shift=kw.get("shift", 1.0), use_dynamic_shifting="mu" in kw)
    sch.set_timesteps(steps, mu=kw.get("mu"))
    sigmas, timesteps = flow_solver_grid(steps, **kw)
    assert torch.equal(sigmas, sch.sigmas) and torch.equal(timesteps, sch.timesteps)


def unipc(kw: dict) -> UniPCMultistepScheduler:
    """WanPipeline's scheduler (its scheduler_config: order 2, bh2, flow prediction), at this shift."""
    return UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", num_train_timesteps=1000,
                                   flow_shift=kw.get("shift", 1.0), use_dynamic_shifting="mu" in kw)


@pytest.mark.parametrize("steps", [1, 2, 10, 50])
@pytest.mark.parametrize("kind", SHIFTS)
def test_flow_unipc_grid_is_diffusers_unipc_grid(kind, steps):
    kw = SHIFTS[kind]
    sch = unipc(kw)
    sch.set_timesteps(steps, mu=kw.get("mu"))
    sigmas, timesteps = flow_unipc_grid(steps, **kw)
    assert torch.equal(sigmas, sch.sigmas) and torch.equal(timesteps, sch.timesteps)
    assert sigmas[0] < 1  # (moved off 1: the log-SNR stays finite)


def test_grids_refuse_both_shift_and_mu():
    for grid in (flow_sigmas, flow_solver_grid, flow_unipc_grid):
        with pytest.raises(ValueError, match="not both"):
            grid(10, shift=3.0, mu=0.5)
        with pytest.raises(ValueError, match="steps"):
            grid(0)


# ---- samplers against diffusers, step by step --------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 4, 30])
@pytest.mark.parametrize("kind", SHIFTS)
def test_flow_euler_matches_diffusers_every_step(kind, steps):
    kw = SHIFTS[kind]
    fn, x = make_velocity(), noise()
    sch = FlowMatchEulerDiscreteScheduler(shift=kw.get("shift", 1.0), use_dynamic_shifting="mu" in kw)
    ref = reference(sch, fn, x, steps, kw.get("mu"))
    ours = collect(flow_euler, fn, x, steps, **kw)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("steps", [1, 2, 4, 30])
@pytest.mark.parametrize("kind", SHIFTS)
def test_flow_dpm_solver_matches_diffusers_every_step(kind, steps):
    kw = SHIFTS[kind]
    fn, x = make_velocity(), noise()
    sch = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                      flow_shift=kw.get("shift", 1.0), use_dynamic_shifting="mu" in kw)
    ref = reference(sch, fn, x, steps, kw.get("mu"))
    ours = collect(flow_dpm_solver, fn, x, steps, **kw)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 30])
@pytest.mark.parametrize("kind", SHIFTS)
def test_flow_unipc_matches_diffusers_every_step(kind, steps):
    """Predictor and corrector of every order diffusers runs (1 at the ends, 2 between; the corrector's order is the
    last predictor's), step by step against WanPipeline's scheduler."""
    kw = SHIFTS[kind]
    fn, x = make_velocity(), noise()
    ref = reference(unipc(kw), fn, x, steps, kw.get("mu"))
    ours = collect(flow_unipc, fn, x, steps, **kw)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_flow_unipc_is_not_dpm_solver():
    """Its own multistep formula and corrector: on the same model it ends elsewhere than DPM-Solver++(2M)."""
    fn, x = make_velocity(), noise()
    a, b = flow_unipc(fn, x, steps=10, shift=3.0), flow_dpm_solver(fn, x, steps=10, shift=3.0)
    assert (a - b).abs().max() > 1e-3


def test_flow_dpm_solver_is_not_euler():
    """The second-order correction is live: after step 2 the two samplers differ on the same model."""
    fn, x = make_velocity(), noise()
    euler, dpm = flow_euler(fn, x, steps=10), flow_dpm_solver(fn, x, steps=10)
    assert (euler - dpm).abs().max() > 1e-3


def test_flow_samplers_keep_the_dtype_and_pass_float_timesteps():
    seen = []

    def fn(x, t):
        seen.append((x.dtype, t.dtype, t.shape))
        return torch.zeros_like(x)

    x = noise().to(torch.bfloat16)
    for sampler in (flow_euler, flow_dpm_solver):
        assert sampler(fn, x, steps=3).dtype == torch.bfloat16
    assert set(seen) == {(torch.bfloat16, torch.float32, (2,))}


# ---- the exact velocity of Gaussian data -------------------------------------------------------------------------

MEAN, STD = 1.0, 0.25  # data N(MEAN, STD^2) per element


def gaussian_velocity(m: float, s: float):
    """E[ε - x0 | x_t] for x0 ~ N(m, s²), ε ~ N(0, 1), x_t = a x0 + σ ε (a = 1 - σ): affine in x_t,
    -m + (σ - a s²) / (a² s² + σ²) (x_t - a m)."""

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = (t.double() / 1000).reshape(-1, *[1] * (x.ndim - 1))
        a = 1 - sigma
        return (-m + (sigma - a * s * s) / (a * a * s * s + sigma * sigma) * (x.double() - a * m)).to(x.dtype)

    return fn


def standard_noise(n: int = 20000) -> torch.Tensor:
    """Noise with sample mean exactly 0 and std exactly 1: the samplers are affine on this field, so the output's mean
    and std are the sampler's own (no Monte Carlo error)."""
    z = torch.randn(1, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return ((z - z.mean()) / z.std(unbiased=False)).float()


def moments(sampler, steps: int, **kwargs) -> tuple[float, float]:
    """Relative errors of the sampled mean and std."""
    x = sampler(gaussian_velocity(MEAN, STD), standard_noise(), steps=steps, **kwargs).double()
    return x.mean().item() / MEAN - 1, x.std(unbiased=False).item() / STD - 1


def test_gaussian_velocity_is_exact_at_the_ends():
    """σ = 1: v = x - m (from pure noise, E[x0] = m); σ = 0: v = -x (E[ε] = 0 given x0 = x)."""
    x = torch.linspace(-2, 2, 5).reshape(5, 1)
    fn = gaussian_velocity(MEAN, STD)
    torch.testing.assert_close(fn(x, torch.full((5,), 1000.0)), x - MEAN)
    torch.testing.assert_close(fn(x, torch.zeros(5)), -x)


@pytest.mark.parametrize(("shift", "golden"), [(1.0, (-0.00217, -0.04313)), (3.0, (-0.00565, -0.09822))])
def test_flow_euler_reproduces_gaussian_data(shift, golden):
    """Data N(1, 0.25²): the mean is exact (Euler integrates its constant part exactly); the std comes out low, by
    0.22% over 1000 steps and 4.3% over 50 at shift 1 (the issue's bounds: 2% and 8%), and 0.57% / 9.8% at shift 3
    (which spends its steps at high noise, where this narrow data needs few). diffusers' FlowMatchEulerDiscreteScheduler
    gives the same figures (its steps equal these, test above)."""
    for steps, std_golden in zip((1000, 50), golden, strict=True):
        mean_err, std_err = moments(flow_euler, steps, shift=shift)
        assert abs(mean_err) < 1e-5
        assert std_err == pytest.approx(std_golden, abs=2e-4)
    if shift == 1.0:
        assert abs(moments(flow_euler, 1000)[1]) < 0.02 and abs(moments(flow_euler, 50)[1]) < 0.08


def test_flow_dpm_solver_reproduces_gaussian_data_in_fewer_steps():
    """Second order: 20 steps land closer than Euler's 50 (shift 1: std +0.52% vs -4.3%; mean +0.02%, not exact since
    diffusers' grid starts at σ = 0.999 from pure noise)."""
    mean_err, std_err = moments(flow_dpm_solver, 20)
    assert abs(mean_err) < 0.001 and abs(std_err) < 0.01
    assert abs(std_err) < abs(moments(flow_euler, 50)[1]) / 4


# ---- training σ draws ----------------------------------------------------------------------------------------------


def draw(n: int = 20000, seed: int = 0, num_tokens: int | None = None, **cfg) -> torch.Tensor:
    return sample_sigmas(n, torch.Generator().manual_seed(seed), DiffusionConfig(objective="flow", **cfg), num_tokens)


@pytest.mark.parametrize("kind", ["uniform", "logit_normal", "mode"])
def test_sample_sigmas_are_diffusers_sd3_draws_before_the_shift(kind):
    """Unshifted, the draws are diffusers' compute_density_for_timestep_sampling on the same generator, bit for bit."""
    ours = draw(64, timestep_sampling=kind)
    ref = compute_density_for_timestep_sampling(kind if kind != "uniform" else "none", 64, logit_mean=0.0,
                                                logit_std=1.0, mode_scale=1.29,
                                                generator=torch.Generator().manual_seed(0))
    assert ours.dtype == torch.float32 and torch.equal(ours, ref)


def test_sample_sigmas_distributions():
    uniform, logit, mode = (draw(timestep_sampling=k) for k in ("uniform", "logit_normal", "mode"))
    for s in (uniform, logit, mode):
        assert s.shape == (20000,) and 0 <= s.min() and s.max() <= 1
    assert uniform.mean().item() == pytest.approx(0.5, abs=0.01)
    assert uniform.std().item() == pytest.approx(math.sqrt(1 / 12), abs=0.01)
    assert logit.median().item() == pytest.approx(0.5, abs=0.01)
    assert ((logit > 0.2) & (logit < 0.8)).float().mean() > ((uniform > 0.2) & (uniform < 0.8)).float().mean() + 0.1
    assert mode.median().item() == pytest.approx(0.5, abs=0.01)  # symmetric around 1/2, heavier in the middle
    assert ((mode > 0.3) & (mode < 0.7)).float().mean() > ((uniform > 0.3) & (uniform < 0.7)).float().mean() + 0.05
    moved = draw(timestep_sampling="logit_normal", logit_mean=1.0, logit_std=0.5)
    assert moved.median().item() == pytest.approx(1 / (1 + math.exp(-1)), abs=0.01)  # sigmoid(logit_mean)
    assert moved.logit().std().item() == pytest.approx(0.5, abs=0.01)


def test_sample_sigmas_shift_moves_mass_to_noise():
    plain, shifted = draw(), draw(shift=3.0)
    assert torch.allclose(shifted, shift_sigmas(plain, 3.0))  # the same draws, shifted
    assert shifted.median().item() == pytest.approx(0.75, abs=0.01)  # shift(0.5) = 3/4
    assert (shifted >= plain).all() and shifted.mean() > plain.mean() + 0.15


def test_sample_sigmas_dynamic_shift_grows_with_tokens():
    small, large = draw(num_tokens=256, dynamic_shift=True), draw(num_tokens=4096, dynamic_shift=True)
    torch.testing.assert_close(small, time_shift(0.5, draw()))  # mu = base_shift at base_seq_len
    torch.testing.assert_close(large, shift_sigmas(draw(), math.exp(1.15)))  # mu = max_shift: shift e^1.15
    assert large.mean() > small.mean() + 0.05
    with pytest.raises(ValueError, match="num_tokens"):
        draw(dynamic_shift=True)


def test_sample_sigmas_are_deterministic_given_the_generator():
    assert torch.equal(draw(seed=3, timestep_sampling="logit_normal"), draw(seed=3, timestep_sampling="logit_normal"))
    assert not torch.equal(draw(seed=3), draw(seed=4))
    g = torch.Generator().manual_seed(0)
    first = sample_sigmas(8, g, DiffusionConfig(objective="flow"))
    assert not torch.equal(first, sample_sigmas(8, g, DiffusionConfig(objective="flow")))  # the generator advances


# ---- shift functions ------------------------------------------------------------------------------------------------


def test_shift_functions():
    sigma = np.linspace(0.01, 0.99, 7)
    assert shift_sigmas(0.0, 5.0) == 0 and shift_sigmas(1.0, 5.0) == 1
    np.testing.assert_allclose(shift_sigmas(sigma, 1.0), sigma)
    np.testing.assert_allclose(time_shift(math.log(3.0), sigma), shift_sigmas(sigma, 3.0))  # e^mu is a static shift
    for tokens in (64, 256, 1024, 4096, 8000):
        assert dynamic_mu(tokens) == pytest.approx(calculate_shift(tokens), abs=1e-12)
    assert dynamic_mu(256) == pytest.approx(0.5) and dynamic_mu(4096) == pytest.approx(1.15)
    assert dynamic_mu(1000, 1.0, 3.0, 100, 1100) == pytest.approx(2.8)


def test_latent_tokens_and_sampling_shift():
    assert latent_tokens((5, 16, 32), (1, 2, 2)) == 5 * 8 * 16
    assert latent_tokens(torch.Size([2, 4, 3, 8, 8]), (1, 4, 4)) == 3 * 2 * 2
    static = DiffusionConfig(objective="flow", shift=3.0)
    dynamic = DiffusionConfig(objective="flow", dynamic_shift=True)
    assert sampling_shift(static, 1024) == (3.0, None)
    assert sampling_shift(dynamic, 1024) == (1.0, pytest.approx(dynamic_mu(1024)))
    assert sampling_shift(dynamic, 1024, 5.0) == (5.0, None)  # sample.shift wins


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal", "mode"])
@pytest.mark.parametrize("shift", [dict(shift=5.0), dict(dynamic_shift=True)])
def test_sigma_range_draws_the_same_law_restricted(sampling: str, shift: dict) -> None:
    """diffusion.sigma_min / sigma_max (one Wan 2.2 A14B expert's noise levels): every draw is in the range, and its
    quantiles are those of the unrestricted law's draws that fall there (as rejecting the others would give)."""
    from dit.config import DiffusionConfig

    full = sample_sigmas(400_000, torch.Generator().manual_seed(0),
                         DiffusionConfig(objective="flow", timestep_sampling=sampling, **shift), 4000)
    q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
    for lo, hi in [(0.875, 1.0), (0.0, 0.875), (0.3, 0.6)]:
        cfg = DiffusionConfig(objective="flow", timestep_sampling=sampling, sigma_min=lo, sigma_max=hi, **shift)
        got = sample_sigmas(20_000, torch.Generator().manual_seed(1), cfg, 4000)
        assert got.dtype == torch.float32 and got.min() >= lo and got.max() <= hi
        kept = full[(full >= lo) & (full <= hi)]
        torch.testing.assert_close(torch.quantile(got, q), torch.quantile(kept, q), atol=6e-3, rtol=0)
        if (sampling, lo) == ("logit_normal", 0.0):  # not merely uniform over the range
            assert (torch.quantile(lo + (hi - lo) * torch.rand(20_000), q) - torch.quantile(kept, q)).abs().max() > 0.05
