"""EMA of the trained weights: timm's ModelEmaV3 with its warmup, a full copy of the plain model made before any
parallelism is applied; FSDP shards it like the model (dit/distributed/strategies.py), so its update is a
shard-local lerp there."""

from __future__ import annotations

from timm.utils import ModelEmaV3
from torch import nn


def build_ema(model: nn.Module, decay: float) -> ModelEmaV3:
    """The EMA of ``model``; ``ema.module`` is the model samples are drawn with and checkpoints export."""
    return ModelEmaV3(model, decay=decay, use_warmup=True)
