"""On a CUDA machine: every strategy trains in bf16 (NCCL) and its checkpoint samples. Skipped without CUDA.

Where PyAV or MiniLM are missing (the GPU machine of tools/gpu_check.sh) the runs train from latent shards without
text (tests/training/runs.py, media-free mode). DIT_GPU_TESTS_ON_CPU=1 runs the same on CPU (gloo, one process):
`tools/gpu_check.sh --cpu` does, so that the lent GPU minutes are not spent on a broken fixture.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from runs import dit_torchrun

from dit.export import list_checkpoints, load_weights

ON_CPU = not torch.cuda.is_available() and os.environ.get("DIT_GPU_TESTS_ON_CPU") == "1"
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not (torch.cuda.is_available() or ON_CPU), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("strategy", ["ddp", "zero2", "zero3", "fsdp"])
def test_bf16_training_on_gpus(strategy: str, tmp_path: Path, small_shards: str, small_vae: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    if strategy.startswith("zero"):
        pytest.importorskip("deepspeed")
    if ON_CPU:
        monkeypatch.setenv("DIT_PEAK_FLOPS", "1e12")  # no CPU has a known peak: give one, so the MFU is reported
    run = tmp_path / strategy
    nproc = 1 if ON_CPU else min(2, torch.cuda.device_count())
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
