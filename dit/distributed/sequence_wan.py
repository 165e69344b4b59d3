"""Sequence parallelism for the Wan family adapter (dit/models/families/wan.py), as sequence.py does it for our DiT:
each rank of a group keeps 1/SP of a clip's latent tokens through the blocks; each block's self-attention swaps
tokens for heads with one all-to-all and back; the text cross-attention and the FFN run on the rank's own tokens.

Installed from outside on diffusers' own modules: a forward pre-hook on every block (its slice of the RoPE table;
the first block also cuts the tokens), our processor on each block's self-attention (``attn1``), and a pre-hook on
the output norm that gathers the tokens, so the output layer, the unpatchify and the loss see the whole clip on
every rank. Gradients follow sequence.py's rule (the gather hands back this rank's slice times SP); parameter names
and state-dict keys stay the plain model's.
"""

from __future__ import annotations

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


class UlyssesWanSelfAttention:
    """The attention processor of a Wan block's self-attention (``attn1``) for this rank's tokens: projections,
    QK RMS-norm (over all heads, per token) and RoPE on its own tokens, then all-to-all to [B, H/SP, N, d], SDPA over
    the whole clip, all-to-all back, and the output projection: what diffusers' WanAttnProcessor computes on the
    whole clip."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("sequence-parallel Wan self-attention takes no context and no mask")
        if attn.fused_projections:
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q, k = attn.norm_q(q), attn.norm_k(k)  # [B, N/SP, H*d]
        q, k, v = (x.unflatten(2, (attn.heads, -1)) for x in (q, k, v))  # [B, N/SP, H, d]
        if rotary_emb is not None:
            q, k = wan_rope(q, *rotary_emb), wan_rope(k, *rotary_emb)
        q, k, v = (heads_to_tokens(x.transpose(1, 2), self.group) for x in (q, k, v))  # [B, H/SP, N, d]
        out = tokens_to_heads(F.scaled_dot_product_attention(q, k, v), self.group)  # [B, H, N/SP, d]
        out = out.transpose(1, 2).flatten(2, 3).type_as(q)  # [B, N/SP, H*d]
        return attn.to_out[1](attn.to_out[0](out))

    def __repr__(self) -> str:
        return f"UlyssesWanSelfAttention(sp={self.group.size()})"


def _block_inputs(group: dist.ProcessGroup, first: bool, module: nn.Module, args: tuple,
                  kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook of a Wan block, called (hidden_states, encoder_hidden_states, temb, rotary_emb): the RoPE
    table cut to this rank's tokens, a per-token temb too (Wan 2.2 TI2V); the first block also cuts the tokens."""
    hidden, text, temb, (cos, sin) = args
    mine = local_slice(cos.shape[1], group)
    if temb.ndim == 4:  # [B, N, 6, D]
        temb = temb[:, mine]
    if first:
        hidden = scatter_tokens(hidden, group)  # [B, N/SP, D]
    return (hidden, text, temb, (cos[:, mine], sin[:, mine])), kwargs


def _gather_before_output(group: dist.ProcessGroup, module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook of the output norm: the blocks' token slices gathered into the whole clip."""
    return (gather_tokens(args[0], group), *args[1:])


def apply_sequence_parallel_wan(model: nn.Module, group: dist.ProcessGroup) -> nn.Module:
    """Install sequence parallelism over ``group`` on a Wan adapter in place (after activation checkpointing, as
    for our DiT: a recomputed block passes through these hooks again)."""
    size, heads = group.size(), model.config["num_heads"]
    if heads % size:
        raise ValueError(f"the Wan model's {heads} attention heads are not divisible by train.sequence_parallel={size}")
    for i, block in enumerate(model.blocks):
        if block.attn1.add_k_proj is not None:  # Wan I2V's image context goes through the self-attention module
            raise ValueError("sequence parallelism does not take Wan image-to-video models (an image context)")
        block.attn1.processor = UlyssesWanSelfAttention(group)
        block.register_forward_pre_hook(lambda m, a, k, first=i == 0: _block_inputs(group, first, m, a, k),
                                        with_kwargs=True)
    model.transformer.norm_out.register_forward_pre_hook(lambda m, a: _gather_before_output(group, m, a))
    return model

