"""Checkpoint exports: what inference loads, with no training state (read by `dit sample`, written by training).

    RUN_DIR/checkpoints/step-00000200/
        model.safetensors      the EMA weights
        config.json            {"dit": the DiT constructor arguments, "experiment": the experiment config}
        vae/                   the frozen VAE (vae.safetensors + vae.json), so a checkpoint is self-contained; for a
                               pretrained family only vae.json {family, pretrained (absolute), tiling}: the diffusers
                               folder is read from there (dit/models/vae.py: export_vae, load_vae)

A checkpoint directory counts only once it is complete (renamed into place with weights and config); the
training state beside it (dit/training/checkpoint.py) is not needed to sample.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

if TYPE_CHECKING:
    from dit.config import VAEConfig

CKPT_PREFIX = "step-"


def write_export(ckpt: Path, *, weights: dict[str, torch.Tensor], config: dict[str, Any],
                 vae_dir: str | Path | None = None, vae: VAEConfig | None = None) -> None:
    """The inference export: model.safetensors + config.json (+ the VAE: ``vae``, the experiment's VAE config,
    recorded by export_vae; or ``vae_dir``, our CausalVAE's folder, copied), what `dit sample` loads."""
    bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise RuntimeError(f"refusing to write a checkpoint with non-finite weights in {bad[:5]}")
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, ckpt / "model.safetensors")
    (ckpt / "config.json").write_text(json.dumps(config, indent=2))
    if vae is not None:
        from dit.models.vae import export_vae

        export_vae(vae, ckpt / "vae")
    elif vae_dir is not None:
        shutil.copytree(vae_dir, ckpt / "vae")


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints (renamed into place, with weights and config), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CKPT_PREFIX)
            and p.name[len(CKPT_PREFIX):].isdigit()
            and (p / "model.safetensors").is_file() and (p / "config.json").is_file()]
    return sorted(done, key=lambda p: int(p.name[len(CKPT_PREFIX):]))


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory itself, or the newest complete checkpoint of a training output directory."""
    p = Path(path)
    if (p / "model.safetensors").is_file() and (p / "config.json").is_file():
        return p
    found = list_checkpoints(p)
    if not found:
        raise FileNotFoundError(f"no complete checkpoint in {str(p)!r}: pass a training output directory "
                                "(train.output_dir) or a checkpoint directory holding model.safetensors + config.json")
    return found[-1]


def load_weights(ckpt: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The exported weights and config.json of a checkpoint directory."""
    ckpt = Path(ckpt)
    return load_file(ckpt / "model.safetensors"), json.loads((ckpt / "config.json").read_text())
