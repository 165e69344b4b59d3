"""Multi-head attention with pluggable kernels: torch SDPA (default) or xformers (CUDA only, when installed)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

try:  # optional extra: pip install 'dit-video[xformers]'
    import xformers.ops as xops
except ImportError:  # pragma: no cover - depends on the environment
    xops = None


def resolve_backend(name: str, device: torch.device) -> str:
    """'auto' picks xformers on CUDA when it is installed, else SDPA (xformers has no CPU kernels)."""
    if name == "xformers" and (xops is None or device.type != "cuda"):
        raise RuntimeError("model.attention=xformers needs xformers installed and a CUDA device; "
                           "use model.attention=sdpa (or auto)")
    if name == "auto":
        return "xformers" if xops is not None and device.type == "cuda" else "sdpa"
    return name


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              backend: str = "sdpa") -> torch.Tensor:
    """q [B, H, N, d], k/v [B, H, M, d], mask [B, M] bool (True = attend) -> [B, H, N, d]."""
    if backend == "xformers":
        bias = None
        if mask is not None:  # additive bias [B, H, N, M]; xformers wants it materialised and aligned
            bias = torch.zeros(q.shape[0], q.shape[1], q.shape[2], k.shape[2], dtype=q.dtype, device=q.device)
            bias = bias.masked_fill(~mask[:, None, None, :], float("-inf"))
        out = xops.memory_efficient_attention(
            rearrange(q, "b h n d -> b n h d"), rearrange(k, "b h m d -> b m h d"),
            rearrange(v, "b h m d -> b m h d"), attn_bias=bias)
        return rearrange(out, "b n h d -> b h n d")
    attn_mask = None if mask is None else mask[:, None, None, :]  # [B, 1, 1, M]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
