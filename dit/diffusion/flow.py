"""Rectified flow (flow matching): x_t = (1 - σ) x0 + σ ε, the model predicts the velocity ε - x0 at timestep σ·1000.

Pure functions for the noise levels: the shift (static, sσ / (1 + (s - 1)σ), or resolution-dependent through
mu = dynamic_mu(tokens)), diffusers' sampling grids, and the training σ draws (uniform, logit-normal, mode).
Grids match diffusers' FlowMatchEulerDiscreteScheduler, DPMSolverMultistepScheduler(use_flow_sigmas=True) and
UniPCMultistepScheduler(use_flow_sigmas=True) value for value (tests/diffusion/test_flow.py).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from dit.config import DiffusionConfig

FLOW_TIMESTEPS = 1000  # model timestep = σ · FLOW_TIMESTEPS (diffusers' num_train_timesteps)
TIMESTEP_SAMPLING = ("uniform", "logit_normal", "mode")

S = TypeVar("S", Tensor, np.ndarray, float)


def shift_sigmas(sigma: S, shift: float) -> S:
    """Static shift σ' = sσ / (1 + (s - 1)σ): s > 1 moves every level towards noise (1 and 0 stay put)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def time_shift(mu: float, sigma: S) -> S:
    """Resolution-dependent shift σ' = e^mu / (e^mu + (1/σ - 1)) (diffusers' exponential time_shift, exponent 1);
    the static shift with s = e^mu."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigma - 1))


def dynamic_mu(num_tokens: int, base_shift: float = 0.5, max_shift: float = 1.15, base_seq_len: int = 256,
               max_seq_len: int = 4096) -> float:
    """mu linear in the latent token count: base_shift at base_seq_len, max_shift at max_seq_len (diffusers'
    calculate_shift; extrapolated outside that range)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return num_tokens * m + b


def latent_tokens(grid: tuple[int, ...] | torch.Size, patch: tuple[int, int, int]) -> int:
    """Tokens of a latent grid (t, h, w) under a (pt, ph, pw) patch: the count that dynamic_mu takes."""
    t, h, w = grid[-3:]
    return (t // patch[0]) * (h // patch[1]) * (w // patch[2])


FLOW_GRIDS = ("table", "steps")


def stretch_to_terminal(sigma: S, terminal: float) -> S:
    """Stretch a descending grid so its last level is ``terminal`` (1 stays put): diffusers' shift_terminal, which
    LTX-Video samples with (0.1)."""
    one_minus = 1 - sigma
    return 1 - one_minus / (one_minus[-1] / (1 - terminal))


def flow_sigmas(steps: int, shift: float = 1.0, mu: float | None = None, *, terminal: float | None = None,
                grid: str = "table") -> Tensor:
    """FlowMatchEulerDiscreteScheduler's sampling grid, float32 [steps + 1]: σ from 1 to σ_min, then 0.

    grid "table" (diffusers' default, WanPipeline): as diffusers computes it, the static shift is applied to the
    training table first (so σ_min = shift(1/1000)) and then again to the linspace between its ends; with mu
    (use_dynamic_shifting) the table is unshifted and the grid goes through time_shift(mu, ·). grid "steps"
    (LTXPipeline's sigmas argument): linspace(1, 1/steps, steps) in float32, then the shift. terminal: the shifted
    grid is stretched to end there (shift_terminal). mu and a static shift exclude each other.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if mu is not None and shift != 1.0:
        raise ValueError(f"give either a static shift ({shift}) or a dynamic mu ({mu}), not both")
    if grid not in FLOW_GRIDS:
        raise ValueError(f"unknown flow grid {grid!r}; expected one of {FLOW_GRIDS}")
    n = FLOW_TIMESTEPS
    if grid == "steps":
        levels = np.linspace(1.0, 1 / steps, steps).astype(np.float32)  # float32, as diffusers casts custom sigmas
    else:
        ends = torch.tensor([n, 1], dtype=torch.float32) / n  # the table's first and last levels, float32 as diffusers
        if mu is None:
            ends = shift_sigmas(ends, shift)
        sigma_max, sigma_min = ends.tolist()
        levels = np.linspace(sigma_max * n, sigma_min * n, steps) / n  # float64 until the end, as diffusers
    levels = time_shift(mu, levels) if mu is not None else shift_sigmas(levels, shift)
    if terminal is not None and steps > 1:  # one level (σ = 1) has nothing to stretch
        levels = stretch_to_terminal(levels, terminal)
    return torch.cat([torch.from_numpy(np.asarray(levels)).float(), torch.zeros(1)])


def flow_solver_grid(steps: int, shift: float = 1.0, mu: float | None = None) -> tuple[Tensor, Tensor]:
    """DPMSolverMultistepScheduler(use_flow_sigmas=True)'s grid: (σ float32 [steps + 1], timesteps int64 [steps]).

    σ runs from shift(1 - 1/1000) (not 1) down to shift((1 - 1/1000) / steps), then 0; the model timesteps are σ·1000
    truncated to integers, as diffusers passes them. mu (dynamic shifting) sets shift = e^mu, as diffusers does.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if mu is not None and shift != 1.0:
        raise ValueError(f"give either a static shift ({shift}) or a dynamic mu ({mu}), not both")
    n = FLOW_TIMESTEPS
    s = float(np.exp(mu)) if mu is not None else shift
    sigmas = 1.0 - np.linspace(1, 1 / n, steps + 1)  # [steps + 1], 0 .. 1 - 1/n
    sigmas = np.flip(shift_sigmas(sigmas, s))[:-1].copy()  # [steps], descending, without the 0
    timesteps = torch.from_numpy(sigmas * n).to(torch.int64)  # truncated, from float64
    return torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32)), timesteps


def flow_unipc_grid(steps: int, shift: float = 1.0, mu: float | None = None) -> tuple[Tensor, Tensor]:
    """UniPCMultistepScheduler(use_flow_sigmas=True)'s grid (WanPipeline's sampler): (σ float32 [steps + 1],
    timesteps int64 [steps]).

    σ is linspace(1, 1/1000, steps + 1) without its last level, shifted (static, or time_shift(mu) as diffusers'
    use_dynamic_shifting), the first level moved off 1 by 1e-6 (λ = log((1 - σ) / σ) must stay finite), then 0;
    the model timesteps are σ·1000 truncated to integers, from float64 as diffusers computes them.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if mu is not None and shift != 1.0:
        raise ValueError(f"give either a static shift ({shift}) or a dynamic mu ({mu}), not both")
    sigmas = np.linspace(1, 1 / FLOW_TIMESTEPS, steps + 1)[:-1]  # [steps], float64
    sigmas = time_shift(mu, sigmas) if mu is not None else shift_sigmas(sigmas, shift)
    if abs(sigmas[0] - 1) < 1e-6:
        sigmas[0] -= 1e-6
    timesteps = torch.from_numpy(sigmas * FLOW_TIMESTEPS).to(torch.int64)
    return torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32)), timesteps


def sample_sigmas(n: int, generator: torch.Generator | None, cfg: DiffusionConfig,
                  num_tokens: int | None = None) -> Tensor:
    """Training noise levels σ, float32 [n] on the generator's device: u by cfg.timestep_sampling, then shifted.

    uniform: u ~ U[0, 1); logit_normal: u = sigmoid(N(logit_mean, logit_std)); mode: u' = 1 - u - mode_scale (cos²(πu/2)
    - 1 + u) (SD3; draws as diffusers' compute_density_for_timestep_sampling). Then the static shift, or with
    cfg.dynamic_shift time_shift(dynamic_mu(num_tokens, ...)). σ is continuous (not rounded to 1000 levels).
    """
    device = generator.device if generator is not None else None
    if cfg.sigma_min > 0.0 or cfg.sigma_max < 1.0:
        return _sigmas_in_range(n, generator, cfg, num_tokens)
    if cfg.timestep_sampling == "uniform":
        u = torch.rand(n, generator=generator, device=device)
    elif cfg.timestep_sampling == "logit_normal":
        u = torch.sigmoid(torch.normal(cfg.logit_mean, cfg.logit_std, size=(n,), generator=generator, device=device))
    elif cfg.timestep_sampling == "mode":
        u = torch.rand(n, generator=generator, device=device)
        u = 1 - u - cfg.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    else:
        raise ValueError(f"unknown timestep_sampling {cfg.timestep_sampling!r}; expected one of {TIMESTEP_SAMPLING}")
    return _shifted(u, cfg, num_tokens)


def _shifted(u: Tensor, cfg: DiffusionConfig, num_tokens: int | None) -> Tensor:
    """u in [0, 1] -> σ by the static shift, or with cfg.dynamic_shift the shift of this latent token count."""
    if not cfg.dynamic_shift:
        return shift_sigmas(u, cfg.shift)
    if num_tokens is None:
        raise ValueError("diffusion.dynamic_shift needs the latent token count (num_tokens)")
    return time_shift(dynamic_mu(num_tokens, cfg.base_shift, cfg.max_shift, cfg.base_seq_len, cfg.max_seq_len), u)


def _sigma_of(v: Tensor, cfg: DiffusionConfig, num_tokens: int | None) -> Tensor:
    """σ of cfg's law for base uniforms v in (0, 1): a monotone map (uniform and logit_normal increase, the SD3 mode
    map decreases for mode_scale <= 1.75), so a range of σ is a range of v."""
    if cfg.timestep_sampling == "uniform":
        u = v
    elif cfg.timestep_sampling == "logit_normal":  # N(mean, std) by its inverse CDF
        u = torch.sigmoid(cfg.logit_mean + cfg.logit_std * math.sqrt(2) * torch.erfinv(2 * v - 1))
    else:
        u = 1 - v - cfg.mode_scale * (torch.cos(math.pi * v / 2) ** 2 - 1 + v)
    return _shifted(u, cfg, num_tokens)


def _v_at(sigma: float, cfg: DiffusionConfig, num_tokens: int | None) -> float:
    """The base uniform v whose σ is ``sigma`` (bisection on the monotone map, in float64)."""
    lo, hi = 0.0, 1.0
    rising = float(_sigma_of(torch.tensor([0.75], dtype=torch.float64), cfg, num_tokens)) > \
        float(_sigma_of(torch.tensor([0.25], dtype=torch.float64), cfg, num_tokens))
    for _ in range(60):
        mid = (lo + hi) / 2
        above = float(_sigma_of(torch.tensor([mid], dtype=torch.float64), cfg, num_tokens)) > sigma
        lo, hi = (lo, mid) if above == rising else (mid, hi)
    return (lo + hi) / 2


def _sigmas_in_range(n: int, generator: torch.Generator | None, cfg: DiffusionConfig,
                     num_tokens: int | None) -> Tensor:
    """σ [n] of cfg's law restricted to [sigma_min, sigma_max]: its base uniform drawn in the matching interval
    (one draw of n uniforms, as the uniform law draws)."""
    a, b = (_v_at(s, cfg, num_tokens) for s in (cfg.sigma_min, cfg.sigma_max))
    a, b = min(a, b), max(a, b)
    device = generator.device if generator is not None else None
    v = a + (b - a) * torch.rand(n, generator=generator, device=device, dtype=torch.float64)
    sigma = _sigma_of(v.clamp(1e-12, 1 - 1e-12), cfg, num_tokens)
    return sigma.clamp(cfg.sigma_min, cfg.sigma_max).float()


def sampling_grid(cfg: DiffusionConfig) -> dict[str, object]:
    """The flow grid settings of a checkpoint for flow_euler (terminal, grid): diffusers' default for a plain flow
    run, LTX-Video's (steps grid, stretched to 0.1) when its config says so."""
    return dict(terminal=cfg.shift_terminal, grid=cfg.flow_grid)


def sampling_shift(cfg: DiffusionConfig, num_tokens: int, shift: float | None = None) -> tuple[float, float | None]:
    """(shift, mu) for a flow sampler: an explicit shift (sample.shift) wins; otherwise the training one, static or
    dynamic (mu from this latent token count)."""
    if shift is not None:
        return shift, None
    if cfg.dynamic_shift:
        return 1.0, dynamic_mu(num_tokens, cfg.base_shift, cfg.max_shift, cfg.base_seq_len, cfg.max_seq_len)
    return cfg.shift, None
