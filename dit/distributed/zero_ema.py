"""The EMA under DeepSpeed ZeRO, partitioned over the ranks like the fp32 master weights it averages.

ZeRO keeps the fp32 masters partitioned over the data-parallel ranks (the module holds bf16 / fp16 copies in a
mixed-precision run, and under ZeRO-3 only a partition of those). Each rank holds, in fp32, the EMA of just the
elements its partition of the masters covers, and moves them with a local lerp, with no collective: 4 bytes per
trained parameter over the ranks, not a replica on each. The EMA model's trained parameters stay empty tensors
between uses; while they are read (sampling, validation) ``filled_block_by_block`` fills each block's in, in the
samples' precision (one all-reduce per parameter), in the block's forward and empties them after it, so one block
of the EMA is whole at a time, not the model; ``state`` puts each parameter together in fp32 on the CPU, one at a
time, for a checkpoint's export.

Under ZeRO-3 a LoRA run's EMA model shares the model's partitioned base; ``gathered_block_by_block`` gathers it
while the EMA model samples one block at a time, in each block's forward, as ZeRO-3's own hooks do for the model.

Which elements a rank holds: ZeRO-1/2 link each parameter to its fragment of the flat fp32 partition
(``_hp_mapping``: the fragment's place in the flattened parameter, None where the rank holds none of it); ZeRO-3
splits each flattened parameter into equal padded partitions, partition ``r`` of the group on rank ``r``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
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
    shape: torch.Size  # the whole parameter's


def master_fragments(module: nn.Module, stage: int, dp_group: object = None) -> list[Fragment]:
    """This rank's fp32 masters of every trained parameter of the DeepSpeed-wrapped ``module``, in parameter
    order (the same list on every rank, so the collectives meet); ``dp_group``: the ZeRO-3 optimizer's group, for a
    parameter that names none."""
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
            frags.append(Fragment(name, start, local.narrow(0, 0, n) if n else None, group, p.ds_shape))
        else:
            mapping = getattr(p, "_hp_mapping", None)
            master = mapping.get_hp_fragment().reshape(-1) if mapping is not None else None
            start = mapping.lp_fragment_address.start if mapping is not None else 0
            frags.append(Fragment(name, start, master, p._dp_group, p.shape))
    return frags


class PartitionedEma:
    """This rank's part of the EMA of every trained parameter (fp32, flat), started from the masters' values."""

    def __init__(self, frags: list[Fragment], device: torch.device) -> None:
        self.device = device
        self.parts = {f.name: f.master.detach().to(device=device, dtype=torch.float32, copy=True)
                      for f in frags if f.master is not None}

    def numel(self) -> int:
        return sum(p.numel() for p in self.parts.values())

    @torch.no_grad()
    def update(self, frags: list[Fragment], weight: float) -> None:
        """Move this rank's elements ``weight`` of the way to the masters (weight 1: copy them)."""
        parts, masters = [], []
        for f in frags:
            if f.master is not None:
                parts.append(self.parts[f.name])
                masters.append(f.master.to(device=self.device, dtype=torch.float32))
        if parts:
            torch._foreach_lerp_(parts, masters, weight=weight)

    @torch.no_grad()
    def whole(self, f: Fragment, dtype: torch.dtype = torch.float32, first_only: bool = False) -> torch.Tensor:
        """Every element of one parameter's EMA in ``dtype``, from the ranks that hold them (all ranks call this);
        ``first_only``: whole on the group's first rank only (a reduce: half an all-reduce's traffic)."""
        full = torch.zeros(math.prod(f.shape), dtype=dtype, device=self.device)
        if f.name in self.parts:
            part = self.parts[f.name]
            full.narrow(0, f.start, part.numel()).copy_(part)
        # one owner per element: a sum of it and zeros, exact in any dtype
        if first_only:
            first = dist.get_process_group_ranks(f.group if f.group is not None else dist.group.WORLD)[0]
            dist.reduce(full, dst=first, group=f.group)
        else:
            dist.all_reduce(full, group=f.group)
        return full.view(f.shape)

    @torch.no_grad()
    def materialize(self, params: dict[str, nn.Parameter], frags: list[Fragment], dtype: torch.dtype) -> None:
        """Fill the EMA model's (empty) trained parameters ``params`` (by name) in, in ``dtype`` (all ranks call
        this)."""
        for f in frags:
            params[f.name].data = self.whole(f, dtype)

    @torch.no_grad()
    def release(self, params: dict[str, nn.Parameter], frags: list[Fragment]) -> None:
        for f in frags:
            params[f.name].data = torch.empty(0, dtype=torch.float32, device=self.device)

    def state(self, frags: list[Fragment], keep: bool) -> dict[str, torch.Tensor]:
        """Each parameter's EMA put together in fp32 on the CPU, one at a time (all ranks call this; only those
        with ``keep``, each the first rank of its groups, hold the result)."""
        out = {}
        for f in frags:
            whole = self.whole(f, first_only=True)
            if keep:
                out[f.name] = whole.cpu()
        return out

    @torch.no_grad()
    def load(self, frags: list[Fragment], state: dict[str, torch.Tensor]) -> None:
        """This rank's elements from whole parameters (a checkpoint's EMA)."""
        for f in frags:
            if f.name in self.parts:
                part = self.parts[f.name]
                part.copy_(state[f.name].reshape(-1).narrow(0, f.start, part.numel()))


@contextmanager
def gathered_block_by_block(model: nn.Module) -> Iterator[None]:
    """ZeRO-3 partitioned parameters of ``model`` (a LoRA run's EMA model, which shares the base) gathered where they
    are used: each block's in its forward (pre- and post-forward hooks), the rest (embeddings, final layers) for the
    whole context. So one block of the base is whole at a time, not all of it. (A block's parameters are used only
    in its forward: FSDP's per-block sharding rests on the same.)"""
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    blocks = list(model.blocks)
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    rest = [p for p in model.parameters() if id(p) not in in_blocks]
    with ExitStack() as stack:
        opened: dict[int, ExitStack] = {}

        def pre(block: nn.Module, args: tuple) -> None:
            opened[id(block)] = gather = ExitStack()
            gather.enter_context(GatheredParameters(list(block.parameters()), modifier_rank=None))

        def post(block: nn.Module, args: tuple, out: object) -> None:
            opened.pop(id(block)).close()

        for b in blocks:
            stack.callback(b.register_forward_pre_hook(pre).remove)
            stack.callback(b.register_forward_hook(post).remove)
        stack.callback(lambda: [g.close() for g in opened.values()])  # (a forward that raised)
        stack.enter_context(GatheredParameters(rest, modifier_rank=None))
        yield


@contextmanager
def filled_block_by_block(ema: PartitionedEma, model: nn.Module, frags: list[Fragment],
                          dtype: torch.dtype) -> Iterator[None]:
    """The EMA ``model``'s trained parameters filled in from the ranks' partitions where they are read: each block's
    in its forward (pre- and post-forward hooks), the rest (embeddings, final layers) for the whole context; all
    emptied at its end. So one block is whole at a time: its all-reduces run at every forward, in ``dtype``, as
    ZeRO-3 gathers the live model's weights at every forward. Every rank makes the same forward calls."""
    params = dict(model.named_parameters())
    blocks = list(model.blocks)
    owner = {id(p): i for i, b in enumerate(blocks) for p in b.parameters()}
    per_block: list[list[Fragment]] = [[] for _ in blocks]
    rest = []
    for f in frags:
        i = owner.get(id(params[f.name]))
        (rest if i is None else per_block[i]).append(f)
    index = {id(b): i for i, b in enumerate(blocks)}
    with ExitStack() as stack:
        stack.callback(ema.release, params, frags)  # (also after a forward that raised)

        def pre(block: nn.Module, args: tuple) -> None:
            ema.materialize(params, per_block[index[id(block)]], dtype)

        def post(block: nn.Module, args: tuple, out: object) -> None:
            ema.release(params, per_block[index[id(block)]])

        for b in blocks:
            stack.callback(b.register_forward_pre_hook(pre).remove)
            stack.callback(b.register_forward_hook(post).remove)
        ema.materialize(params, rest, dtype)
        yield
