"""Training losses: diffusion (sample t and noise, noise x0 in closed form, regress eps / v / x0, optional min-SNR)
and rectified flow (regress the velocity ε - x0 at σ)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from dit.diffusion.flow import FLOW_TIMESTEPS
from dit.diffusion.schedules import PREDICTIONS, Schedule


def min_snr_weight(snr: Tensor, gamma: float, prediction: str) -> Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) for an MSE on the `prediction` target.

    The paper weights the x0 loss by min(snr, gamma). The eps loss is snr times the x0 loss and the v loss
    (snr + 1) times it, so their weights are min(snr, gamma) / snr = min(1, gamma / snr) and
    min(snr, gamma) / (snr + 1). At snr = 0 (zero terminal SNR) the eps weight is its limit 1 and the v weight 0.
    Example, linear schedule, gamma = 5: t = 0 (snr 9997): eps 5.0013e-4, v 5.0008e-4; t = 999 (snr 4.04e-5):
    eps 1, v 4.04e-5.
    """
    if prediction == "eps":
        return (gamma / snr).clamp(max=1.0)
    if prediction == "v":
        return snr.clamp(max=gamma) / (snr + 1)
    if prediction == "x0":
        return snr.clamp(max=gamma)
    raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")


def training_loss(model: Callable[..., Tensor], x0: Tensor, schedule: Schedule, *,
                  model_kwargs: dict[str, Any] | None = None, prediction: str = "eps", t: Tensor | None = None,
                  noise: Tensor | None = None, generator: torch.Generator | None = None,
                  min_snr_gamma: float | None = None) -> Tensor:
    """Scalar MSE between model(x_t, t, **model_kwargs) and the eps / v / x0 target.

    t ~ U{0, ..., T-1} per batch element and noise ~ N(0, I) unless given (drawn on the generator's device, then
    moved to x0's). The squared error is averaged over the non-batch dims in float32, weighted per sample
    (min-SNR-gamma when given), then averaged over the batch.
    """
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")
    device = generator.device if generator is not None else x0.device
    if t is None:
        t = torch.randint(0, schedule.num_timesteps, (x0.shape[0],), generator=generator, device=device)
    t = t.to(x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype).to(x0.device)
    x_t = schedule.add_noise(x0, noise, t)  # [B, ...]
    pred = model(x_t, t, **(model_kwargs or {}))
    target = noise if prediction == "eps" else x0 if prediction == "x0" else schedule.v_target(x0, noise, t)
    per_sample = (pred.float() - target.float()).square().reshape(x0.shape[0], -1).mean(dim=1)  # [B]
    if min_snr_gamma is not None:
        per_sample = per_sample * min_snr_weight(schedule.snr(t), min_snr_gamma, prediction)
    return per_sample.mean()


def flow_loss(model: Callable[..., Tensor], x0: Tensor, *, sigma: Tensor, noise: Tensor,
              model_kwargs: dict[str, Any] | None = None, weight: Tensor | None = None) -> Tensor:
    """Rectified-flow loss: scalar MSE between model(x_t, σ·1000, **model_kwargs) and the velocity ε - x0.

    x_t = (1 - σ) x0 + σ ε with σ [B] in [0, 1] (dit.diffusion.flow.sample_sigmas) and noise like x0, both moved to
    x0's device; x_t is formed in at least float32 and given to the model in x0's dtype, with float32 timesteps [B].
    The squared error is averaged in at least float32 over the non-batch dims, then over the batch (as training_loss).
    ``weight`` (broadcastable to x0, 0 or 1): each sample's mean over the elements where it is 1 alone.
    """
    dtype = torch.promote_types(x0.dtype, torch.float32)  # bf16 data: mix and compare in float32
    x0_f, noise_f = x0.to(dtype), noise.to(device=x0.device, dtype=dtype)
    s = sigma.to(device=x0.device, dtype=dtype).reshape(-1, *[1] * (x0.ndim - 1))  # [B, 1, ...]
    x_t = ((1 - s) * x0_f + s * noise_f).to(x0.dtype)  # [B, ...]
    t = sigma.to(device=x0.device, dtype=torch.float32) * FLOW_TIMESTEPS  # [B]
    pred = model(x_t, t, **(model_kwargs or {}))
    err = (pred.to(dtype) - (noise_f - x0_f)).square()
    if weight is None:
        per_sample = err.reshape(x0.shape[0], -1).mean(dim=1)  # [B]
    else:
        w = weight.to(device=x0.device, dtype=dtype).expand_as(err)
        per_sample = (err * w).reshape(x0.shape[0], -1).sum(dim=1) / w.reshape(x0.shape[0], -1).sum(dim=1)
    return per_sample.mean()
