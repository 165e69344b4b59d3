"""Plain denoiser weights from anything a run can start from or sample: a checkpoint export of ours (a LoRA run's
adapter merged into the base it recorded), or a family's diffusers transformer folder. Used by `dit sample`, `dit
lora merge` and `train.init_from`; reads exports and folders, never training state.

A LoRA checkpoint's config.json holds ``"lora": {"rank", "alpha", "modules", "base": {"init_from" | "pretrained":
absolute path}}``; its model.safetensors holds the (EMA) adapter, also written as pytorch_lora_weights.safetensors in
diffusers' format (dit/models/lora.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from data_pipelines.config import ConfigError
from dit.export import load_weights, resolve_checkpoint
from dit.models.lora import LORA_FILE, adapter_weights, merge_lora, read_lora_file


def is_diffusers_folder(path: str | Path) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return "_class_name" in json.loads(cfg.read_text())
    except ValueError:
        return False


def folder_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """A family's diffusers transformer folder as our state dict (keys ``transformer.<diffusers name>``)."""
    from dit.models.diffusers_folder import read_diffusers_folder
    from dit.models.families import FAMILIES, family_of_class

    config = json.loads((Path(folder) / "config.json").read_text())
    family = family_of_class(config.get("_class_name"))
    if family is None:
        raise ConfigError(f"{folder}: a {config.get('_class_name')}, not the transformer of a model family this "
                          f"version knows ({', '.join(c.class_name for c in FAMILIES.values())})")
    cls = FAMILIES[family]
    read_diffusers_folder(folder, key="train.init_from", class_name=cls.class_name, subfolder="transformer",
                          family_key="model.family", family=family, family_of_class={})
    model = cls.transformer_class().from_pretrained(str(folder), use_safetensors=True, local_files_only=True)
    return {f"transformer.{k}": v for k, v in model.state_dict().items()}


def base_weights(base: dict[str, str]) -> dict[str, torch.Tensor]:
    """The weights a LoRA run was trained on, from its recorded base."""
    path = base.get("init_from") or base.get("pretrained")
    if path is None:
        raise ConfigError(f"a LoRA checkpoint records no base ({base}); it cannot be sampled")
    if not Path(path).is_dir():
        raise FileNotFoundError(f"the base of this LoRA checkpoint, {path!r}, is gone: restore it there, or sample "
                                "with `dit sample --checkpoint BASE --lora RUN`")
    if is_diffusers_folder(path):
        return folder_weights(path)
    weights, _ = checkpoint_weights(path)
    return weights


def checkpoint_weights(path: str | Path, lora: str | Path | None = None, lora_scale: float = 1.0,
                       own_scale: float = 1.0) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(plain weights, config.json) of a run or checkpoint directory; a LoRA run's adapter is merged into its base
    at ``own_scale``. ``lora``: another LoRA run or checkpoint (or its adapter file) applied on top at
    ``lora_scale``."""
    ckpt = resolve_checkpoint(path)
    weights, config = load_weights(ckpt)
    record = config.get("lora")
    if record is not None:
        weights = merge_lora(base_weights(record["base"]), adapter_weights(weights),
                             own_scale * record["alpha"] / record["rank"])
        config = {k: v for k, v in config.items() if k != "lora"}
    if lora is not None:
        weights = with_lora(weights, config, lora, lora_scale)
    return weights, config


def with_lora(weights: dict[str, torch.Tensor], config: dict[str, Any], lora: str | Path,
              lora_scale: float) -> dict[str, torch.Tensor]:
    """``weights`` (of the model ``config`` describes) with the adapter of ``lora`` (a LoRA run, checkpoint or
    adapter file of any layout dit/lora_import.py reads) merged at ``lora_scale``."""
    adapter, meta = adapter_of(lora, config["dit"].get("family", "dit"))
    try:
        return merge_lora(weights, adapter, lora_scale * meta["lora_alpha"] / meta["r"])
    except ConfigError:
        raise
    except ValueError as e:  # (a shape or module the base lacks: the user's file, not a bug)
        raise ConfigError(f"--lora {lora}: {e}") from None


def adapter_of(path: str | Path, family: str, key: str = "--lora") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(adapter, its config) from a LoRA file, or from the newest checkpoint of a LoRA run / a LoRA checkpoint;
    errors name ``key`` (the flag or config key that gave ``path``)."""
    p = Path(path)
    if p.is_dir():
        ckpt = resolve_checkpoint(p)
        p = ckpt / LORA_FILE
        if not p.is_file():
            raise ConfigError(f"{key} {path}: {ckpt} holds no adapter ({LORA_FILE}): not a LoRA run (train.lora.rank "
                              "was 0)")
    return read_lora_file(p, family, key)
