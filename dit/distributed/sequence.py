"""Sequence parallelism, DeepSpeed-Ulysses style: the SP ranks of a group each hold 1/SP of a clip's tokens.

Everything token-wise (adaLN modulation, cross-attention to the text, MLP, final layer) runs on the rank's own
slice; self-attention swaps tokens for heads with one all-to-all (q, k, v [B, H, N/SP, d] -> [B, H/SP, N, d]),
attends over the whole sequence for its H/SP heads, and swaps back. Installed on a DiT from outside
(``apply_sequence_parallel``, called by parallelize.py), with hooks and the attention's ``kernel`` attribute, so
the model file never knows; parameter names and state-dict keys stay the plain model's.

The model's output is gathered, so every rank of a group returns the full prediction: the loss code and the
samplers are unchanged, and an SP-wrapped DiT is a drop-in denoiser (sampling uses it as it is). Gradients: each
rank computes the same loss, and the data-parallel strategies (DDP, ZeRO, FSDP) average gradients over all ranks,
DP x SP. So the gather's backward hands each rank its slice of the output gradient times SP: the average over a
group is then the sum of the slices' contributions, which is the 1-process gradient (tests check it numerically).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from einops import rearrange
from torch import nn


class _AllToAll(torch.autograd.Function):
    """all_to_all_single over dim 0 in equal chunks: chunk j goes to rank j. It is its own inverse (rank r's chunk
    i comes back as rank i's chunk r), so the backward is the same all-to-all of the gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        x = x.contiguous()
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _AllToAll.apply(grad, ctx.group), None


def all_gather_cat(x: torch.Tensor, group: dist.ProcessGroup, dim: int) -> torch.Tensor:
    """The group's ``x`` concatenated along ``dim`` in rank order, on every rank (no autograd)."""
    parts = [torch.empty_like(x) for _ in range(group.size())]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


class _GatherTokens(torch.autograd.Function):
    """[B, N/SP, C] slices -> [B, N, C] on every rank of the group. Backward: this rank's slice of the (identical)
    output gradient, times SP, because the strategies average gradients over the group's ranks (module docstring)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group, ctx.n = group, x.shape[1]
        return all_gather_cat(x, group, dim=1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        size, rank = ctx.group.size(), ctx.group.rank()
        return grad.narrow(1, rank * ctx.n, ctx.n) * size, None


def local_slice(n: int, group: dist.ProcessGroup) -> slice:
    """This rank's share of ``n`` tokens: a contiguous slice (tokens in (t h w) order, so whole frames when SP
    divides the latent frames)."""
    size = group.size()
    if n % size:
        raise ValueError(f"{n} latent tokens per clip do not split over train.sequence_parallel={size} ranks: choose "
                         f"a clip size (data.frames / height / width, or its bucket) whose token count {size} divides")
    share = n // size
    return slice(group.rank() * share, (group.rank() + 1) * share)


def scatter_tokens(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[B, N, C] (the same on every rank of the group) -> this rank's [B, N/SP, C]; no communication."""
    return x[:, local_slice(x.shape[1], group)]


def gather_tokens(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[B, N/SP, C] -> [B, N, C], the group's slices in rank order."""
    return _GatherTokens.apply(x, group)


def heads_to_tokens(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[B, H, N/SP, d] (all heads, own tokens) -> [B, H/SP, N, d] (own heads, all tokens)."""
    chunks = rearrange(x, "b (p h) n d -> p b h n d", p=group.size())  # chunk p: the heads rank p attends
    return rearrange(_AllToAll.apply(chunks, group), "p b h n d -> b h (p n) d")  # from rank p: its tokens


def tokens_to_heads(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[B, H/SP, N, d] -> [B, H, N/SP, d]: the inverse of ``heads_to_tokens``."""
    chunks = rearrange(x, "b h (p n) d -> p b h n d", p=group.size())  # chunk p: rank p's tokens
    return rearrange(_AllToAll.apply(chunks, group), "p b h n d -> b (p h) n d")  # from rank p: its heads


class UlyssesAttention:
    """Wraps an attention kernel (q, k, v [B, H, N/SP, d] of this rank's tokens -> [B, H, N/SP, d]) so that it
    attends over the group's whole sequence: all-to-all to [B, H/SP, N, d], the kernel, all-to-all back.
    RoPE is already applied to q and k with each token's own position (the block gets its slice of the table)."""

    def __init__(self, kernel: Callable[..., torch.Tensor], group: dist.ProcessGroup) -> None:
        self.kernel, self.group = kernel, group

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                 **kwargs: Any) -> torch.Tensor:
        if mask is not None:  # a key mask would need its own all-gather; self-attention over latents has none
            raise ValueError("sequence-parallel self-attention takes no key mask")
        q, k, v = (heads_to_tokens(x, self.group) for x in (q, k, v))  # [B, H/SP, N, d]
        return tokens_to_heads(self.kernel(q, k, v, mask=None, **kwargs), self.group)  # [B, H, N/SP, d]

    def __repr__(self) -> str:
        return f"UlyssesAttention(sp={self.group.size()})"


def _block_inputs(signature: inspect.Signature, group: dist.ProcessGroup, first: bool, module: nn.Module,
                  args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook of a block: its RoPE table cut to this rank's token positions; the first block also cuts
    the tokens themselves (the later ones get the previous block's slice)."""
    bound = signature.bind(*args, **kwargs)
    cos, sin = bound.arguments["rope"]  # [N, d/2] each, for the whole clip
    mine = local_slice(cos.shape[0], group)
    bound.arguments["rope"] = (cos[mine], sin[mine])
    if first:
        bound.arguments["x"] = scatter_tokens(bound.arguments["x"], group)  # [B, N/SP, D]
    return bound.args, bound.kwargs


def apply_sequence_parallel(model: nn.Module, group: dist.ProcessGroup) -> nn.Module:
    """Install sequence parallelism over ``group`` on our DiT in place. Call it after activation checkpointing
    (parallelize.py does): checkpoint's hooks then record the block's own inputs, and its recomputation passes
    them through these hooks again, which cut them the same way. A family adapter gets sequence_families.py's."""
    if getattr(model, "family", "dit") != "dit":
        from dit.distributed.sequence_families import apply_sequence_parallel_family

        return apply_sequence_parallel_family(model, group)
    size = group.size()
    heads = model.config["num_heads"]
    if heads % size:
        raise ValueError(f"model.num_heads={heads} is not divisible by train.sequence_parallel={size}")
    for i, block in enumerate(model.blocks):
        block.attn.kernel = UlyssesAttention(block.attn.kernel, group)  # self-attention only: cross-attention's
        # queries are this rank's tokens and its keys the whole text, as without sequence parallelism
        hook = partial(_block_inputs, inspect.signature(block.forward), group, i == 0)
        block.register_forward_pre_hook(hook, with_kwargs=True)
    model.final.register_forward_hook(lambda module, args, out: gather_tokens(out, group))  # [B, N, C*p]
    return model
