"""Low-rank adapters on a denoiser, in diffusers' LoRA file format.

Training injects peft's LoRA layers (``inject_lora``): each targeted ``nn.Linear`` W gets W x + (alpha / r) B A x, B
starting at zero so the adapted model starts equal to the base. Only A and B train and are saved.

The adapter file (``pytorch_lora_weights.safetensors``, diffusers' default name) is what diffusers' pipelines write
with ``save_lora_weights``: keys ``transformer.<module>.lora_A.weight`` / ``lora_B.weight`` and, in the safetensors
metadata under ``lora_adapter_metadata``, the peft LoraConfig with ``transformer.`` prefixed keys (r, lora_alpha,
target_modules, ...). So for the wan / cogvideox / ltx families, diffusers' ``load_lora_adapter`` and
``load_lora_weights`` load it; our DiT's adapters use the same layout under its own module names.

Inference never needs peft: ``merge_lora`` adds (scale · alpha / r) B A into the base weights.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE: load_lora_weights(dir) finds it
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
PREFIX = "transformer."
ADAPTER = "default"  # the peft adapter name while training

# Every block's attention q/k/v/out and MLP projections (full-match regexes on the denoiser's module names); Wan 2.1
# I2V's image key / value projections in its cross-attention too.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "dit": [r"blocks\.\d+\.(attn|cross)\.(q|kv|proj)", r"blocks\.\d+\.mlp\.(fc1|fc2)"],
    "wan": [r"transformer\.blocks\.\d+\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0|add_k_proj|add_v_proj)",
            r"transformer\.blocks\.\d+\.ffn\.net\.(0\.proj|2)"],
    "cogvideox": [r"transformer\.transformer_blocks\.\d+\.attn1\.(to_q|to_k|to_v|to_out\.0)",
                  r"transformer\.transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)"],
    "ltx": [r"transformer\.transformer_blocks\.\d+\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)",
            r"transformer\.transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)"],
    # HunyuanVideo: both streams of the dual-stream blocks, and the single-stream blocks' q/k/v, MLP-in and output
    "hunyuan": [r"transformer\.transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|"
                r"add_v_proj|to_add_out)",
                r"transformer\.transformer_blocks\.\d+\.(ff|ff_context)\.net\.(0\.proj|2)",
                r"transformer\.single_transformer_blocks\.\d+\.(attn\.to_q|attn\.to_k|attn\.to_v|proj_mlp|proj_out)"],
}
DEFAULT_TARGETS["flux"] = DEFAULT_TARGETS["hunyuan"]  # FLUX.1's blocks: the same modules under the same names
# Z-Image: every layer's attention and SwiGLU, the refiners' too
DEFAULT_TARGETS["zimage"] = [r"transformer\.(layers|noise_refiner|context_refiner)\.\d+\.attention\.(to_q|to_k|to_v|"
                             r"to_out\.0)",
                             r"transformer\.(layers|noise_refiner|context_refiner)\.\d+\.feed_forward\.(w1|w2|w3)"]
# HunyuanVideo 1.5: both streams' attention and MLPs of its dual-stream blocks
DEFAULT_TARGETS["hunyuan15"] = [r"transformer\.transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|"
                                r"add_k_proj|add_v_proj|to_add_out)",
                                r"transformer\.transformer_blocks\.\d+\.(ff|ff_context)\.net\.(0\.proj|2)"]
# Qwen-Image: both streams' attention and MLPs of its joint blocks
DEFAULT_TARGETS["qwenimage"] = [r"transformer\.transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|"
                                r"add_k_proj|add_v_proj|to_add_out)",
                                r"transformer\.transformer_blocks\.\d+\.(img_mlp|txt_mlp)\.net\.(0\.proj|2)"]
# SD3: both streams' attention (SD3.5's second self-attention attn2 too) and MLPs of its joint blocks
DEFAULT_TARGETS["sd3"] = [r"transformer\.transformer_blocks\.\d+\.(attn|attn2)\.(to_q|to_k|to_v|to_out\.0|add_q_proj|"
                          r"add_k_proj|add_v_proj|to_add_out)",
                          r"transformer\.transformer_blocks\.\d+\.(ff|ff_context)\.net\.(0\.proj|2)"]


def family_of(model: nn.Module) -> str:
    return getattr(model, "family", None) or model.config.get("family", "dit")


def target_modules(model: nn.Module, targets: list[str] | None = None) -> list[str]:
    """Names of the ``nn.Linear`` modules of ``model`` that ``targets`` (regexes, full match; None: the family's
    defaults) select; a pattern that selects nothing is an error naming it."""
    patterns = targets or DEFAULT_TARGETS[family_of(model)]
    unused = set(getattr(model, "unused_linears", ()))  # (layers whose output nothing reads: Qwen-Image's last text)
    linear = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name not in unused]
    chosen: list[str] = []
    for pattern in patterns:
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"train.lora.targets: {pattern!r} is not a regular expression ({e})") from None
        hits = [n for n in linear if rx.fullmatch(n)]
        if not hits:
            example = ", ".join(linear[:4])
            raise ValueError(f"train.lora.targets: {pattern!r} matches no linear layer of this model (names look "
                             f"like {example}, ...)")
        chosen += [n for n in hits if n not in chosen]
    return chosen


def inject_lora(model: nn.Module, rank: int, alpha: float | None = None, dropout: float = 0.0,
                targets: list[str] | None = None) -> list[str]:
    """Add peft LoRA layers to the selected linear layers, freeze everything else; returns the module names."""
    from peft import LoraConfig, inject_adapter_in_model

    names = target_modules(model, targets)
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, lora_dropout=dropout,
                        target_modules=names)
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for name, p in model.named_parameters():
        p.requires_grad_(is_lora_key(name))
    return names


def is_lora_key(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key


def adapter_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter of a peft-injected state dict in file form: ``<module>.lora_A.weight`` (no adapter name)."""
    return {k.replace(f".{ADAPTER}.", "."): v for k, v in state.items() if is_lora_key(k)}


def write_lora_file(path: str | Path, adapter: dict[str, torch.Tensor], *, family: str, rank: int, alpha: float,
                    modules: list[str], dropout: float = 0.0) -> None:
    """``adapter`` (our module names, file form) as diffusers' pipeline LoRA file: keys and metadata prefixed with
    ``transformer.`` relative to diffusers' transformer (for a family, our names already start with it)."""
    def rel(name: str) -> str:  # our name -> the name inside diffusers' transformer (families) or our DiT
        return name[len(PREFIX):] if family != "dit" and name.startswith(PREFIX) else name

    tensors = {PREFIX + rel(k): v.detach().contiguous().cpu() for k, v in adapter.items()}
    config = {"r": rank, "lora_alpha": alpha, "lora_dropout": dropout,
              "target_modules": sorted(rel(m) for m in modules),
              "bias": "none", "use_dora": False, "use_rslora": False, "init_lora_weights": True}
    metadata = {"format": "pt", METADATA_KEY: json.dumps({f"transformer.{k}": v for k, v in config.items()},
                                                         indent=2, sort_keys=True)}
    save_file(tensors, str(path), metadata=metadata)


def read_lora_file(path: str | Path, family: str,
                   key: str = "--lora") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(adapter in our module names, file form; its config: r, lora_alpha) from a LoRA file: dit's or diffusers' own,
    or another tool's layout that diffusers converts for this family (dit/lora_import.py); errors name ``key``."""
    from dit.lora_import import read_adapter_file

    return read_adapter_file(path, family, PREFIX if family != "dit" else "", key)


@torch.no_grad()
def merge_lora(weights: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor],
               scale: float) -> dict[str, torch.Tensor]:
    """Plain weights with each adapted module's W += scale · B A (scale = lora scale · alpha / r, applied once), and
    its bias += scale · lora_B's bias where the adapter has one (peft's lora_bias; other tools' ``diff_b``).
    ``adapter``: file form; a module whose shapes do not fit the base is an error naming it."""
    merged = dict(weights)
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in adapter})
    for m in modules:
        key = f"{m}.weight"
        if key not in merged:
            raise ValueError(f"the adapter has {m!r}, which the base model does not have: an adapter for another "
                             "model (check the base it was trained from)")
        bias = adapter.get(f"{m}.lora_B.bias")
        if bias is not None:
            if merged.get(f"{m}.bias") is None or merged[f"{m}.bias"].shape != bias.shape:
                raise ValueError(f"the adapter's {m!r} has a bias of {tuple(bias.shape)}, which the base layer does "
                                 "not have: an adapter for another model")
            merged[f"{m}.bias"] = (merged[f"{m}.bias"].double() + scale * bias.double()).to(merged[f"{m}.bias"].dtype)
        a, b = adapter.get(f"{m}.lora_A.weight"), adapter.get(f"{m}.lora_B.weight")
        if a is None and b is None and bias is not None:
            continue  # a bias-only entry
        if a is None or b is None:
            raise ValueError(f"the adapter's {m!r} has {'lora_B' if a is None else 'lora_A'} without "
                             f"{'lora_A' if a is None else 'lora_B'}: a torn or partial adapter file")
        w = merged[key]
        if b.shape[0] != w.shape[0] or a.shape[1] != w.shape[1] or a.shape[0] != b.shape[1]:
            raise ValueError(f"the adapter's {m!r} is {b.shape[0]}x{a.shape[1]} (rank {a.shape[0]}) but the base "
                             f"weight is {w.shape[0]}x{w.shape[1]}: an adapter for another model")
        merged[key] = (w.double() + scale * (b.double() @ a.double())).to(w.dtype)
    return merged
