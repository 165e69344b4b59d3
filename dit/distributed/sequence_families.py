"""Sequence parallelism for the Wan, LTX, CogVideoX and HunyuanVideo (1.5) family adapters (dit/models/families), as
sequence.py does it for our DiT: each rank of a group keeps 1/SP of a clip's latent tokens through the blocks; each
block's self-attention swaps tokens for heads with one all-to-all and back; the text cross-attention and the FFN run
on the rank's own tokens.
CogVideoX has no cross-attention: its text tokens join the video's in self-attention and FFN, so every rank carries
the whole text stream, attends it in its own heads, and all-gathers the text's attention output over heads; so does
HunyuanVideo, whose dual- and single-stream blocks both attend text and clip together, and HunyuanVideo 1.5's
dual-stream blocks (its processor masks the padded text's queries as well as its keys: their outputs reach nothing,
so masking the keys alone gives the same clip).

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
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dit.distributed.sequence import (
    all_gather_cat,
    gather_tokens,
    heads_to_tokens,
    local_slice,
    scatter_tokens,
    tokens_to_heads,
)


def wan_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on x [B, N, H, d]: each (even, odd) pair of channels rotated by its token's angle
    (cos, sin [1, N, 1, d], each angle repeated for the pair's two channels)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)  # [B, N, H, d/2] each
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)


def pair_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """LTX's and CogVideoX's rotary embedding (diffusers' apply_rotary_emb), in fp32: x cos + (x with each (even,
    odd) pair of its last dim turned to (-odd, even)) sin. LTX: x, cos, sin [B, N, C] (all heads); CogVideoX: x
    [B, H, N, d], cos, sin [N, d]."""
    real, imag = x.unflatten(-1, (-1, 2)).unbind(-1)
    turned = torch.stack([-imag, real], dim=-1).flatten(-2)
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
            q, k = pair_rope(q, *rotary), pair_rope(k, *rotary)
        q, k, v = (x.unflatten(2, (attn.heads, -1)) for x in (q, k, v))  # [B, N/SP, H, d]
        if rotary is not None and self.family == "wan":
            q, k = wan_rope(q, *rotary), wan_rope(k, *rotary)
        q, k, v = (heads_to_tokens(x.transpose(1, 2), self.group) for x in (q, k, v))  # [B, H/SP, N, d]
        out = tokens_to_heads(F.scaled_dot_product_attention(q, k, v), self.group)  # [B, H, N/SP, d]
        out = out.transpose(1, 2).flatten(2, 3).type_as(q)  # [B, N/SP, H*d]
        return attn.to_out[1](attn.to_out[0](out))

    def __repr__(self) -> str:
        return f"UlyssesSelfAttention({self.family}, sp={self.group.size()})"


class _GatherHeads(torch.autograd.Function):
    """[B, H/SP, L, d] of this rank's heads -> [B, H, L, d] on every rank: CogVideoX's text attention output, which
    every rank carries whole. Backward: the group's gradients summed (each rank's copy of the text stream carries
    what flowed through its own heads; sequence.py's times-SP rule holds for the sum), then this rank's heads."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group, ctx.heads = group, x.shape[1]
        return all_gather_cat(x, group, dim=1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad.narrow(1, ctx.group.rank() * ctx.heads, ctx.heads), None


def joint_attention(group: dist.ProcessGroup, clip: list[torch.Tensor], text: list[torch.Tensor], clip_first: bool,
                    mask: torch.Tensor | None = None,
                    clip_rope: Callable[[torch.Tensor], torch.Tensor] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA of the clip's and the text's tokens together, on this rank's heads: the clip's q, k, v [B, H, N/SP, d]
    (this rank's tokens) go all-to-all to [B, H/SP, N, d] (then ``clip_rope`` on its q and k, where RoPE takes the
    whole table), the text's [B, H, L, d] (the same on every rank) are cut to this rank's heads. ``mask``: the
    text's [B, L] (True: a real token) masks its keys; another shape is SDPA's over the joint sequence, as given.
    Returns the clip's output [B, N/SP, H*d] (back all-to-all) and the text's [B, L, H*d] (all-gathered over
    heads)."""
    size, rank, heads = group.size(), group.rank(), text[0].shape[1]
    mine = slice(rank * heads // size, (rank + 1) * heads // size)
    clip = [heads_to_tokens(x, group) for x in clip]  # [B, H/SP, N, d]
    if clip_rope is not None:
        clip[:2] = [clip_rope(x) for x in clip[:2]]
    text = [x[:, mine] for x in text]  # [B, H/SP, L, d]
    q, k, v = (torch.cat(pair if clip_first else pair[::-1], dim=2) for pair in zip(clip, text))
    n, length = clip[0].shape[2], text[0].shape[2]
    if mask is not None and mask.ndim == 2:  # [B, 1, 1, N + L]: every clip key, the text's real ones
        mask = F.pad(mask.bool(), (n, 0) if clip_first else (0, n), value=True)[:, None, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, H/SP, N + L, d]
    clip_out, text_out = (out[:, :, :n], out[:, :, n:]) if clip_first else (out[:, :, length:], out[:, :, :length])
    return (tokens_to_heads(clip_out, group).transpose(1, 2).flatten(2, 3).type_as(q),
            _GatherHeads.apply(text_out, group).transpose(1, 2).flatten(2, 3).type_as(q))


class UlyssesJointAttention:
    """The processor of a CogVideoX block's self-attention (``attn1``), where the text and the clip's tokens attend
    together (``joint_attention``, text first): QK LayerNorm per head and token, as in CogVideoXAttnProcessor2_0,
    before the all-to-all, RoPE on the clip's tokens after it (with the whole table)."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        if attention_mask is not None:
            raise ValueError("sequence-parallel self-attention takes no mask")

        def qkv(x: torch.Tensor) -> list[torch.Tensor]:  # [B, n, H*d] -> 3 x [B, H, n, d], normed
            if getattr(attn, "fused_projections", False):
                q, k, v = attn.to_qkv(x).chunk(3, dim=-1)
            else:
                q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
            q, k, v = (y.unflatten(2, (attn.heads, -1)).transpose(1, 2) for y in (q, k, v))
            return [q, k, v] if attn.norm_q is None else [attn.norm_q(q), attn.norm_k(k), v]

        rope = None if image_rotary_emb is None else partial(_rope_table, table=image_rotary_emb)
        clip_out, text_out = joint_attention(self.group, qkv(hidden_states), qkv(encoder_hidden_states),
                                             clip_first=False, clip_rope=rope)
        return tuple(attn.to_out[1](attn.to_out[0](x)) for x in (clip_out, text_out))

    def __repr__(self) -> str:
        return f"UlyssesJointAttention(cogvideox, sp={self.group.size()})"


def _rope_table(x: torch.Tensor, table: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return pair_rope(x, *table)


class UlyssesHunyuanAttention:
    """The processor of a HunyuanVideo (1.5) block's attention (``attn``, dual- and single-stream alike), where the
    text and the clip's tokens attend together (``joint_attention``, clip first): as HunyuanVideoAttnProcessor2_0,
    QK RMS-norm per head and RoPE (with this rank's slice of the table) before the all-to-all; the text's
    projections are ``add_*_proj`` and their norms in a dual-stream block, the shared ones in a single-stream one;
    the mask is HunyuanVideo's over the joint sequence or HunyuanVideo 1.5's text mask [B, L]."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        from diffusers.models.embeddings import apply_rotary_emb

        heads, dual = attn.heads, attn.add_q_proj is not None

        def qkv(x: torch.Tensor, text: bool) -> list[torch.Tensor]:  # [B, n, D] -> 3 x [B, n, H, d], normed
            added = text and dual
            q, k, v = ((attn.add_q_proj, attn.add_k_proj, attn.add_v_proj) if added else
                       (attn.to_q, attn.to_k, attn.to_v))
            q, k, v = (f(x).unflatten(2, (heads, -1)) for f, x in ((q, x), (k, x), (v, x)))
            norm_q, norm_k = (attn.norm_added_q, attn.norm_added_k) if added else (attn.norm_q, attn.norm_k)
            return [q if norm_q is None else norm_q(q), k if norm_k is None else norm_k(k), v]

        clip = qkv(hidden_states, text=False)  # [B, N/SP, H, d]
        if image_rotary_emb is not None:
            clip[:2] = [apply_rotary_emb(x, image_rotary_emb, sequence_dim=1) for x in clip[:2]]
        text = [x.transpose(1, 2) for x in qkv(encoder_hidden_states, text=True)]  # [B, H, L, d]
        clip_out, text_out = joint_attention(self.group, [x.transpose(1, 2) for x in clip], text, clip_first=True,
                                             mask=attention_mask)
        if getattr(attn, "to_out", None) is not None:  # (a single-stream block projects after its MLP)
            clip_out = attn.to_out[1](attn.to_out[0](clip_out))
        if getattr(attn, "to_add_out", None) is not None:
            text_out = attn.to_add_out(text_out)
        return clip_out, text_out  # [B, N/SP, D], [B, L, D]

    def __repr__(self) -> str:
        return f"UlyssesHunyuanAttention(sp={self.group.size()})"


def _hunyuan_block_inputs(signature: inspect.Signature, group: dist.ProcessGroup, first: bool, module: nn.Module,
                          args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook of a HunyuanVideo block: its RoPE table ([N, d] cos and sin: ``freqs_cis`` in a dual-stream
    block, ``image_rotary_emb`` in a single-stream one) cut to this rank's tokens; the first block also cuts the
    tokens."""
    bound = signature.bind(*args, **kwargs)
    given = bound.arguments
    rope = "freqs_cis" if "freqs_cis" in given else "image_rotary_emb"
    mine = local_slice(given["hidden_states"].shape[1] * (1 if first else group.size()), group)
    if given.get(rope) is not None:
        cos, sin = given[rope]
        given[rope] = (cos[mine], sin[mine])
    if first:
        given["hidden_states"] = scatter_tokens(given["hidden_states"], group)  # [B, N/SP, D]
    return bound.args, bound.kwargs


# Per family: the block's RoPE argument, cut to the rank's tokens (None: CogVideoX's processor applies the whole
# table after the all-to-all), and whether a timestep embedding is per token (Wan 2.2 TI2V [B, N, 6, D]; LTX
# [B, N, 6D] with per-token timesteps) and so must be cut like the tokens.
ROPE_ARGUMENT = {"wan": "rotary_emb", "ltx": "image_rotary_emb", "cogvideox": None}
PER_TOKEN_TEMB: dict[str, Callable[[torch.Tensor], bool]] = {"wan": lambda t: t.ndim == 4,
                                                             "ltx": lambda t: t.shape[1] > 1,
                                                             "cogvideox": lambda t: False}


def _block_inputs(signature: inspect.Signature, family: str, group: dist.ProcessGroup, first: bool,
                  module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook of a block: its RoPE table (and a per-token temb) cut to this rank's tokens; the first block
    also cuts the tokens themselves."""
    bound = signature.bind(*args, **kwargs)
    given, rope = bound.arguments, ROPE_ARGUMENT[family]
    mine = local_slice(given["hidden_states"].shape[1] * (1 if first else group.size()), group)
    if rope is not None:
        cos, sin = given[rope]  # [1 or B, N, ...]
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
    """Install sequence parallelism over ``group`` on a Wan, LTX, CogVideoX or HunyuanVideo adapter in place (after
    activation checkpointing, as for our DiT: a recomputed block passes through these hooks again)."""
    family, size, heads = model.family, group.size(), model.config["num_heads"]
    if family not in (*ROPE_ARGUMENT, "hunyuan", "hunyuan15"):
        raise ValueError(f"sequence parallelism is implemented for our DiT, Wan, LTX, CogVideoX and HunyuanVideo "
                         f"(1.5), not the {family} adapter")
    if heads % size:
        raise ValueError(f"the {family} model's {heads} attention heads are not divisible by "
                         f"train.sequence_parallel={size}")
    if family in ("hunyuan", "hunyuan15"):  # dual-stream blocks (then single-stream ones), the text whole on every rank
        for i, block in enumerate(model.blocks):
            block.attn.processor = UlyssesHunyuanAttention(group)
            hook = partial(_hunyuan_block_inputs, inspect.signature(block.forward), group, i == 0)
            block.register_forward_pre_hook(hook, with_kwargs=True)
        model.transformer.norm_out.register_forward_pre_hook(lambda m, a: _gather_before_output(group, m, a))
        return model
    for i, block in enumerate(model.blocks):  # (cross-attention, attn2, needs nothing: its queries are the rank's)
        block.attn1.processor = UlyssesJointAttention(group) if family == "cogvideox" else \
            UlyssesSelfAttention(group, family)
        hook = partial(_block_inputs, inspect.signature(block.forward), family, group, i == 0)
        block.register_forward_pre_hook(hook, with_kwargs=True)
    model.transformer.norm_out.register_forward_pre_hook(lambda m, a: _gather_before_output(group, m, a))
    return model
