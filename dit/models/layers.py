"""Small layers the DiT uses: an MLP, RMS norm and stochastic depth. They compute exactly what timm's ``Mlp``,
``RmsNorm`` and ``DropPath`` compute, with the same parameter names (checkpoints are unchanged), but importing
timm costs every process about 3 s (timm.layers pulls in torchvision.models and torch._dynamo), so they live
here. tests/models/test_dit_layers.py holds them bitwise to timm's."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class Mlp(nn.Module):
    """fc1 -> activation -> fc2 (timm's Mlp without dropout or norm, which the DiT never sets)."""

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 act_layer: Callable[[], nn.Module] = nn.GELU) -> None:
        super().__init__()
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class RmsNorm(nn.Module):
    """RMS norm over the last dimension with a learned scale: x * rsqrt(mean(x^2) + eps) * weight."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps) * self.weight


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a sample's residual branch with probability p and scale the kept ones
    by 1 / (1 - p)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)  # one draw per sample
        if keep > 0.0:
            mask.div_(keep)
        return x * mask
