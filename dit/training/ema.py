"""EMA of the trained weights: timm's ModelEmaV3 with its warmup, a full copy of the plain model made before any
parallelism is applied; FSDP shards it like the model (dit/distributed/strategies.py), so its update is a
shard-local lerp there. With ``share_frozen`` (LoRA under DDP / ZeRO-1 / ZeRO-2) the EMA model holds the very same
frozen parameters as the model: an average of weights that never change is those weights, so only the adapter is
copied (a 1.3B base is not held twice)."""

from __future__ import annotations

import torch
from timm.utils import ModelEmaV3
from torch import nn


def build_ema(model: nn.Module, decay: float, share_frozen: bool = False) -> ModelEmaV3:
    """The EMA of ``model``; ``ema.module`` is the model samples are drawn with and checkpoints export."""
    if not share_frozen:
        return ModelEmaV3(model, decay=decay, use_warmup=True)
    frozen = [(name, p) for name, p in model.named_parameters() if not p.requires_grad]
    kept = [p.data for _, p in frozen]
    for _, p in frozen:  # copied as empty tensors, then replaced by the model's own parameters
        p.data = torch.empty(0, dtype=p.dtype, device=p.device)
    try:
        ema = ModelEmaV3(model, decay=decay, use_warmup=True)
    finally:
        for (_, p), data in zip(frozen, kept):
            p.data = data
    for name, p in frozen:
        owner, _, attr = name.rpartition(".")
        setattr(ema.module.get_submodule(owner), attr, p)
    return ema
