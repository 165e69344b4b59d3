"""Atomic checkpoints: written to a temporary directory, flushed, then renamed; a half-written one is never used.

    RUN_DIR/checkpoints/step-00000200/
        model.safetensors      EMA weights (what `dit sample` loads)
        config.json            the experiment config + the DiT constructor arguments
        vae/                   the frozen VAE (vae.safetensors + vae.json), so a checkpoint is self-contained
        training_state.pt      raw weights, optimizer, LR scheduler, EMA, RNG, step (tensors and plain data only,
                               loaded with weights_only=True)
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

CKPT_PREFIX = "step-"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(tuple(state["python"][:1]) + (tuple(state["python"][1]),) + tuple(state["python"][2:]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: str | Path, step: int, *, weights: dict[str, torch.Tensor], config: dict[str, Any],
                    vae_dir: str | Path | None = None, training_state: dict[str, Any] | None = None,
                    keep_last: int = 3) -> Path:
    """Write checkpoint ``step`` atomically under RUN_DIR/checkpoints and keep only the newest ``keep_last``."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{CKPT_PREFIX}{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, tmp / "model.safetensors")
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    if vae_dir is not None:
        shutil.copytree(vae_dir, tmp / "vae")
    if training_state is not None:
        torch.save(training_state, tmp / "training_state.pt")
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same step (e.g. final == periodic): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints (renamed into place, with weights and config), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CKPT_PREFIX)
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
    ckpt = Path(ckpt)
    return load_file(ckpt / "model.safetensors"), json.loads((ckpt / "config.json").read_text())


def load_training_state(ckpt: str | Path) -> dict[str, Any]:
    return torch.load(Path(ckpt) / "training_state.pt", map_location="cpu", weights_only=True)
