"""Parallelism applied from outside the model, in a fixed order (torchtitan's ``parallelize``): activation
checkpointing, then compile, then sequence parallelism (sequence.py, train.sequence_parallel > 1; on the EMA model
too), then the data-parallel strategy (DDP | DeepSpeed ZeRO | FSDP2, strategies.py) over all ranks.
The model never knows. Parameter names and state-dict keys stay those of the plain model throughout."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.distributed._composable import checkpoint

from dit.config import TrainConfig
from dit.distributed.sequence import apply_sequence_parallel
from dit.distributed.setup import DistEnv
from dit.distributed.strategies import Strategy, build_strategy
from dit.training.ema import ModelEma

log = logging.getLogger("dit.parallelize")


def apply_activation_checkpointing(model: nn.Module, every: int = 1) -> nn.Module:
    """Recompute every ``every``-th block's activations in the backward pass instead of storing them. torch's
    composable ``checkpoint`` works through hooks, so modules, parameter names and state-dict keys stay the plain
    model's (FSDP2, DeepSpeed, the EMA and checkpoints see one model)."""
    for i, block in enumerate(model.blocks):
        if i % every == 0:
            checkpoint(block)
    return model


def apply_compile(model: nn.Module, backend: str = "inductor") -> nn.Module:
    """torch.compile each block in place (``Module.compile``), as torchtitan does per block: the same parameter
    names and keys as without compile; the blocks share one compiled graph (same code, same shapes). ``backend``:
    torch.compile's (the tests trace some families with aot_eager: the same graphs, no C++ code generated)."""
    for block in model.blocks:
        block.compile(backend=backend)
    return model


def parallelize(model: nn.Module, env: DistEnv, cfg: TrainConfig, *, ema: ModelEma | None,
                make_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
                gradient_checkpointing: bool = False, compile: bool = False,
                mixed_precision: str = "no", checkpoint_every: int = 1) -> Strategy:
    """The trainable ``model`` made ready to train under ``cfg.strategy``: the returned strategy owns the wrapped
    model and its optimizer (built by ``make_optimizer`` from the parameters as the strategy holds them).
    ``checkpoint_every``: with ``gradient_checkpointing``, only every k-th block is recomputed."""
    if gradient_checkpointing:
        apply_activation_checkpointing(model, checkpoint_every)
        log.info("activation checkpointing: %d of %d blocks recomputed in the backward pass",
                 -(-len(model.blocks) // checkpoint_every), len(model.blocks))
    if compile:
        apply_compile(model)
    if env.sequence_parallel > 1:  # after checkpointing: its recomputation must pass through the SP hooks again
        apply_sequence_parallel(model, env.sp_group)
        if ema is not None:  # the EMA model too: its samples and validation split each clip over the group alike
            apply_sequence_parallel(ema.module, env.sp_group)
        log.info("sequence parallel: groups of %d ranks share each clip's tokens; %d data-parallel replicas",
                 env.sequence_parallel, env.dp_size)
    return build_strategy(model, env, cfg, ema=ema, make_optimizer=make_optimizer, mixed_precision=mixed_precision)
