"""Conditioning embeddings: sinusoidal timestep MLP, text projection with pooling, and 3D rotary positions."""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn

from dit.models.layers import Mlp


class TimestepEmbedder(nn.Module):
    """Integer (or float) diffusion timesteps [B] -> vectors [B, D] (sinusoidal features, then an MLP)."""

    def __init__(self, hidden_size: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    @staticmethod
    def sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]  # [B, half]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [B, dim]

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.sinusoid(t, self.freq_dim).to(self.mlp[0].weight.dtype))  # [B, D]


class TextEmbedder(nn.Module):
    """Text encoder states [B, L, D_text] + mask -> tokens [B, L, D] for cross-attention, and a pooled [B, D]
    vector (masked mean) that joins the timestep embedding in adaLN."""

    def __init__(self, text_dim: int, hidden_size: int) -> None:
        super().__init__()
        self.tokens = Mlp(text_dim, hidden_size, hidden_size, act_layer=lambda: nn.GELU(approximate="tanh"))
        self.pooled = Mlp(text_dim, hidden_size, hidden_size, act_layer=nn.SiLU)

    def forward(self, text: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = mask.to(text.dtype)[..., None]  # [B, L, 1]
        mean = (text * w).sum(1) / w.sum(1).clamp(min=1.0)  # [B, D_text]
        return self.tokens(text), self.pooled(mean)  # [B, L, D], [B, D]


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Split a head dimension over (t, h, w) rotary axes; every part even."""
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"3D RoPE needs an even head dim >= 6, got {head_dim}")
    dh = dw = (head_dim // 3) // 2 * 2
    return head_dim - dh - dw, dh, dw


def rope_3d(grid: tuple[int, int, int], head_dim: int, device: torch.device | None = None,
            theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [t*h*w, head_dim/2] for tokens in (t h w) order, computed for the actual grid."""
    angles = []
    for size, dim in zip(grid, rope_axis_dims(head_dim)):
        inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)  # [dim/2]
        angles.append(torch.arange(size, dtype=torch.float32, device=device)[:, None] * inv_freq)  # [size, dim/2]
    t, h, w = grid
    at = angles[0][:, None, None, :].expand(t, h, w, -1)
    ah = angles[1][None, :, None, :].expand(t, h, w, -1)
    aw = angles[2][None, None, :, :].expand(t, h, w, -1)
    ang = rearrange(torch.cat([at, ah, aw], dim=-1), "t h w f -> (t h w) f")  # [N, head_dim/2]
    return ang.cos(), ang.sin()


def sincos_3d(grid: tuple[int, int, int], dim: int, device: torch.device | None = None,
              max_period: float = 10000.0) -> torch.Tensor:
    """Fixed absolute positions [t*h*w, dim] for tokens in (t h w) order: sin/cos of each axis index.

    RoPE only tells attention how far apart two tokens are; this tells each token where it is (which frame,
    which side of the frame), which a small model cannot easily infer from relative offsets. Computed for the
    actual grid, so any grid works, as with RoPE. Axis split as in ``rope_axis_dims`` (each part even).
    """
    parts = []
    for axis, (size, d) in enumerate(zip(grid, rope_axis_dims(dim))):
        freqs = torch.exp(-math.log(max_period) * torch.arange(d // 2, dtype=torch.float32, device=device) / (d // 2))
        args = torch.arange(size, dtype=torch.float32, device=device)[:, None] * freqs  # [size, d/2]
        emb = torch.cat([args.sin(), args.cos()], dim=-1)  # [size, d]
        shape = [1, 1, 1, d]
        shape[axis] = size
        parts.append(emb.reshape(shape).expand(*grid, d))
    return rearrange(torch.cat(parts, dim=-1), "t h w d -> (t h w) d")  # [N, dim]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs of x [B, H, N, d] by the angles (cos/sin [N, d/2])."""
    x2 = rearrange(x.float(), "... (f two) -> ... f two", two=2)  # [B, H, N, d/2, 2]
    x0, x1 = x2.unbind(-1)
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return rearrange(out, "... f two -> ... (f two)").to(x.dtype)
