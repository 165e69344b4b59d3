"""Applied from outside the model, in a fixed order (torchtitan style): activation checkpointing, then compile,
then the data-parallel strategy (DDP / DeepSpeed ZeRO / FSDP2: dit/distributed/strategies.py). The model
never knows."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class CheckpointedBlock(nn.Module):
    """Recomputes the wrapped block's activations in the backward pass instead of storing them."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, *args: object) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return self.block(*args)
        return checkpoint(self.block, *args, use_reentrant=False)


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Wrap every transformer block of ``model.blocks`` (idempotent)."""
    for i, block in enumerate(model.blocks):
        if not isinstance(block, CheckpointedBlock):
            model.blocks[i] = CheckpointedBlock(block)
    return model


def apply_compile(model: nn.Module) -> nn.Module:
    """torch.compile each transformer block in place (``Module.compile``), as torchtitan does per block.

    In place, so parameter names and state-dict keys do not change: checkpoints, EMA and the sharding strategies
    see the same model as without compile. Blocks share one compiled graph (same code, same shapes).
    """
    for block in model.blocks:
        block.compile()
    return model


def parallelize(model: nn.Module, *, gradient_checkpointing: bool = False, compile: bool = False) -> nn.Module:
    if gradient_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        apply_compile(model)
    return model


def unwrap_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with the checkpointing wrappers' extra '.block' removed, so weights load into a plain model."""
    return {k.replace(".block.", "."): v for k, v in model.state_dict().items()}
