"""A 2-process `dit train` prints its final ``checkpoint: PATH`` line once, from rank 0 (issue 13, defect 12)."""

from __future__ import annotations

from pathlib import Path

from runs import dit_torchrun


def test_two_processes_print_the_checkpoint_once(tmp_path: Path, small_shards: str, small_vae: Path) -> None:
    run = tmp_path / "run"
    done = dit_torchrun(2, run, small_shards, small_vae, **{"train.steps": 2, "train.batch_size": 2})
    assert done.returncode == 0, done.stderr[-5000:]
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("checkpoint: ")]
    assert lines == [f"checkpoint: {run / 'checkpoints' / 'step-00000002'}"]
