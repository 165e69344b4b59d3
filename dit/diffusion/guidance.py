"""Classifier-free guidance (Ho & Salimans 2022): the conditional and unconditional passes share one batch."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def _batch_kwargs(cond: dict[str, Any], uncond: dict[str, Any]) -> dict[str, Any]:
    """Tensors concatenated along dim 0 (cond first); anything else passed through (it must agree)."""
    if cond.keys() != uncond.keys():
        raise ValueError(f"cond and uncond need the same keys, got {sorted(cond)} and {sorted(uncond)}")
    out = {}
    for k, c in cond.items():
        u = uncond[k]
        if isinstance(c, Tensor) != isinstance(u, Tensor):
            raise ValueError(f"{k!r}: a tensor in one of cond / uncond but not in the other")
        if not isinstance(c, Tensor):
            if u is not c and u != c:
                raise ValueError(f"{k!r}: non-tensor values differ between cond ({c!r}) and uncond ({u!r})")
            out[k] = c
        elif c.shape != u.shape:
            raise ValueError(f"{k!r}: cond {tuple(c.shape)} and uncond {tuple(u.shape)} need equal shapes "
                             "(pad text to the same length)")
        else:
            out[k] = torch.cat([c, u])
    return out


Combine = Callable[[Tensor, Tensor, float], Tensor]  # (cond, uncond, scale) -> the guided prediction


def dynamic_scale(scale: float, steps: int) -> Callable[[Tensor], float]:
    """CogVideoX's use_dynamic_cfg: the scale at timestep t (the model's, not the step index, as CogVideoXPipeline
    has it) is 1 + scale (1 - cos(π ((steps - t) / steps)^5)) / 2."""
    def at(t: Tensor) -> float:
        return 1 + scale * (1 - math.cos(math.pi * ((steps - t[0].item()) / steps) ** 5.0)) / 2

    return at


def cfg_denoiser(model: Callable[..., Tensor], cond: dict[str, Any], uncond: dict[str, Any],
                 scale: float | Callable[[Tensor], float],
                 combine: Combine | None = None) -> Callable[[Tensor, Tensor], Tensor]:
    """denoise_fn(x, t) = uncond + scale * (cond - uncond), from one model call on the batch [x; x]; ``combine``:
    another rule for (cond, uncond, scale) (Qwen-Image's rescaled guidance). ``scale``: a number, or a function of
    the timesteps t [B] (``dynamic_scale``).

    scale == 1 runs only the conditional half (the result is the same).
    """
    if not callable(scale) and scale == 1:
        return lambda x, t: model(x, t, **cond)
    kwargs = _batch_kwargs(cond, uncond)

    def denoise(x: Tensor, t: Tensor) -> Tensor:
        out_cond, out_uncond = model(torch.cat([x, x]), torch.cat([t, t]), **kwargs).chunk(2)  # 2 x [B, ...]
        s = scale(t) if callable(scale) else scale
        if combine is not None:
            return combine(out_cond, out_uncond, s)
        return out_uncond + s * (out_cond - out_uncond)

    return denoise
