"""Reading a local diffusers model folder (a pipeline's ``transformer/`` or ``vae/``) and checking it before any
work: it exists, holds a config.json of the expected class, and safetensors weights. One reader for the transformer
families (model.pretrained) and the VAE families (vae.pretrained), so both name the path and the fix alike.
Torch-free (dit.config calls it)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from data_pipelines.config import ConfigError

if TYPE_CHECKING:
    import torch


def read_diffusers_folder(path: str | os.PathLike, *, key: str, class_name: str, subfolder: str,
                          family_key: str, family: str, family_of_class: dict[str, str]) -> dict[str, Any]:
    """config.json of ``path``, a diffusers ``class_name`` folder. ``key`` is the setting that named the path
    (model.pretrained), ``subfolder`` the pipeline subfolder such models live in (transformer), ``family_key`` /
    ``family`` the setting that chose the class; ``family_of_class`` maps other classes to their family for the hint.
    FileNotFoundError for a missing folder, ConfigError for everything else."""
    p = Path(path)
    example = f".../Wan2.1-T2V-1.3B-Diffusers/{subfolder}"
    if not p.is_dir():
        raise FileNotFoundError(f"{key}: {str(p)!r} does not exist; point it at a local diffusers {subfolder} folder "
                                f"(config.json + *.safetensors), e.g. {example}")
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        hint = (f"; this looks like a diffusers pipeline: use {key}={p / subfolder}"
                if (p / "model_index.json").is_file() else
                f"; point it at the {subfolder}/ subfolder of a diffusers {family} pipeline")
        raise ConfigError(f"{key}: {str(p)!r} is not a diffusers model folder (no config.json){hint}")
    try:
        config = json.loads(cfg_file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{key}: {str(cfg_file)!r} is not valid JSON ({e}); point it at a diffusers "
                          f"{subfolder} folder") from None
    found = config.get("_class_name") if isinstance(config, dict) else None
    if found != class_name:
        other = family_of_class.get(found or "")
        fix = f"set {family_key}={other}" if other else f"point {key} at a {class_name} folder"
        what = found or "model config of no _class_name (not a diffusers model: a transformers one?)"
        raise ConfigError(f"{key}: {str(p)!r} holds a {what}, but {family_key}={family} needs a {class_name}; {fix}")
    if not any(p.glob("*.safetensors")):
        raise ConfigError(f"{key}: {str(p)!r} has no *.safetensors weights (pickled .bin weights are not loaded); "
                          "save the model with save_pretrained(..., safe_serialization=True)")
    return config


DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}  # text.dtype / vae.dtype: bytes per frozen parameter


def frozen_dtype(name: str) -> torch.dtype:
    """The torch dtype of a text.dtype / vae.dtype setting (fp32, bf16, fp16)."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
