"""`dit train-vae` under torchrun on CPU trains as one gloo group: accelerate forms none there unless told it runs on
the CPU, and each process then trained alone on every shard, logging and writing the same RUN_DIR."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from runs import DEMO, MEDIA_FREE, ROOT, SMALL

from dit.models.vae import load_vae

pytestmark = pytest.mark.skipif(MEDIA_FREE, reason="train-vae reads pixels; the media-free shards are latents")


def train_vae(out: Path, shards: str, nproc: int) -> subprocess.CompletedProcess:
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    cmd = [sys.executable, *launch, "-m", "dit.cli", "train-vae", "--config", str(DEMO), f"data.shards={shards}",
           f"train.output_dir={out}", *SMALL, "train.steps=3", "train.lr=1e-2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_two_ranks_average_their_gradients_and_log_once(tmp_path: Path, small_shards: str) -> None:
    alone = train_vae(tmp_path / "one", small_shards, 1)
    two = train_vae(tmp_path / "two", small_shards, 2)
    # one logger for the group: each step's line once (two lone processes printed every line twice)
    assert alone.stderr.count("train-vae step 3/3") == 1
    assert two.stderr.count("train-vae step 3/3") == 1, two.stderr[-3000:]
    # a lone process per rank would be the 1-process run exactly (same seed, shards, batch and thread count); the
    # group's ranks read different shards and average their gradients, so after 3 steps at lr 1e-2 it is not
    a, b = load_vae(tmp_path / "one" / "vae").state_dict(), load_vae(tmp_path / "two" / "vae").state_dict()
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a if a[k].is_floating_point())
    assert diff > 1e-3, diff
    assert all(torch.isfinite(v).all() for v in b.values() if v.is_floating_point())
