"""The EMA under DeepSpeed ZeRO, averaged from the fp32 master weights, each rank its own partition of them.

ZeRO keeps the fp32 masters partitioned over the data-parallel ranks (the module holds bf16 / fp16 copies in a
mixed-precision run, and under ZeRO-3 only a partition of those). Each rank moves the elements of the EMA replica
that its partition of the masters covers, a local lerp of 1/N of the weights, with no collective; ``assemble``
then fills in every rank's elements (one all-reduce per parameter) before the EMA is read: sampling, validation,
a checkpoint's export. So the EMA is as precise as the masters and costs no gather per step.

Which elements a rank holds: ZeRO-1/2 link each parameter to its fragment of the flat fp32 partition
(``_hp_mapping``: the fragment's place in the flattened parameter, None where the rank holds none of it); ZeRO-3
splits each flattened parameter into equal padded partitions, partition ``r`` of the group on rank ``r``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Fragment:
    name: str  # the parameter's name in both models
    start: int  # where this rank's elements begin in the flattened parameter
    master: torch.Tensor | None  # their fp32 masters (flat), None where this rank holds none
    group: object  # the process group the parameter is partitioned over


def master_fragments(module: nn.Module, stage: int, dp_group: object = None) -> list[Fragment]:
    """This rank's fp32 masters of every trained parameter of the DeepSpeed-wrapped ``module``, in parameter
    order (the same list on every rank, so ``assemble``'s collectives meet); ``dp_group``: the ZeRO-3 optimizer's
    group, for a parameter that names none."""
    frags = []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue  # frozen: never changes, so the EMA's copy from the start is its average
        if stage == 3:
            from deepspeed.utils import safe_get_local_fp32_param

            local = safe_get_local_fp32_param(p).reshape(-1)
            group = getattr(p, "ds_process_group", dp_group)
            start = dist.get_rank(group=group) * local.numel()
            n = max(0, min(local.numel(), p.ds_numel - start))  # (the last partition carries padding)
            frags.append(Fragment(name, start, local.narrow(0, 0, n) if n else None, group))
        else:
            mapping = getattr(p, "_hp_mapping", None)
            master = mapping.get_hp_fragment().reshape(-1) if mapping is not None else None
            start = mapping.lp_fragment_address.start if mapping is not None else 0
            frags.append(Fragment(name, start, master, p._dp_group))
    return frags


@torch.no_grad()
def update_from_masters(ema_module: nn.Module, frags: list[Fragment], weight: float) -> None:
    """Move this rank's elements of the EMA ``weight`` of the way to the masters (weight 1: copy them)."""
    params = dict(ema_module.named_parameters())
    views, masters = [], []
    for f in frags:
        if f.master is not None:
            views.append(params[f.name].data.view(-1).narrow(0, f.start, f.master.numel()))
            masters.append(f.master.to(device=views[-1].device, dtype=views[-1].dtype))
    if views:
        torch._foreach_lerp_(views, masters, weight=weight)


@torch.no_grad()
def assemble(ema_module: nn.Module, frags: list[Fragment]) -> None:
    """Every element of the EMA's trained parameters from the rank that holds it (all ranks call this)."""
    params = dict(ema_module.named_parameters())
    for f in frags:
        flat = params[f.name].data.view(-1)
        mine = torch.zeros(flat.numel(), dtype=torch.float32, device=flat.device)
        if f.master is not None:
            n = f.master.numel()
            mine.narrow(0, f.start, n).copy_(flat.narrow(0, f.start, n))
        dist.all_reduce(mine, group=f.group)  # one owner per element: a sum of it and zeros, exact
        flat.copy_(mine)
