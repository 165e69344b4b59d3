"""Preemption: a real `dit train` process signalled with SIGUSR1 checkpoints the step it was on, exits with
REQUEUE_EXIT_CODE, and the rerun resumes from that step and finishes."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

from runs import dit_train

from dit.distributed.preemption import REQUEUE_EXIT_CODE
from dit.training.checkpoint import list_checkpoints, load_training_state


def steps_logged(run: Path) -> list[int]:
    f = run / "metrics.jsonl"
    return [json.loads(line)["step"] for line in f.read_text().splitlines()] if f.is_file() else []


def test_sigusr1_checkpoints_exits_for_requeue_and_the_rerun_resumes(tmp_path: Path, small_shards: str,
                                                                     small_vae: Path) -> None:
    run = tmp_path / "run"
    common = {"train.checkpoint_every": 1000, "train.steps": 400}
    proc = dit_train(run, small_shards, small_vae, wait=False, **common)
    deadline = time.monotonic() + 300
    while len(steps_logged(run)) < 3:  # training is under way
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == REQUEUE_EXIT_CODE == 42, output
    stopped_at = steps_logged(run)[-1]
    assert 3 <= stopped_at < 400
    assert [p.name for p in list_checkpoints(run)] == [f"step-{stopped_at:08d}"]  # the step it was on
    assert load_training_state(list_checkpoints(run)[-1])["step"] == stopped_at

    done = dit_train(run, small_shards, small_vae, **{**common, "train.steps": stopped_at + 2})
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resumed from {run / 'checkpoints' / f'step-{stopped_at:08d}'}" in done.stderr
    assert steps_logged(run) == list(range(1, stopped_at + 3))  # no step repeated, none lost
    assert load_training_state(list_checkpoints(run)[-1])["step"] == stopped_at + 2
