"""Multi-head attention with pluggable kernels: torch SDPA (default: torch picks its kernel), one SDPA kernel named
(flash, efficient, cudnn, math), or xformers (CUDA only, when installed)."""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from einops import rearrange
from torch.nn.attention import SDPBackend, sdpa_kernel

try:  # optional extra: pip install 'dit-video[xformers]'
    import xformers.ops as xops
except ImportError:  # pragma: no cover - depends on the environment
    xops = None


# model.attention values that pin one SDPA kernel; which devices have it
SDPA_KERNELS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
CUDA_ONLY = ("efficient", "cudnn", "xformers")
_SET_PRIORITY = "set_priority" in inspect.signature(sdpa_kernel).parameters  # torch >= 2.6


def resolve_backend(name: str, device: torch.device) -> str:
    """'auto' picks xformers on CUDA when it is installed, else SDPA (xformers has no CPU kernels)."""
    if name == "xformers" and xops is None:
        raise RuntimeError("model.attention=xformers needs xformers installed (pip install 'dit-video[xformers]'); "
                           "use model.attention=sdpa (or auto)")
    if name in CUDA_ONLY and device.type != "cuda":
        raise RuntimeError(f"model.attention={name} has kernels for CUDA only, and this runs on {device.type}; "
                           "use model.attention=sdpa (or auto, flash, math)")
    if name == "auto":
        return "xformers" if xops is not None and device.type == "cuda" else "sdpa"
    return name


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              backend: str = "sdpa") -> torch.Tensor:
    """q [B, H, N, d], k/v [B, H, M, d], mask [B, M] bool (True = attend) -> [B, H, N, d]."""
    if backend == "xformers":
        q, k = q.to(v.dtype), k.to(v.dtype)  # under autocast the RMS-normed q, k come out fp32 (xformers won't mix)
        bias = None
        if mask is not None:  # additive bias [B, H, N, M]; xformers wants it materialised, its rows 8-aligned
            m = k.shape[2]
            bias = torch.zeros(q.shape[0], q.shape[1], q.shape[2], -(-m // 8) * 8, dtype=q.dtype, device=q.device)
            bias = bias[..., :m].masked_fill(~mask[:, None, None, :], float("-inf"))
        out = xops.memory_efficient_attention(
            rearrange(q, "b h n d -> b n h d"), rearrange(k, "b h m d -> b m h d"),
            rearrange(v, "b h m d -> b m h d"), attn_bias=bias)
        return rearrange(out, "b n h d -> b h n d")
    attn_mask = None if mask is None else mask[:, None, None, :]  # [B, 1, 1, M]
    if backend in SDPA_KERNELS:
        # The named kernel first; where it cannot run, efficient then math: CUDA's flash takes no mask
        # (cross-attention) and neither flash nor cuDNN takes fp32 (e.g. sampling without autocast).
        kernels = [SDPA_KERNELS[backend]]
        kernels += [k for k in (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH) if k not in kernels]
        with sdpa_kernel(kernels, set_priority=True) if _SET_PRIORITY else sdpa_kernel(kernels):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
