"""Samplers as pure functions of (denoise_fn, noise, schedule): DDIM, ancestral DDPM, DPM-Solver++(2M) and
CogVideoX's stochastic DPM-Solver++(2M); and for rectified flow, of (denoise_fn, noise, shift): flow_euler,
flow_dpm_solver and flow_unipc.

Diffusion samplers: `denoise_fn(x, t)` takes the current sample and integer timesteps t (LongTensor [B]) and returns
the model's prediction of kind `prediction` (eps | v | x0). Flow samplers: `denoise_fn(x, t)` takes float timesteps
t = σ·1000 (FloatTensor [B]) and returns the velocity ε - x0. `callback(i, x)` is called after step i with the
updated sample. Each sampler returns the final sample (x0). Step formulas and timestep lists follow diffusers'
DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, CogVideoXDPMScheduler, FlowMatchEulerDiscreteScheduler
and UniPCMultistepScheduler (tests/diffusion/test_samplers.py and test_flow.py check every step against them).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from dit.diffusion.flow import FLOW_TIMESTEPS, flow_sigmas, flow_solver_grid, flow_unipc_grid
from dit.diffusion.schedules import ZERO_SNR_ALPHA_CUMPROD, Schedule, convert_prediction, spaced_timesteps

DenoiseFn = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[int, Tensor], None] | None


def _timesteps_like(x: Tensor, t: int) -> Tensor:
    return torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)  # [B]


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Drawn on the generator's device, then moved (as diffusers' randn_tensor), so seeded runs match it."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


@torch.no_grad()
def ddim(denoise_fn: DenoiseFn, noise: Tensor, schedule: Schedule, *, steps: int, eta: float = 0.0,
         prediction: str = "eps", timestep_spacing: str = "leading", generator: torch.Generator | None = None,
         clip_x0: float | None = None, callback: Callback = None) -> Tensor:
    """DDIM (Song et al. 2021); eta=0 deterministic, eta=1 has DDPM's posterior variance.

    Steps from each timestep to the next one in the list (the last goes to abar = 1, diffusers' set_alpha_to_one).
    diffusers' DDIMScheduler instead steps to t - T // steps, which is the same for "leading" spacing (and
    "trailing" when steps divides T) but not for "linspace" (diffusers issue #12633). With clip_x0 the predicted x0
    is clamped and eps re-derived from it (diffusers' use_clipped_model_output=True). When eta > 0 a fresh
    normal tensor is drawn from `generator` at every step, as diffusers does.
    """
    ts = spaced_timesteps(schedule.num_timesteps, steps, timestep_spacing)
    abar = schedule.alphas_cumprod.tolist()
    x = noise
    for i, t in enumerate(ts):
        a_t, a_prev = abar[t], abar[ts[i + 1]] if i + 1 < len(ts) else 1.0
        tt = _timesteps_like(x, t)
        x0, eps = schedule.pred_to_x0_eps(denoise_fn(x, tt), x, tt, prediction)
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
            eps = schedule.x0_to_eps(x0, x, tt)
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        x = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps
        if eta > 0:
            x = x + sigma * _randn_like(x, generator)
        if callback is not None:
            callback(i, x)
    return x


@torch.no_grad()
def ddpm(denoise_fn: DenoiseFn, noise: Tensor, schedule: Schedule, *, steps: int | None = None,
         prediction: str = "eps", generator: torch.Generator | None = None, clip_x0: float | None = None,
         callback: Callback = None) -> Tensor:
    """Ancestral sampling from the DDPM posterior q(x_prev | x_t, x0_hat) with the "fixed_small" variance.

    steps=None uses all T timesteps; fewer use diffusers' "leading" spacing (jumping between the listed timesteps).
    Noise is drawn from `generator` at every step with t > 0, as diffusers' DDPMScheduler does.
    """
    ts = spaced_timesteps(schedule.num_timesteps, steps or schedule.num_timesteps, "leading")
    abar = schedule.alphas_cumprod.tolist()
    x = noise
    for i, t in enumerate(ts):
        a_t, a_prev = abar[t], abar[ts[i + 1]] if i + 1 < len(ts) else 1.0
        alpha, beta = a_t / a_prev, 1 - a_t / a_prev  # of this (possibly multi-timestep) jump
        tt = _timesteps_like(x, t)
        x0, _ = schedule.pred_to_x0_eps(denoise_fn(x, tt), x, tt, prediction)
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
        x = (math.sqrt(a_prev) * beta / (1 - a_t)) * x0 + (math.sqrt(alpha) * (1 - a_prev) / (1 - a_t)) * x
        if t > 0:
            variance = max((1 - a_prev) / (1 - a_t) * beta, 1e-20)
            x = x + math.sqrt(variance) * _randn_like(x, generator)
        if callback is not None:
            callback(i, x)
    return x


@torch.no_grad()
def dpm_solver(denoise_fn: DenoiseFn, noise: Tensor, schedule: Schedule, *, steps: int, prediction: str = "eps",
               timestep_spacing: str = "linspace", callback: Callback = None) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022): multistep, second order, data prediction, midpoint form.

    As diffusers' DPMSolverMultistepScheduler defaults (solver_order=2, lower_order_final=True,
    final_sigmas_type="zero", timestep_spacing="linspace"): the first step is first order (DDIM), the last returns
    the data prediction (sigma -> 0). Timesteps: "linspace"/"leading" take steps + 1 evenly spaced points and drop
    the last (t = 0), "trailing" is DDIM's. An abar of exactly 0 (zero terminal SNR) is replaced by
    ZERO_SNR_ALPHA_CUMPROD, as diffusers does, so that log-SNR is finite.
    """
    T = schedule.num_timesteps
    if timestep_spacing == "trailing":
        ts = spaced_timesteps(T, steps, "trailing")
    else:
        ts = spaced_timesteps(T, steps + 1, timestep_spacing)[:-1]
    abar = [a if a > 0 else ZERO_SNR_ALPHA_CUMPROD for a in schedule.alphas_cumprod.tolist()]
    x, x0_prev, h_prev = noise, None, None
    for i, t in enumerate(ts):
        alpha, sigma = math.sqrt(abar[t]), math.sqrt(1 - abar[t])
        x0, _ = convert_prediction(denoise_fn(x, _timesteps_like(x, t)), x, alpha, sigma, prediction)
        if i + 1 == len(ts):
            x = x0  # first-order step to sigma = 0
        else:
            a_next = abar[ts[i + 1]]
            alpha_next, sigma_next = math.sqrt(a_next), math.sqrt(1 - a_next)
            h = math.log(alpha_next / sigma_next) - math.log(alpha / sigma)  # step in log-SNR / 2
            d = x0 if x0_prev is None else x0 + (h / h_prev) / 2 * (x0 - x0_prev)  # D0 + D1 / 2
            x = (sigma_next / sigma) * x - (alpha_next * math.expm1(-h)) * d
            x0_prev, h_prev = x0, h
        if callback is not None:
            callback(i, x)
    return x


def _half_log_snr(abar: float) -> float:
    """log(alpha / sigma) = log(abar / (1 - abar)) / 2, ±inf at abar 0 (zero terminal SNR) and 1 (the clean end)."""
    if abar <= 0:
        return -math.inf
    if abar >= 1:
        return math.inf
    return 0.5 * math.log(abar / (1 - abar))


@torch.no_grad()
def cogvideox_dpm(denoise_fn: DenoiseFn, noise: Tensor, schedule: Schedule, *, steps: int, prediction: str = "eps",
                  timestep_spacing: str = "leading", generator: torch.Generator | None = None,
                  frames_first: bool = False, callback: Callback = None) -> Tensor:
    """CogVideoX's stochastic DPM-Solver++(2M), what CogVideoX-5B / 1.5 pipelines sample with: diffusers'
    CogVideoXDPMScheduler driven as CogVideoXPipeline drives it.

    Each step goes from t to t - T // steps (the clean end after the last timestep) along the SDE form: x' =
    (σ'/σ) e^{-h} x + α' (1 - e^{-2h}) D + σ' sqrt(1 - e^{-2h}) z, with D the x0 prediction, second order (D = (1 +
    1/2r) x0 - 1/2r x0_prev, r = h_prev / h) after the first step and before the last. As diffusers, a normal tensor
    is drawn from ``generator`` for the first-order step and, where the second-order one replaces it, a second
    one, so seeded runs match draw for draw (``frames_first``: drawn in CogVideoX's [B, T, C, H, W] latent layout,
    as its pipeline holds them, then laid out as ours).
    """

    def draw(x: Tensor) -> Tensor:
        return _randn_like(x.transpose(1, 2), generator).transpose(1, 2) if frames_first else _randn_like(x, generator)

    T = schedule.num_timesteps
    ts = spaced_timesteps(T, steps, timestep_spacing)
    abar = schedule.alphas_cumprod.tolist()
    x, x0_prev = noise, None
    for i, t in enumerate(ts):
        prev = t - T // steps
        a, a_prev = abar[t], abar[prev] if prev >= 0 else 1.0
        tt = _timesteps_like(x, t)
        x0, _ = schedule.pred_to_x0_eps(denoise_fn(x, tt), x, tt, prediction)
        lam = _half_log_snr(a)
        h = _half_log_snr(a_prev) - lam
        decay = math.exp(-h)  # e^{-h}: 0 from zero SNR or into the clean end
        keep = math.sqrt((1 - a_prev) / (1 - a)) * decay
        pull = -math.expm1(-2 * h) * math.sqrt(a_prev)  # α' (1 - e^{-2h})
        spread = math.sqrt(1 - a_prev) * math.sqrt(1 - math.exp(-2 * h))
        d, z = x0, draw(x)  # first order (its draw is made either way, as diffusers makes it)
        if x0_prev is not None and prev >= 0:  # second order, with a draw of its own
            r = (lam - _half_log_snr(abar[ts[i - 1]])) / h
            d, z = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev, draw(x)
        x, x0_prev = keep * x + pull * d + spread * z, x0
        if callback is not None:
            callback(i, x)
    return x


@torch.no_grad()
def flow_euler(denoise_fn: DenoiseFn, noise: Tensor, *, steps: int, shift: float = 1.0, mu: float | None = None,
               terminal: float | None = None, grid: str = "table", callback: Callback = None) -> Tensor:
    """Euler steps of the flow ODE dx/dσ = v on FlowMatchEulerDiscreteScheduler's grid (flow_sigmas): x += (σ' - σ) v.

    The state is kept in float32 (diffusers upcasts each step); denoise_fn sees it in noise's dtype. mu: dynamic shift
    (diffusers' use_dynamic_shifting), instead of a static shift; terminal, grid: see flow_sigmas (LTX-Video's).
    """
    sigmas = flow_sigmas(steps, shift, mu, terminal=terminal, grid=grid).to(noise.device)  # [steps + 1] float32
    ts = sigmas[:-1] * FLOW_TIMESTEPS  # [steps] float32, diffusers' scheduler.timesteps
    x = noise.float()
    for i in range(steps):
        v = denoise_fn(x.to(noise.dtype), ts[i].expand(x.shape[0]))  # [B, ...]
        x = x + (sigmas[i + 1] - sigmas[i]) * v.float()
        if callback is not None:
            callback(i, x.to(noise.dtype))
    return x.to(noise.dtype)


@torch.no_grad()
def flow_dpm_solver(denoise_fn: DenoiseFn, noise: Tensor, *, steps: int, shift: float = 1.0, mu: float | None = None,
                    terminal: float | None = None, grid: str = "table", callback: Callback = None) -> Tensor:
    """DPM-Solver++(2M) for rectified flow: diffusers' DPMSolverMultistepScheduler(use_flow_sigmas=True,
    prediction_type="flow_prediction", flow_shift=shift) at its defaults (order 2, midpoint, final sigma 0).

    With alpha = 1 - σ, x0 = x - σ v is the data prediction; the first step is first order, the last returns x0.
    Grid and timesteps are diffusers' (flow_solver_grid): σ starts at shift(0.999) and the model sees integer
    timesteps int(σ·1000) as floats. mu: dynamic shift (shift = e^mu, as diffusers). diffusers' solver has no
    terminal stretch nor steps grid: those (LTX-Video's) are refused.
    """
    if terminal is not None or grid != "table":
        raise ValueError("flow_dpm_solver runs diffusers' DPM-Solver grid only (no shift_terminal / steps grid): "
                         "sample this checkpoint with flow_euler")
    sigmas, ts = flow_solver_grid(steps, shift, mu)  # [steps + 1] float32, [steps] int64
    sig = sigmas.tolist()
    ts = ts.to(device=noise.device, dtype=torch.float32)
    x, x0_prev, h_prev = noise.float(), None, None
    for i in range(steps):
        v = denoise_fn(x.to(noise.dtype), ts[i].expand(x.shape[0]))  # [B, ...]
        x0 = x - sig[i] * v.float()
        if i + 1 == steps:
            x = x0  # first-order step to σ = 0
        else:
            s, s_next = sig[i], sig[i + 1]
            h = math.log((1 - s_next) / s_next) - math.log((1 - s) / s)  # step in log-SNR / 2
            d = x0 if x0_prev is None else x0 + (h / h_prev) / 2 * (x0 - x0_prev)  # D0 + D1 / 2
            x = (s_next / s) * x - ((1 - s_next) * math.expm1(-h)) * d
            x0_prev, h_prev = x0, h
        if callback is not None:
            callback(i, x.to(noise.dtype))
    return x.to(noise.dtype)


def _unipc_step(x: Tensor, m0: Tensor, lam: list[float], sig: list[float], s0: int, t: int, past: Tensor | None,
                c: int, new: Tensor | None) -> Tensor:
    """One UniPC B(h) update (bh2, data prediction) of ``x`` from level s0 to level t, with m0 the x0 prediction at
    s0. Predictor: ``new`` None, order 2 with ``past`` (the x0 prediction at level c), else order 1. Corrector:
    ``new`` is the x0 prediction at t, order 2 with ``past``, else 1."""
    h = lam[t] - lam[s0]
    h_phi_1 = math.expm1(-h)  # e^{-h} - 1; B(h) is the same (bh2)
    base = (sig[t] / sig[s0]) * x - ((1 - sig[t]) * h_phi_1) * m0
    d1 = None if past is None else (past - m0) / ((lam[c] - lam[s0]) / h)  # D1 / r
    if new is None:  # predictor: its order-2 weight is 1/2
        return base if d1 is None else base - ((1 - sig[t]) * h_phi_1 * 0.5) * d1
    if d1 is None:
        rho_d1, rho_new = 0.0, 0.5
    else:  # solve [[1, 1], [r, 1]] rho = b, b_k = k! phi_{k+1}(-h) / B(h), as diffusers' loop builds them
        r = (lam[c] - lam[s0]) / h
        phi_2 = h_phi_1 / -h - 1
        b1, b2 = phi_2 / h_phi_1, 2 * (phi_2 / -h - 0.5) / h_phi_1
        rho_d1 = (b1 - b2) / (1 - r)
        rho_new = b1 - rho_d1
    corr = rho_new * (new - m0) if d1 is None else rho_d1 * d1 + rho_new * (new - m0)
    return base - ((1 - sig[t]) * h_phi_1) * corr


@torch.no_grad()
def flow_unipc(denoise_fn: DenoiseFn, noise: Tensor, *, steps: int, shift: float = 1.0, mu: float | None = None,
               terminal: float | None = None, grid: str = "table", callback: Callback = None) -> Tensor:
    """UniPC for rectified flow, what WanPipeline samples with: diffusers' UniPCMultistepScheduler(use_flow_sigmas=
    True, prediction_type="flow_prediction", flow_shift=shift) at its defaults (order 2, bh2, data prediction, the
    corrector at every step, first order at the first and last steps, final σ 0).

    Each model call first corrects the previous step's result with the new x0 prediction (UniC), then predicts the
    next level from it (UniP); callback sees the predicted sample, as diffusers' step returns it. Grid:
    flow_unipc_grid (the model sees int(σ·1000) as floats). mu: dynamic shift. No terminal stretch nor steps grid
    (LTX-Video's): refused, as flow_dpm_solver.
    """
    if terminal is not None or grid != "table":
        raise ValueError("flow_unipc runs diffusers' UniPC grid only (no shift_terminal / steps grid): "
                         "sample this checkpoint with flow_euler")
    sigmas, ts = flow_unipc_grid(steps, shift, mu)
    sig = sigmas.tolist()
    lam = [math.log((1 - s) / s) if s > 0 else math.inf for s in sig]  # log(alpha / sigma), alpha = 1 - σ
    ts = ts.to(device=noise.device, dtype=torch.float32)
    x = noise.float()
    x_before, m = None, []  # the sample the last predictor started from; the x0 predictions so far (last two)
    order = 1
    for i in range(steps):
        v = denoise_fn(x.to(noise.dtype), ts[i].expand(x.shape[0]))  # [B, ...]
        m0 = x - sig[i] * v.float()
        if i > 0:  # UniC: the step from i - 1 to i again, with the x0 prediction at i, of the last predictor's order
            x = _unipc_step(x_before, m[-1], lam, sig, i - 1, i, m[-2] if order == 2 else None, i - 2, m0)
        m = [*m[-1:], m0]
        order = min(2, steps - i, i + 1)  # warm-up, and first order into σ = 0
        x_before = x
        if sig[i + 1] == 0:
            x = m0  # one first-order step to σ = 0 lands on the x0 prediction
        else:
            x = _unipc_step(x, m0, lam, sig, i, i + 1, m[-2] if order == 2 else None, i - 1, None)
        if callback is not None:
            callback(i, x.to(noise.dtype))
    return x.to(noise.dtype)


SAMPLERS: dict[str, Callable[..., Tensor]] = {"ddim": ddim, "ddpm": ddpm, "dpm_solver": dpm_solver,
                                              "cogvideox_dpm": cogvideox_dpm, "flow_euler": flow_euler,
                                              "flow_dpm_solver": flow_dpm_solver, "flow_unipc": flow_unipc}
