"""The optimizer and its LR schedule: AdamW, linear warmup then constant or cosine; and the mixed-precision choice."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable

import torch

from dit.config import TrainConfig

log = logging.getLogger("dit.optim")


# pretrained families whose released weights are bf16: fp16 autocast overflows their activations (NaN losses, black
# videos: the peers' users report it); CogVideoX-2B was trained in fp16, and our own DiT trains from scratch
BF16_FAMILIES = ("wan", "ltx", "hunyuan", "hunyuan15", "flux", "sd3", "zimage", "qwenimage")


def mixed_precision(setting: str, family: str = "dit") -> str:
    """'auto' -> bf16 where the device supports it (CUDA with bf16), else full fp32 ('no'). ``family``: the
    model.family, for the warning fp16 gets on a bf16-trained pretrained model."""
    if setting == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    if setting == "fp16" and family in BF16_FAMILIES:
        log.warning("train.mixed_precision=fp16 with model.family=%s: its released weights are bf16, and fp16 "
                    "overflows their activations (NaN losses, black samples); use bf16 where the GPU has it, else "
                    "train.mixed_precision=no", family)
    elif setting == "fp16":
        log.warning("fp16 training uses dynamic loss scaling; prefer bf16 where the hardware has it")
    return setting


def lr_lambda(warmup: int, total: int, schedule: str = "constant", floor: float = 0.05) -> Callable[[int], float]:
    """LR multiplier per step: linear warmup over `warmup` steps, then constant or cosine down to `floor`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (the same update under every strategy, DeepSpeed included)."""
    return torch.optim.AdamW([p for p in params if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay,
                             fused=cfg.fused_adamw or None)


def build_lr_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup_steps, cfg.steps, cfg.lr_schedule))
