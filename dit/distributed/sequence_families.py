"""Sequence parallelism for the Wan and LTX family adapters (dit/models/families), as sequence.py does it for our
DiT: each rank of a group keeps 1/SP of a clip's latent tokens through the blocks; each block's self-attention swaps
tokens for heads with one all-to-all and back; the text cross-attention and the FFN run on the rank's own tokens.

Installed from outside on diffusers' own modules: a forward pre-hook on every block (its slice of the RoPE table, and
of a per-token timestep embedding; the first block also cuts the tokens), our processor on each block's
self-attention (``attn1``: the projections, QK norm and RoPE as the family's own processor computes them, then the
all-to-all), and a pre-hook on the output norm that gathers the tokens, so the output layer, the unpatchify and the
loss see the whole clip on every rank. Gradients follow sequence.py's rule (the gather hands back this rank's slice
times SP); parameter names and state-dict keys stay the plain model's.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dit.distributed.sequence import gather_tokens, heads_to_tokens, local_slice, scatter_tokens, tokens_to_heads


def wan_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on x [B, N, H, d]: each (even, odd) pair of channels rotated by its token's angle
    (cos, sin [1, N, 1, d], each angle repeated for the pair's two channels)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)  # [B, N, H, d/2] each
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)


def ltx_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """LTX's rotary embedding on x [B, N, C] (all heads), in fp32: x cos + (x with each (even, odd) pair turned to
    (-odd, even)) sin, with cos, sin [B, N, C]."""
    real, imag = x.unflatten(2, (-1, 2)).unbind(-1)  # [B, N, C/2] each
    turned = torch.stack([-imag, real], dim=-1).flatten(2)
    return (x.float() * cos + turned.float() * sin).to(x.dtype)


class UlyssesSelfAttention:
    """The processor of a Wan or LTX block's self-attention (``attn1``) for this rank's tokens: projections, QK
    RMS-norm (over all heads, per token) and RoPE on its own tokens, then all-to-all to [B, H/SP, N, d], SDPA over the
    whole clip, all-to-all back, and the output projection: what the family's own processor computes on the whole
    clip (Wan applies RoPE per head, LTX before splitting the heads)."""

    def __init__(self, group: dist.ProcessGroup, family: str) -> None:
        self.group, self.family = group, family

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 rotary: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("sequence-parallel self-attention takes no context and no mask")
        if getattr(attn, "fused_projections", False):
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q, k = attn.norm_q(q), attn.norm_k(k)  # [B, N/SP, H*d]
        if rotary is not None and self.family == "ltx":
            q, k = ltx_rope(q, *rotary), ltx_rope(k, *rotary)
        q, k, v = (x.unflatten(2, (attn.heads, -1)) for x in (q, k, v))  # [B, N/SP, H, d]
        if rotary is not None and self.family == "wan":
            q, k = wan_rope(q, *rotary), wan_rope(k, *rotary)
        q, k, v = (heads_to_tokens(x.transpose(1, 2), self.group) for x in (q, k, v))  # [B, H/SP, N, d]
        out = tokens_to_heads(F.scaled_dot_product_attention(q, k, v), self.group)  # [B, H, N/SP, d]
        out = out.transpose(1, 2).flatten(2, 3).type_as(q)  # [B, N/SP, H*d]
        return attn.to_out[1](attn.to_out[0](out))

    def __repr__(self) -> str:
        return f"UlyssesSelfAttention({self.family}, sp={self.group.size()})"


# Per family: the block's RoPE argument, and whether a timestep embedding is per token (Wan 2.2 TI2V [B, N, 6, D];
# LTX [B, N, 6D] with per-token timesteps) and so must be cut like the tokens.
ROPE_ARGUMENT = {"wan": "rotary_emb", "ltx": "image_rotary_emb"}
PER_TOKEN_TEMB: dict[str, Callable[[torch.Tensor], bool]] = {"wan": lambda t: t.ndim == 4,
                                                             "ltx": lambda t: t.shape[1] > 1}


def _block_inputs(signature: inspect.Signature, family: str, group: dist.ProcessGroup, first: bool,
                  module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook of a block: its RoPE table (and a per-token temb) cut to this rank's tokens; the first block
    also cuts the tokens themselves."""
    bound = signature.bind(*args, **kwargs)
    given, rope = bound.arguments, ROPE_ARGUMENT[family]
    cos, sin = given[rope]  # [1 or B, N, ...]
    mine = local_slice(cos.shape[1], group)
    given[rope] = (cos[:, mine], sin[:, mine])
    if PER_TOKEN_TEMB[family](given["temb"]):
        given["temb"] = given["temb"][:, mine]
    if first:
        given["hidden_states"] = scatter_tokens(given["hidden_states"], group)  # [B, N/SP, D]
    return bound.args, bound.kwargs


def _gather_before_output(group: dist.ProcessGroup, module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook of the output norm: the blocks' token slices gathered into the whole clip."""
    return (gather_tokens(args[0], group), *args[1:])


def apply_sequence_parallel_family(model: nn.Module, group: dist.ProcessGroup) -> nn.Module:
    """Install sequence parallelism over ``group`` on a Wan or LTX adapter in place (after activation
    checkpointing, as for our DiT: a recomputed block passes through these hooks again)."""
    family, size, heads = model.family, group.size(), model.config["num_heads"]
    if family not in ROPE_ARGUMENT:
        raise ValueError(f"sequence parallelism is implemented for our DiT, Wan and LTX, not the {family} adapter")
    if heads % size:
        raise ValueError(f"the {family} model's {heads} attention heads are not divisible by "
                         f"train.sequence_parallel={size}")
    for i, block in enumerate(model.blocks):  # (cross-attention, attn2, needs nothing: its queries are the rank's)
        block.attn1.processor = UlyssesSelfAttention(group, family)
        hook = partial(_block_inputs, inspect.signature(block.forward), family, group, i == 0)
        block.register_forward_pre_hook(hook, with_kwargs=True)
    model.transformer.norm_out.register_forward_pre_hook(lambda m, a: _gather_before_output(group, m, a))
    return model
