"""Analytic FLOP count of one forward of our DiT (dit/models/dit.py): matmuls only, 2*m*n*k each (a multiply-add is
two FLOPs), as ``torch.utils.flop_counter.FlopCounterMode`` counts them (tests/test_bench.py checks the two agree).

For a batch of B latent grids (t, h, w) and patch (pt, ph, pw): N = (t/pt)(h/ph)(w/pw) image tokens, L text tokens,
D hidden size, F = int(D * mlp_ratio), P = C*pt*ph*pw values per patch, Dt text width, E = 256 timestep features:

    embed   = 2BNPD  +  2B(ED + D^2)  +  2BL(Dt*D + D^2)  +  2B(Dt*D + D^2)
              patch     timestep MLP     text tokens MLP     pooled text MLP
    block   = 2B*6D^2                                  adaLN modulation (per sample, not per token)
            + 2BN*4D^2 + 4BN^2*D                       self-attention: q, kv, out; QK^T and softmax(.)V
            + 2BN*2D^2 + 2BL*2D^2 + 4BNL*D             cross-attention: q, out on image tokens; kv on text; QK^T, .V
            + 4BN*D*F                                  MLP (fc1, fc2)
    final   = 2B*2D^2 + 2BN*D*P                        adaLN, linear
    forward = embed + depth * block + final

The patch embed's input P also counts ``condition_channels`` (image-to-video) where the config has them.
Masked text keys are computed all the same (L is the padded length). Norms, RoPE, softmax, GELU and the modulation
are elementwise and not counted. A training step counts 3 x forward (backward = 2 x forward: each matmul's input and
weight gradients), the usual MFU convention (Kaplan et al.; PaLM); the real backward is a little less (the patch
embed needs no input gradient) and activation checkpointing's recomputation is not counted (useful work only).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils import flop_counter

from dit.models.presets import PRESETS

TIMESTEP_FEATURES = 256  # TimestepEmbedder's freq_dim


def dit_config(preset: str, in_channels: int = 4, text_dim: int = 384, mlp_ratio: float = 4.0,
               **overrides: Any) -> dict[str, Any]:
    """A DiT(**config) keyword dict for a preset (as ``DiT.config`` holds it); overrides replace preset sizes."""
    p = dict(PRESETS[preset])
    p.update(overrides)
    return dict(in_channels=in_channels, text_dim=text_dim, hidden_size=p["hidden_size"], depth=p["depth"],
                num_heads=p["num_heads"], patch_size=list(p["patch_size"]), mlp_ratio=mlp_ratio)


def _config(model_or_cfg: nn.Module | Mapping[str, Any]) -> Mapping[str, Any]:
    cfg = model_or_cfg.config if isinstance(model_or_cfg, nn.Module) else model_or_cfg
    missing = {"in_channels", "text_dim", "hidden_size", "depth", "patch_size", "mlp_ratio"} - set(cfg)
    if missing:
        raise ValueError(f"a DiT config needs {sorted(missing)} (see dit_config / DiT.config)")
    return cfg


def dit_flops_breakdown(model_or_cfg: nn.Module | Mapping[str, Any], latent_shape: tuple[int, int, int],
                        text_len: int, batch: int = 1) -> dict[str, int]:
    """Forward FLOPs by part (embed, adaln, self_attn_proj, self_attn_scores, cross_attn_proj, cross_attn_scores,
    mlp, final) for ``batch`` latents of grid ``latent_shape`` = (t, h, w) and ``text_len`` text tokens."""
    cfg = _config(model_or_cfg)
    t, h, w = latent_shape
    pt, ph, pw = cfg["patch_size"]
    if t % pt or h % ph or w % pw:
        raise ValueError(f"latent grid {latent_shape} is not divisible by the patch size {tuple(cfg['patch_size'])}")
    B, L, D, Dt, E = batch, text_len, cfg["hidden_size"], cfg["text_dim"], TIMESTEP_FEATURES
    N = (t // pt) * (h // ph) * (w // pw)
    P = cfg["in_channels"] * pt * ph * pw
    P_in = P + cfg.get("condition_channels", 0) * pt * ph * pw  # image-to-video: the condition's channels too
    F = int(D * cfg["mlp_ratio"])
    depth = cfg["depth"]
    return {
        "embed": 2 * B * N * P_in * D + 2 * B * (E * D + D * D) + 2 * B * L * (Dt * D + D * D)
        + 2 * B * (Dt * D + D * D),
        "adaln": depth * 2 * B * 6 * D * D + 2 * B * 2 * D * D,
        "self_attn_proj": depth * 2 * B * N * 4 * D * D,
        "self_attn_scores": depth * 4 * B * N * N * D,
        "cross_attn_proj": depth * (2 * B * N * 2 * D * D + 2 * B * L * 2 * D * D),
        "cross_attn_scores": depth * 4 * B * N * L * D,
        "mlp": depth * 4 * B * N * D * F,
        "final": 2 * B * N * D * P,
    }


def dit_forward_flops(model_or_cfg: nn.Module | Mapping[str, Any], latent_shape: tuple[int, int, int],
                      text_len: int, batch: int = 1) -> int:
    """FLOPs of one forward of our DiT (a model or its config dict) on ``batch`` latents of grid (t, h, w)."""
    return sum(dit_flops_breakdown(model_or_cfg, latent_shape, text_len, batch).values())


def train_step_flops(model_or_cfg: nn.Module | Mapping[str, Any], latent_shape: tuple[int, int, int],
                     text_len: int, batch: int = 1) -> int:
    """FLOPs of one training step (forward + backward) = 3 x the forward count; the optimizer is not counted."""
    return 3 * dit_forward_flops(model_or_cfg, latent_shape, text_len, batch)


def _sdpa_cpu_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward_flops(grad_out_shape: Any, query_shape: Any, key_shape: Any, value_shape: Any,
                             *args: Any, **kwargs: Any) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# FlopCounterMode counts the CUDA SDPA kernels but not the CPU flash kernel (torch 2.x): count it the same way.
_CPU_SDPA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
             torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flops}


def counted_flops(fn: Callable[[], Any]) -> tuple[int, Any]:
    """Run ``fn()`` under FlopCounterMode (CPU SDPA included); returns (total FLOPs, fn's result)."""
    with flop_counter.FlopCounterMode(display=False, custom_mapping=dict(_CPU_SDPA)) as counter:
        out = fn()
    return int(counter.get_total_flops()), out


def counted_forward_flops(model: nn.Module, *args: Any, **kwargs: Any) -> int:
    """FlopCounterMode's count of one ``model(*args, **kwargs)`` forward, without autograd."""
    with torch.no_grad():
        return counted_flops(partial(model, *args, **kwargs))[0]
