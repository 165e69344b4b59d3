"""Discrete DDPM noise schedules (linear, cosine, scaled-linear, zero terminal SNR) and x0 / eps / v conversions."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

PREDICTIONS = ("eps", "v", "x0")
SCHEDULES = ("linear", "cosine", "scaled_linear")

# Where alphas_cumprod is exactly 0 (only the last step of a zero-terminal-SNR schedule), eps -> x0 divides by
# sqrt(alphas_cumprod); there (and in DPM-Solver's log-SNR table) we use this value instead, as diffusers'
# DPMSolverMultistepScheduler does. The schedule itself keeps the exact 0, so add_noise / v_target / snr are exact.
ZERO_SNR_ALPHA_CUMPROD = 2.0**-24


# ---- betas: pure functions, float32 computed exactly as diffusers computes them ----------------------------------
# Why not float64: in float32, 1 - alphas_cumprod[0] is 1.00017e-4 where the formula gives 1e-4 (linear schedule).
# A float64 schedule is closer to the formula but puts samplers ~3e-5 away from diffusers' (and from every model
# trained on diffusers' tables). So the tables are diffusers' float32 values, bit for bit; the per-step coefficient
# arithmetic (sqrt, 1 - abar, ratios) is then done in float64.


def linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> Tensor:
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float32)


def scaled_linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> Tensor:
    """Linear in sqrt(beta) (latent diffusion / Stable Diffusion; diffusers' "scaled_linear")."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float32) ** 2


def cosine_betas(num_timesteps: int, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal 2021 cosine schedule (diffusers' "squaredcos_cap_v2"), betas capped at max_beta."""
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    n = num_timesteps
    return torch.tensor([min(1 - f((i + 1) / n) / f(i / n), max_beta) for i in range(n)], dtype=torch.float32)


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(alphas_cumprod) so the last is 0 and the first unchanged."""
    sqrt_abar = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * (first / (first - last))
    abar = sqrt_abar**2
    return 1 - torch.cat([abar[:1], abar[1:] / abar[:-1]])  # the last beta is exactly 1


# ---- conversions between predictions: pure functions of the noise level ------------------------------------------


def convert_prediction(pred: Tensor, x_t: Tensor, alpha: Tensor | float, sigma: Tensor | float,
                       prediction: str) -> tuple[Tensor, Tensor]:
    """(x0, eps) from a model prediction at a noise level where x_t = alpha * x0 + sigma * eps."""
    if prediction == "eps":
        return (x_t - sigma * pred) / alpha, pred
    if prediction == "v":  # v = alpha * eps - sigma * x0 (Salimans & Ho 2022)
        return alpha * x_t - sigma * pred, alpha * pred + sigma * x_t
    if prediction == "x0":
        return pred, (x_t - alpha * pred) / sigma
    raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")


def spaced_timesteps(num_timesteps: int, steps: int, spacing: str = "leading") -> list[int]:
    """Descending sampling timesteps exactly as diffusers' DDIM/DDPM `set_timesteps` (steps_offset=0)."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in [1, {num_timesteps}], got {steps}")
    if spacing == "leading":
        ts = (np.arange(0, steps) * (num_timesteps // steps)).round()[::-1]
    elif spacing == "trailing":
        ts = np.round(np.arange(num_timesteps, 0, -num_timesteps / steps)) - 1
    elif spacing == "linspace":
        ts = np.linspace(0, num_timesteps - 1, steps).round()[::-1]
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; expected leading, trailing or linspace")
    return [int(t) for t in ts.astype(np.int64)]


# ---- the schedule -------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Schedule:
    """A discrete schedule of T steps: `betas`, `alphas_cumprod` [T] float32, equal to diffusers' tables.

    Every method takes integer timesteps t (LongTensor [B]) and broadcasts the per-step coefficients over the
    trailing dims of the data tensor, returning the data tensor's dtype.
    """

    betas: Tensor  # [T] float32
    alphas_cumprod: Tensor  # [T] float32 (the zero-SNR last value is exactly 0)

    @classmethod
    def from_betas(cls, betas: Tensor) -> Schedule:
        betas = betas.float()
        return cls(betas, torch.cumprod(1 - betas, dim=0))

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    def to(self, device: torch.device | str) -> Schedule:
        return Schedule(self.betas.to(device), self.alphas_cumprod.to(device))

    def _alpha_sigma(self, t: Tensor, like: Tensor, safe: bool = False) -> tuple[Tensor, Tensor]:
        """sqrt(abar_t), sqrt(1 - abar_t) as [B, 1, ...] in like's dtype; safe: abar = 0 -> ZERO_SNR_ALPHA_CUMPROD."""
        abar = self.alphas_cumprod.to(t.device)[t].double()  # [B]
        if safe:
            abar = torch.where(abar > 0, abar, ZERO_SNR_ALPHA_CUMPROD)
        shape = abar.shape + (1,) * (like.ndim - abar.ndim)
        return abar.sqrt().to(like.dtype).reshape(shape), (1 - abar).sqrt().to(like.dtype).reshape(shape)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise: q(x_t | x0) in closed form."""
        alpha, sigma = self._alpha_sigma(t, x0)
        return alpha * x0 + sigma * noise

    def v_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0 (diffusers' get_velocity)."""
        alpha, sigma = self._alpha_sigma(t, x0)
        return alpha * noise - sigma * x0

    def snr(self, t: Tensor) -> Tensor:
        """abar_t / (1 - abar_t), float32 [B] (0 at the last step of a zero-terminal-SNR schedule)."""
        abar = self.alphas_cumprod.to(t.device)[t].double()
        return (abar / (1 - abar)).float()

    def pred_to_x0_eps(self, pred: Tensor, x_t: Tensor, t: Tensor, prediction: str) -> tuple[Tensor, Tensor]:
        """(x0, eps) from a prediction of kind eps | v | x0 at x_t."""
        alpha, sigma = self._alpha_sigma(t, x_t, safe=prediction == "eps")
        return convert_prediction(pred, x_t, alpha, sigma, prediction)

    def eps_to_x0(self, eps: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        return self.pred_to_x0_eps(eps, x_t, t, "eps")[0]

    def x0_to_eps(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        return self.pred_to_x0_eps(x0, x_t, t, "x0")[1]

    def v_to_x0(self, v: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        return self.pred_to_x0_eps(v, x_t, t, "v")[0]

    def v_to_eps(self, v: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        return self.pred_to_x0_eps(v, x_t, t, "v")[1]


def shift_snr(alphas_cumprod: Tensor, scale: float) -> Tensor:
    """SNR divided by ``scale`` at every step: abar / (scale + (1 - scale) abar) (CogVideoX's snr_shift_scale; 3.0
    for CogVideoX-2B), so the same timestep is noisier for scale > 1."""
    return alphas_cumprod / (scale + (1 - scale) * alphas_cumprod)


def make_schedule(name: str, num_timesteps: int = 1000, *, beta_start: float = 0.0001, beta_end: float = 0.02,
                  zero_terminal_snr: bool = False, snr_shift_scale: float = 1.0) -> Schedule:
    """linear | cosine | scaled_linear (for scaled_linear pass e.g. beta_start=0.00085, beta_end=0.012).

    snr_shift_scale != 1 divides the SNR (shift_snr), then rescales to zero terminal SNR if asked, in that order and
    on alphas_cumprod, as diffusers' CogVideoXDDIMScheduler does (its scaled-linear betas in float64; the table is
    stored in float32 as every other)."""
    if name == "linear":
        betas = linear_betas(num_timesteps, beta_start, beta_end)
    elif name == "scaled_linear":
        betas = scaled_linear_betas(num_timesteps, beta_start, beta_end)
    elif name == "cosine":
        betas = cosine_betas(num_timesteps)
    else:
        raise ValueError(f"unknown schedule {name!r}; expected one of {SCHEDULES}")
    if snr_shift_scale != 1.0:
        if snr_shift_scale <= 0:
            raise ValueError(f"snr_shift_scale must be > 0, got {snr_shift_scale}")
        if name == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2
        abar = shift_snr(torch.cumprod(1 - betas.double(), dim=0), snr_shift_scale)
        if zero_terminal_snr:
            sqrt_abar = abar.sqrt()
            first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
            abar = ((sqrt_abar - last) * (first / (first - last))) ** 2
        return Schedule((1 - torch.cat([abar[:1], abar[1:] / abar[:-1]])).float(), abar.float())
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    return Schedule.from_betas(betas)
