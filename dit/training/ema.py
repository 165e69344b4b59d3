"""EMA of the trained weights, a full copy of the plain model made before any parallelism is applied; FSDP shards
it like the model (dit/distributed/strategies.py), so its update is a shard-local lerp there; under DeepSpeed each
rank holds and moves only the part its partition of the fp32 masters covers (dit/distributed/zero_ema.py). With
``share_frozen`` (LoRA under DDP and ZeRO) the EMA model holds the very same frozen parameters as the model: an
average of weights that never change is those weights, so only the adapter is copied (a 14B base is not held twice;
under ZeRO-3 the shared base is partitioned with the model's, and sampling gathers it a block at a time) and
updated.

``ModelEma`` computes what timm's ``ModelEmaV3(model, decay, use_warmup=True)`` computes (the warmup decay and the
foreach lerp over the state dict; tests/training/test_ema.py holds it bitwise to timm's), without importing timm,
which costs every process about 3 s."""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEma(nn.Module):
    """``module`` is the averaged model; ``update(model, step)`` moves it toward ``model`` with the warmup decay
    ``1 - (1 + n)^(-2/3)`` capped at ``decay``, where n counts updates after the first (the first copies)."""

    def __init__(self, model: nn.Module, decay: float, warmup_power: float = 2 / 3) -> None:
        super().__init__()
        self.module = copy.deepcopy(model)
        self.module.eval()
        self.decay = decay
        self.warmup_power = warmup_power
        self.shared: frozenset[str] = frozenset()  # state-dict keys of the model's own frozen tensors: not averaged

    def get_decay(self, step: int | None = None) -> float:
        if step is None:
            return self.decay
        n = max(0, step - 1)
        if n <= 0:
            return 0.0
        return max(min(1 - (1 + n) ** -self.warmup_power, self.decay), 0.0)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        weight = 1.0 - self.get_decay(step)
        ema_values, model_values = [], []
        for (key, ema_v), model_v in zip(self.module.state_dict().items(), model.state_dict().values()):
            if key in self.shared:
                continue
            if ema_v.is_floating_point():
                ema_values.append(ema_v)
                model_values.append(model_v)
            else:
                ema_v.copy_(model_v)
        if not ema_values:
            return
        if all(e.dtype == m.dtype for e, m in zip(ema_values, model_values)):
            torch._foreach_lerp_(ema_values, model_values, weight=weight)
        else:  # mixed dtypes: add_ promotes in-kernel
            torch._foreach_mul_(ema_values, scalar=1.0 - weight)
            torch._foreach_add_(ema_values, model_values, alpha=weight)


def build_ema(model: nn.Module, decay: float, share_frozen: bool = False, partitioned: bool = False) -> ModelEma:
    """The EMA of ``model``; ``ema.module`` is the model samples are drawn with and checkpoints export.
    ``partitioned`` (DeepSpeed ZeRO): its trained parameters are copied as empty tensors; the strategy keeps their
    average partitioned over the ranks and fills them in only while they are read (dit/distributed/zero_ema.py)."""
    frozen = [(name, p) for name, p in model.named_parameters() if not p.requires_grad] if share_frozen else []
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad] if partitioned else []
    emptied = frozen + trained
    kept = [p.data for _, p in emptied]
    for _, p in emptied:  # copied as empty tensors (the frozen ones then replaced by the model's own parameters)
        p.data = torch.empty(0, dtype=p.dtype, device=p.device)
    try:
        ema = ModelEma(model, decay)
    finally:
        for (_, p), data in zip(emptied, kept):
            p.data = data
    for name, p in frozen:
        owner, _, attr = name.rpartition(".")
        setattr(ema.module.get_submodule(owner), attr, p)
    ema.shared = frozenset(name for name, _ in frozen)
    return ema
