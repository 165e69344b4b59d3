"""The Diffusion Transformer: 3D patchify -> tokens with 3D RoPE -> adaLN-Zero blocks (self-attention,
cross-attention to text, MLP) -> final layer -> unpatchify. Parallelism is applied from outside
(dit/distributed/parallelize.py); this file never mentions it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from einops import rearrange
from torch import nn

from dit.models.attention import attention, resolve_backend
from dit.models.condition import condition_channels
from dit.models.embeddings import TextEmbedder, TimestepEmbedder, apply_rope, rope_3d, sincos_3d
from dit.models.layers import DropPath, Mlp, RmsNorm
from dit.models.presets import PRESETS


def patchify(x: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """[B, C, T, H, W] -> [B, N, C*pt*ph*pw] with tokens in (t h w) order."""
    pt, ph, pw = patch
    return rearrange(x, "b c (t pt) (h ph) (w pw) -> b (t h w) (c pt ph pw)", pt=pt, ph=ph, pw=pw)


def unpatchify(tokens: torch.Tensor, grid: tuple[int, int, int], patch: tuple[int, int, int]) -> torch.Tensor:
    """[B, N, C*pt*ph*pw] -> [B, C, T, H, W]; the inverse of patchify for a (t, h, w) token grid."""
    (t, h, w), (pt, ph, pw) = grid, patch
    return rearrange(tokens, "b (t h w) (c pt ph pw) -> b c (t pt) (h ph) (w pw)", t=t, h=h, w=w, pt=pt, ph=ph, pw=pw)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


def _split_qkv(fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A fused qkv weight or bias [3D, ...] -> (q [D, ...], kv [2D, ...]), views of it."""
    third = fused.shape[0] // 3
    return fused[:third], fused[third:]


def _either_qkv_layout(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Load pre-hook of Attention: state in the other layout (plain ``q`` + ``kv``, or fused ``qkv``) is converted
    to the module's own, so an export loads into a fused model and a fused model's state into a plain one."""
    for name in ("weight", "bias"):
        plain, fused = (f"{prefix}q.{name}", f"{prefix}kv.{name}"), f"{prefix}qkv.{name}"
        if module.fused and plain[0] in state_dict and plain[1] in state_dict:
            state_dict[fused] = torch.cat([state_dict.pop(plain[0]), state_dict.pop(plain[1])])
        elif not module.fused and fused in state_dict:
            state_dict[plain[0]], state_dict[plain[1]] = _split_qkv(state_dict.pop(fused))


def unfused_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every fused ``qkv`` projection (Attention.fuse_qkv) split back into ``q`` and ``kv``: the
    layout of exports, which a plain DiT (and `dit sample`) loads."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        head, _, name = key.rpartition(".")
        if head.endswith(".qkv") or head == "qkv":
            base = head[: -len("qkv")]
            q, kv = _split_qkv(value)  # own storage each: safetensors refuses tensors that share one
            out[f"{base}q.{name}"], out[f"{base}kv.{name}"] = q.clone(), kv.clone()
        else:
            out[key] = value
    return out


class Attention(nn.Module):
    """Multi-head attention with QK-norm; self-attention (with RoPE) or cross-attention (with a key mask)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, context_dim: int | None = None) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim or dim, 2 * dim)
        self.q_norm = RmsNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RmsNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.backend = "sdpa"
        # The attention kernel, q, k, v [B, H, N, d] -> [B, H, N, d]: an attribute, so that it can be wrapped from
        # outside without touching the projections, norms and RoPE around it.
        self.kernel: Callable[..., torch.Tensor] = attention
        self.fused = False
        self.register_load_state_dict_pre_hook(_either_qkv_layout)

    def fuse_qkv(self) -> None:
        """For self-attention: q and kv as one linear layer ``qkv`` (one GEMM of width 3D instead of two), its
        weight the two stacked ([q; kv]), so the output is the same. Exports keep the plain layout
        (``unfused_state_dict``); this module loads either."""
        if self.fused:
            return
        q, kv = self.q, self.kv
        qkv = nn.Linear(q.in_features, q.out_features + kv.out_features, device=q.weight.device,
                        dtype=q.weight.dtype)
        with torch.no_grad():
            qkv.weight.copy_(torch.cat([q.weight, kv.weight]))
            qkv.bias.copy_(torch.cat([q.bias, kv.bias]))
        del self.q, self.kv
        self.qkv, self.fused = qkv, True

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if self.fused:  # [B, H, N, d] each
            if context is not None:
                raise ValueError("this attention's q, k and v are fused (fuse_qkv): it is self-attention, no context")
            q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        else:
            ctx = x if context is None else context
            q = rearrange(self.q(x), "b n (h d) -> b h n d", h=self.num_heads)  # [B, H, N, d]
            k, v = rearrange(self.kv(ctx), "b m (two h d) -> two b h m d", two=2, h=self.num_heads)  # [B, H, M, d]
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = self.kernel(q, k, v, mask=mask, backend=self.backend)  # [B, H, N, d]
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))  # [B, N, D]


class DiTBlock(nn.Module):
    """adaLN-Zero block: modulated self-attention, cross-attention to text, modulated MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = True,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, qk_norm)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.cross = Attention(dim, num_heads, qk_norm)
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"))
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, c: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN(c).chunk(6, dim=-1)  # 6 x [B, D]
        x = x + self.drop_path(g1[:, None] * self.attn(modulate(self.norm1(x), sh1, sc1), rope=rope))  # [B, N, D]
        x = x + self.drop_path(self.cross(self.norm2(x), context=text, mask=text_mask))  # [B, N, D]
        x = x + self.drop_path(g2[:, None] * self.mlp(modulate(self.norm3(x), sh2, sc2)))  # [B, N, D]
        return x


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN(c).chunk(2, dim=-1)  # [B, D] each
        return self.linear(modulate(self.norm(x), shift, scale))  # [B, N, out_dim]


class DiT(nn.Module):
    """Latent video DiT. forward(x [B, C, t, h, w], t [B], text [B, L, D_text], text_mask [B, L]) -> [B, C, t, h, w].

    Any latent grid that the patch size divides works: RoPE positions (relative, in attention) and the fixed
    sin/cos absolute positions (added to the tokens; ``abs_pos``) are computed for the actual grid.
    ``condition_channels`` > 0 (image-to-video, dit/models/condition.py): forward also takes ``condition``
    [B, condition_channels, t, h, w], concatenated to x before the patch embedding (None: zeros, no condition)."""

    condition_mask = True  # the condition carries the mask channel (dit/models/condition.py)

    def __init__(self, in_channels: int = 4, text_dim: int = 384, hidden_size: int = 128, depth: int = 4,
                 num_heads: int = 4, patch_size: tuple[int, int, int] = (1, 2, 2), mlp_ratio: float = 4.0,
                 qk_norm: bool = True, drop_path: float = 0.0, attention: str = "auto",
                 abs_pos: bool = True, condition_channels: int = 0) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
        self.config: dict[str, Any] = dict(in_channels=in_channels, text_dim=text_dim, hidden_size=hidden_size,
                                           depth=depth, num_heads=num_heads, patch_size=list(patch_size),
                                           mlp_ratio=mlp_ratio, qk_norm=qk_norm, drop_path=drop_path,
                                           attention=attention, abs_pos=abs_pos)
        if condition_channels:  # recorded only when used: a text-to-video DiT's config is as it always was
            self.config["condition_channels"] = condition_channels
        self.in_channels, self.patch, self.abs_pos = in_channels, tuple(patch_size), abs_pos
        self.condition_channels = condition_channels
        self.head_dim = hidden_size // num_heads
        volume = self.patch[0] * self.patch[1] * self.patch[2]
        patch_dim = in_channels * volume  # the output's channels per token
        self.x_embed = nn.Linear((in_channels + condition_channels) * volume, hidden_size)
        self.t_embed = TimestepEmbedder(hidden_size)
        self.text_embed = TextEmbedder(text_dim, hidden_size)
        drop_rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm, drop_rates[i])
                                     for i in range(depth)])
        self.final = FinalLayer(hidden_size, patch_dim)
        self.attention_backend, self._backend_in_use = attention, "sdpa"
        self.initialize_weights()

    def initialize_weights(self) -> None:
        def _basic(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        self.apply(_basic)
        nn.init.normal_(self.t_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[2].weight, std=0.02)
        for block in self.blocks:  # adaLN-Zero: every residual branch starts as the identity
            nn.init.zeros_(block.adaLN[-1].weight)
            nn.init.zeros_(block.adaLN[-1].bias)
            nn.init.zeros_(block.cross.proj.weight)
            nn.init.zeros_(block.cross.proj.bias)
        nn.init.zeros_(self.final.adaLN[-1].weight)
        nn.init.zeros_(self.final.adaLN[-1].bias)
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.linear.bias)

    def fuse_qkv(self) -> DiT:
        """Every block's self-attention q and kv projections as one linear layer (Attention.fuse_qkv), in place."""
        for block in self.blocks:
            block.attn.fuse_qkv()
        return self

    def grid(self, x: torch.Tensor) -> tuple[int, int, int]:
        _, _, t, h, w = x.shape
        pt, ph, pw = self.patch
        if t % pt or h % ph or w % pw:
            raise ValueError(f"latent grid {(t, h, w)} is not divisible by the patch size {self.patch}")
        return t // pt, h // ph, w // pw

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                condition: torch.Tensor | None = None) -> torch.Tensor:
        grid = self.grid(x)
        if self.condition_channels:
            if condition is None:
                condition = x.new_zeros(x.shape[0], self.condition_channels, *x.shape[2:])
            x = torch.cat([x, condition.to(x.dtype)], dim=1)  # [B, C + C_cond, t, h, w]
        elif condition is not None:
            raise ValueError("this DiT takes no condition (trained with model.condition=none)")
        backend = resolve_backend(self.attention_backend, x.device)
        if backend != self._backend_in_use:
            for m in self.modules():
                if isinstance(m, Attention):
                    m.backend = backend
            self._backend_in_use = backend
        rope = rope_3d(grid, self.head_dim, device=x.device)  # cos, sin [N, d/2]
        tokens = self.x_embed(patchify(x, self.patch))  # [B, N, D]
        if self.abs_pos:
            tokens = tokens + sincos_3d(grid, tokens.shape[-1], device=x.device).to(tokens.dtype)  # [B, N, D]
        text_tokens, pooled = self.text_embed(text, text_mask)  # [B, L, D], [B, D]
        c = self.t_embed(t) + pooled  # [B, D]
        for block in self.blocks:
            tokens = block(tokens, c, text_tokens, text_mask, rope)  # [B, N, D]
        out = self.final(tokens, c)  # [B, N, C*pt*ph*pw]
        return unpatchify(out, grid, self.patch)  # [B, C, t, h, w]


def build_dit(model_cfg: Any, in_channels: int, text_dim: int) -> DiT:
    """A DiT from a ModelConfig: the preset's sizes with any explicit overrides."""
    p = dict(PRESETS[model_cfg.preset])
    for key in ("hidden_size", "depth", "num_heads", "patch_size"):
        if getattr(model_cfg, key) is not None:
            p[key] = getattr(model_cfg, key)
    return DiT(in_channels=in_channels, text_dim=text_dim, hidden_size=p["hidden_size"], depth=p["depth"],
               num_heads=p["num_heads"], patch_size=tuple(p["patch_size"]), mlp_ratio=model_cfg.mlp_ratio,
               qk_norm=model_cfg.qk_norm, drop_path=model_cfg.drop_path, attention=model_cfg.attention,
               abs_pos=model_cfg.abs_pos,
               condition_channels=condition_channels(getattr(model_cfg, "condition", "none"), in_channels))


def flops_per_token(model: nn.Module, num_tokens: int, text_len: int) -> float:
    """Forward matmul FLOPs per image token (2 * MACs), for throughput/MFU reporting; any denoiser whose ``config``
    gives hidden_size, mlp_ratio and depth (our DiT, a pretrained family: dit/models/families)."""
    d, cfg = model.config["hidden_size"], model.config
    mlp = 2 * d * int(d * cfg["mlp_ratio"])
    if getattr(model, "joint_text", False):  # CogVideoX: the text's tokens go through QKVO, attention and MLP too
        stream = (num_tokens + text_len) / max(num_tokens, 1)  # tokens in a block per clip token
        per_block = 2 * stream * (4 * d * d + mlp) + 2 * 2 * stream * (num_tokens + text_len) * d
        # HunyuanVideo's token refiner: blocks of self-attention and a 4x MLP over the text alone
        refiner = cfg.get("refiner_layers", 0) * text_len * 2 * (12 * d * d + 2 * text_len * d)
        # SD3: its last block gives no text output (no out projection, no MLP over the text), and SD3.5's first
        # blocks add a second self-attention over the image alone
        skipped = cfg.get("text_out_skipped", 0) * text_len * 2 * (d * d + mlp)
        image_attention = cfg.get("image_attention_layers", 0) * (2 * 4 * d * d + 2 * 2 * num_tokens * d)
        # Z-Image's noise refiner: whole blocks over the image alone
        image_layers = cfg.get("image_layers", 0) * (2 * (4 * d * d + mlp) + 2 * 2 * num_tokens * d)
        return (cfg["depth"] * per_block + (refiner - skipped) / max(num_tokens, 1) + image_attention
                + image_layers)
    per_block = 2 * (4 * d * d + mlp + 2 * d * d + 2 * d * d * text_len / max(num_tokens, 1))
    per_block += 2 * 2 * num_tokens * d + 2 * 2 * text_len * d  # attention scores and weighted sums
    return cfg["depth"] * per_block
