"""Atomic checkpoints: written to a temporary directory, flushed, then renamed; a half-written one is never used.

    RUN_DIR/checkpoints/step-00000200/
        model.safetensors, config.json, vae/    the inference export (dit/export.py)
        training_state.pt      raw weights, optimizer, LR scheduler, EMA, RNG, step (tensors and plain data only,
                               loaded with weights_only=True)
        rank-00000.pt ...      each rank's RNG states and data-loader position
        deepspeed/ | fsdp/     the sharded model + optimizer state of those strategies (one file per rank)

With several processes every rank writes its own files into the same temporary directory; rank 0 renames
it after a barrier, so a checkpoint directory exists only once all ranks' files are in it.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dit.export import CKPT_PREFIX, list_checkpoints, resolve_checkpoint
from dit.fileio import publish


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


def _noop() -> None:
    pass


@contextmanager
def atomic_checkpoint(run_dir: str | Path, step: int, *, keep_last: int = 3, is_main: bool = True,
                      barrier: Callable[[], None] = _noop) -> Iterator[Path]:
    """Yield a temporary directory for checkpoint ``step`` that every rank writes into; on a clean exit rank 0
    flushes it and renames it to RUN_DIR/checkpoints/step-NNNNNNNN, then keeps only the newest ``keep_last``.

    An exception (or a crash) inside the block leaves only the ``.tmp-`` directory, which is never loaded and
    is removed by the next save of that step. Every rank must enter and leave the block (it has barriers).
    """
    root = Path(run_dir) / "checkpoints"
    final = root / f"{CKPT_PREFIX}{step:08d}"
    tmp = root / f".tmp-{final.name}"
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    yield tmp
    barrier()  # every rank's files are in tmp
    if is_main:
        if final.exists():  # re-saving the same step (e.g. final == periodic): replace it
            shutil.rmtree(final)
        publish(tmp, final)  # flushed, then renamed in one step
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()


def rank_state_path(ckpt: str | Path, rank: int) -> Path:
    return Path(ckpt) / f"rank-{rank:05d}.pt"


def resume_checkpoint(run_dir: str | Path, resume: str) -> Path | None:
    """The checkpoint to resume from: ``auto`` the newest complete one in RUN_DIR (None if there is none),
    ``never`` None, anything else a checkpoint directory (or run directory) that must hold a training state."""
    if resume == "never":
        return None
    if resume == "auto":
        done = [p for p in list_checkpoints(run_dir) if (p / "training_state.pt").is_file()]
        return done[-1] if done else None
    ckpt = resolve_checkpoint(resume)
    if not (ckpt / "training_state.pt").is_file():
        raise FileNotFoundError(f"train.resume={resume!r}: {ckpt} holds weights only (no training_state.pt); "
                                "use it as a starting point for sampling, not for resuming")
    return ckpt


def load_training_state(ckpt: str | Path) -> dict[str, Any]:
    return torch.load(Path(ckpt) / "training_state.pt", map_location="cpu", weights_only=True)
