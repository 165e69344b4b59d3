"""`dit lora merge RUN --out DIR`: a LoRA run's adapter merged into its base (alpha / rank applied once, times
--scale), or with `--lora FILE` another adapter (any layout `dit sample --lora` reads) merged into RUN, written as a
normal checkpoint directory (model.safetensors + config.json + vae/ + manifest) that `dit
sample`, `train.init_from` and any tool reading our exports load without the base or peft."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from data_pipelines.config import ConfigError
from dit.export import resolve_checkpoint, write_export
from dit.fileio import publish
from dit.weights import checkpoint_weights


def merge_lora_run(run: str | Path, out: str | Path, scale: float = 1.0, lora: str | Path | None = None) -> Path:
    """Merge the newest intact checkpoint of ``run`` (or that checkpoint) into ``out``; returns ``out``. ``lora``: an
    adapter of any layout `dit sample --lora` reads, merged at ``scale`` into ``run`` (any checkpoint; a LoRA run's own
    adapter merged first, at 1)."""
    out = Path(out)
    if out.exists():
        raise ConfigError(f"--out {str(out)!r} exists; give a new directory")
    if lora is not None and not Path(lora).exists():
        raise ConfigError(f"--lora {str(lora)!r} does not exist: give a LoRA run, checkpoint directory or .safetensors "
                          "file")
    ckpt = resolve_checkpoint(run)
    if lora is None and "lora" not in json.loads((ckpt / "config.json").read_text()):
        raise ConfigError(f"{ckpt} is not a LoRA checkpoint (its config has no lora record): nothing to merge (to "
                          "merge another adapter into it, give --lora FILE)")
    if lora is None:
        weights, config = checkpoint_weights(ckpt, own_scale=scale)  # base + scale * (alpha / rank) B A
    else:
        weights, config = checkpoint_weights(ckpt, lora=lora, lora_scale=scale)
    tmp = out.parent / f".tmp-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_export(tmp, weights=weights, config=config, vae_dir=ckpt / "vae")
    publish(tmp, out)
    return out
