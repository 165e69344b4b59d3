"""On a CUDA machine: every strategy trains in bf16 (NCCL) and its checkpoint samples. Skipped without CUDA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from runs import dit_torchrun

from dit.export import list_checkpoints, load_weights

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("strategy", ["ddp", "zero2", "zero3", "fsdp"])
def test_bf16_training_on_gpus(strategy: str, tmp_path: Path, small_shards: str, small_vae: Path) -> None:
    if strategy.startswith("zero"):
        pytest.importorskip("deepspeed")
    run = tmp_path / strategy
    nproc = min(2, torch.cuda.device_count())
    done = dit_torchrun(nproc, run, small_shards, small_vae, **{
        "train.steps": 30, "train.checkpoint_every": 30, "train.batch_size": 4, "train.strategy": strategy,
        "train.mixed_precision": "bf16"})
    assert done.returncode == 0, done.stderr[-5000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["nonfinite_skipped"] == 0 for r in records)
    assert sum(r["loss"] for r in records[-5:]) < sum(r["loss"] for r in records[:5])
    assert records[-1]["mfu"] is not None and records[-1]["peak_memory_gb_per_rank"][0] > 0
    weights, _ = load_weights(list_checkpoints(run)[-1])
    assert all(torch.isfinite(w).all() for w in weights.values())
