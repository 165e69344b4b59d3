"""LoRA files written by other tools, read as our adapter (file form: ``<module>.lora_A.weight`` / ``lora_B.weight``,
our module names) for `dit sample --lora` and `train.lora.init_from`.

A file without diffusers' metadata is handed to diffusers' own converter for the family (its
``<Family>LoraLoaderMixin.lora_state_dict``, what ``pipe.load_lora_weights`` runs): ComfyUI's and the original
checkpoints' module names (``diffusion_model.blocks.0.self_attn.q``), musubi-tuner's and kohya's (``lora_unet_...``),
HunyuanVideo's original names, FLUX.1's kohya / XLabs files. Those converters fold each module's alpha / rank into its
weights, so what comes back merges at scale 1. A file with metadata keeps it (rank, alpha), with peft's per-module
``rank_pattern`` / ``alpha_pattern`` and ``use_rslora`` folded in the same way.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from data_pipelines.config import ConfigError

log = logging.getLogger("dit.lora")

# model.family -> diffusers' LoRA loader of its pipelines (HunyuanVideo 1.5 has none: diffusers' own layout only)
LOADERS = {"wan": "WanLoraLoaderMixin", "cogvideox": "CogVideoXLoraLoaderMixin", "ltx": "LTXVideoLoraLoaderMixin",
           "hunyuan": "HunyuanVideoLoraLoaderMixin", "flux": "FluxLoraLoaderMixin", "sd3": "SD3LoraLoaderMixin",
           "zimage": "ZImageLoraLoaderMixin", "qwenimage": "QwenImageLoraLoaderMixin"}
TEXT_PREFIXES = ("text_encoder", "te_", "te1_", "te2_", "lora_te")  # adapters of a text encoder, not the denoiser
KINDS = (".lora_A.weight", ".lora_B.weight", ".lora_B.bias")  # what a converted adapter may hold per module


def read_adapter_file(path: str | Path, family: str, prefix: str,
                      key: str = "--lora") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(adapter with keys ``prefix + <diffusers module>`` in file form, {"r", "lora_alpha"} to merge it with) from a
    LoRA file of any layout this family's diffusers loader reads; ConfigError naming ``key`` (the flag or config key
    that gave the file), the file and the fix."""
    from dit.models.lora import METADATA_KEY

    try:
        with safe_open(str(path), framework="pt") as f:
            raw_meta = (f.metadata() or {}).get(METADATA_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors' own error type: a pickle (.pt / .ckpt), a torn download, not a file
        raise ConfigError(f"{key} {path}: not a readable .safetensors file ({type(e).__name__}: {e}); LoRA files are "
                          "read as safetensors only (no pickles): convert it, or download the .safetensors") from None
    dora = [k for k in tensors if "dora_scale" in k or "lora_magnitude_vector" in k]
    if dora:
        raise ConfigError(f"{key} {path}: a DoRA adapter ({dora[0]}); dit applies plain LoRA (W + scale B A), which "
                          "would give another model: merge it with the tool that trained it")
    if raw_meta is not None:
        meta = {k[len("transformer."):]: v for k, v in json.loads(raw_meta).items() if k.startswith("transformer.")}
        return _with_metadata(path, tensors, meta, prefix, key)
    if family == "dit":
        raise ConfigError(f"{key} {path}: no {METADATA_KEY} in its metadata (rank, alpha, targets): adapters of "
                          "our DiT are the files dit writes (a LoRA run's pytorch_lora_weights.safetensors)")
    converted = _convert(path, tensors, family, key)
    text = sorted(k for k in converted if k.startswith(TEXT_PREFIXES))
    if text:  # (the denoiser's part still applies; the frozen text encoder is not adapted)
        log.warning("%s %s: %d tensors adapt a text encoder (%s, ...); only the denoiser's part is applied", key, path,
                    len(text), text[0])
    converted = {k: v for k, v in converted.items() if not k.startswith(TEXT_PREFIXES)}
    if any(k.startswith("transformer.") for k in converted):  # (a file of the denoiser alone may lack the prefix)
        converted = {k[len("transformer."):]: v for k, v in converted.items() if k.startswith("transformer.")}
    adapter = _fold_alphas(path, converted, key)
    if not adapter:
        raise ConfigError(f"{key} {path}: no adapter of the {family} denoiser in it (keys like "
                          f"{sorted(tensors)[:2]}): a LoRA for another model, or a layout diffusers does not convert")
    ranks = {v.shape[0] for k, v in adapter.items() if k.endswith(".lora_A.weight")}
    rank = max(ranks, default=1)
    log.info("%s %s: converted by diffusers' %s loader (%d modules, rank %s)", key, path, LOADERS.get(family, "-"),
             len({k.rsplit(".lora_", 1)[0] for k in adapter}), "/".join(map(str, sorted(ranks))) or "-")
    return {prefix + k: v for k, v in adapter.items()}, {"r": rank, "lora_alpha": rank}  # (alphas folded: scale 1)


def _convert(path: str | Path, tensors: dict[str, torch.Tensor], family: str, key: str) -> dict[str, torch.Tensor]:
    """The file's tensors in diffusers' LoRA layout, by the family's diffusers loader (None: as they are)."""
    name = LOADERS.get(family)
    if name is None:
        return tensors
    import diffusers.loaders

    loader = getattr(diffusers.loaders, name)
    kwargs = {"return_alphas": True} if family == "flux" else {}  # (FLUX: alphas of diffusers-layout files, apart)
    try:
        out = loader.lora_state_dict(dict(tensors), **kwargs)
    except Exception as e:  # a converter meeting a layout it half-knows: KeyError, ValueError, ...
        raise ConfigError(f"{key} {path}: diffusers' {family} LoRA converter ({name}) cannot read it "
                          f"({type(e).__name__}: {e}); it reads diffusers', ComfyUI's, musubi-tuner's and kohya's "
                          "layouts of this family's adapters") from None
    if isinstance(out, tuple):
        state, alphas = out[0], out[1] or {}
        return {**state, **{k if k.endswith(".alpha") else f"{k}.alpha": v for k, v in alphas.items()}}
    return out


def _fold_alphas(path: str | Path, state: dict[str, torch.Tensor], key: str) -> dict[str, torch.Tensor]:
    """Remaining ``<module>.alpha`` entries folded into the module's A (alpha / rank); any other key kind refused."""
    alphas = {k[:-len(".alpha")]: float(v) for k, v in state.items() if k.endswith(".alpha")}
    adapter = {k: v for k, v in state.items() if not k.endswith(".alpha")}
    other = sorted(k for k in adapter if not k.endswith(KINDS))
    if other:
        raise ConfigError(f"{key} {path}: {len(other)} tensors are not LoRA weights dit can merge ({other[0]}, ...; "
                          f"it merges {', '.join(KINDS)} after conversion)")
    for module, alpha in alphas.items():
        a = adapter.get(f"{module}.lora_A.weight")
        if a is not None:
            adapter[f"{module}.lora_A.weight"] = a * (alpha / a.shape[0])
    return adapter


def _with_metadata(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any], prefix: str,
                   key: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A file written by dit or diffusers' save_lora_weights: its config as the merge scale; per-module ranks or alphas
    (peft's rank_pattern / alpha_pattern) and rsLoRA's alpha / sqrt(r) folded into A, the scale then 1."""
    if meta.get("use_dora"):
        raise ConfigError(f"{key} {path}: a DoRA adapter (use_dora in its metadata); dit merges plain LoRA only")
    adapter = {prefix + k[len("transformer."):]: v for k, v in tensors.items() if k.startswith("transformer.")}
    patterns = meta.get("alpha_pattern") or meta.get("rank_pattern")
    if not patterns and not meta.get("use_rslora"):
        return adapter, meta
    import re

    alpha_pattern = meta.get("alpha_pattern") or {}
    for name, a in list(adapter.items()):
        if not name.endswith(".lora_A.weight"):
            continue
        module, r = name[len(prefix):-len(".lora_A.weight")], a.shape[0]
        alpha = next((v for p, v in alpha_pattern.items() if re.fullmatch(f"(.*\\.)?(?:{p})", module)),
                     meta["lora_alpha"])  # (peft's match of a pattern key: the name's tail)
        adapter[name] = a * (alpha / (math.sqrt(r) if meta.get("use_rslora") else r))
    return adapter, {**meta, "r": 1, "lora_alpha": 1}
