"""Every strategy skips a step whose loss is finite but whose gradients are not: 2 CPU processes over gloo (torchrun),
2 micro-batches per step, an inf gradient in rank 0's first micro-batch (tests/distributed/nonfinite_step.py).
The skipped step is counted (applied False, a non-finite global norm on rank 0, which every rank shares), leaves
weights, EMA and optimizer state bitwise as they were, and leaves no trace: the run then ends exactly as the same
run without that step."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("nonfinite_step.py")


# ZeRO-1 runs DeepSpeed's ZeRO-1/2 optimizer as ZeRO-2 does (its NaN window: tests/distributed/test_strategies.py)
@pytest.mark.parametrize("strategy,extra", [("ddp", []), ("zero2", []), ("zero3", []), ("zero2", ["--offload"]),
                                            ("fsdp", [])],
                         ids=["ddp", "zero2", "zero3", "zero2-offload", "fsdp"])
def test_a_finite_loss_with_a_nonfinite_gradient_is_skipped_and_changes_nothing(strategy: str, extra: list[str],
                                                                                tmp_path: Path) -> None:
    if strategy.startswith("zero"):
        pytest.importorskip("deepspeed")
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT),
           "--strategy", strategy, "--accum", "2", "--out", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-5000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == 2
    clean, poisoned, after = result["reports"]
    assert math.isfinite(poisoned["loss"])  # the loss was finite: only the gradients were not
    assert [clean["applied"], poisoned["applied"], after["applied"]] == [True, False, True]
    assert not math.isfinite(poisoned["grad_norm"]) and math.isfinite(after["grad_norm"])
    assert result["clean_step_changed_weights"]  # (so "unchanged" below means something)
    assert result["skipped_changed_nothing"] == {"model": True, "ema": True, "optimizer": True}
    assert result["ends_as_reference"] == {"model": True, "ema": True, "optimizer": True}
    assert after["grad_norm"] == result["reference"][1]["grad_norm"]
