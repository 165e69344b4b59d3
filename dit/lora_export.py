"""`dit lora export RUN --out FILE`: a LoRA run's adapter in the layout ComfyUI loads for Wan models: the original
Wan checkpoint's module names under ``diffusion_model.`` (``blocks.0.self_attn.q``, not diffusers'
``blocks.0.attn1.to_q``), ``lora_down`` / ``lora_up`` weights and an ``alpha`` per module (the update is
alpha / rank x up @ down). It is the layout diffusers' Wan loader converts on load (``load_lora_weights``), and
what ComfyUI writes and reads for its own Wan models; the checkpoint's ``pytorch_lora_weights.safetensors`` stays
diffusers' layout.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from data_pipelines.config import ConfigError
from dit.export import resolve_checkpoint
from dit.fileio import atomic_file
from dit.models.lora import LORA_FILE, PREFIX, read_lora_file

# diffusers' WanTransformer3DModel block module -> the original Wan checkpoint's (ComfyUI's) name
WAN_ORIGINAL = {"attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
                "attn1.to_out.0": "self_attn.o", "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k",
                "attn2.to_v": "cross_attn.v", "attn2.to_out.0": "cross_attn.o", "attn2.add_k_proj": "cross_attn.k_img",
                "attn2.add_v_proj": "cross_attn.v_img", "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2"}
FORMATS = ("comfyui",)


def comfyui_name(module: str) -> str:
    """A Wan module's diffusers name (``blocks.3.attn1.to_q``) -> its ComfyUI key stem
    (``diffusion_model.blocks.3.self_attn.q``); ConfigError for a module outside the blocks' table."""
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", module)
    if m is None or m.group(2) not in WAN_ORIGINAL:
        raise ConfigError(f"the adapter has {module!r}, which has no name in ComfyUI's Wan layout (it covers the "
                          f"blocks' {', '.join(WAN_ORIGINAL)}): export the default targets, or use the diffusers "
                          f"file {LORA_FILE}")
    return f"diffusion_model.blocks.{m.group(1)}.{WAN_ORIGINAL[m.group(2)]}"


def export_lora(run: str | Path, out: str | Path, fmt: str = "comfyui") -> Path:
    """Write the adapter of ``run``'s newest intact checkpoint (or that checkpoint) as ``fmt`` to ``out``."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out {str(out)!r}: write a .safetensors file")
    ckpt = resolve_checkpoint(run)
    config = json.loads((ckpt / "config.json").read_text())
    family = config.get("dit", {}).get("family", "dit")
    if "lora" not in config or not (ckpt / LORA_FILE).is_file():
        raise ConfigError(f"{ckpt} is not a LoRA checkpoint (no {LORA_FILE}): nothing to export")
    if family != "wan":
        raise ConfigError(f"--format comfyui is written for Wan models; this adapter is for model.family={family}: "
                          f"use its diffusers file {ckpt / LORA_FILE}")
    adapter, meta = read_lora_file(ckpt / LORA_FILE, family)
    alpha = torch.tensor(float(meta["lora_alpha"]))
    tensors: dict[str, torch.Tensor] = {}
    for module in sorted({k.rsplit(".lora_", 1)[0] for k in adapter}):
        stem = comfyui_name(module[len(PREFIX):])
        tensors[f"{stem}.lora_down.weight"] = adapter[f"{module}.lora_A.weight"].contiguous()
        tensors[f"{stem}.lora_up.weight"] = adapter[f"{module}.lora_B.weight"].contiguous()
        tensors[f"{stem}.alpha"] = alpha.clone()
    if out.exists():
        raise ConfigError(f"--out {str(out)!r} exists; give a new file")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as tmp:  # (whole or not at all)
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    return out
