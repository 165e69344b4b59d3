"""Preemption: a real `dit train` process signalled with SIGUSR1 checkpoints the step it was on, exits with
REQUEUE_EXIT_CODE, and the rerun resumes from that step and finishes."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

from runs import dit_train

from dit.distributed.preemption import REQUEUE_EXIT_CODE
from dit.export import list_checkpoints
from dit.training.checkpoint import load_training_state


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


def test_a_signal_to_one_of_two_ranks_stops_both_after_the_same_step(tmp_path: Path, small_shards: str,
                                                                      small_vae: Path) -> None:
    import json as _json
    import os
    import subprocess
    import sys

    from runs import DEMO, ROOT, small_overrides

    from dit.distributed.preemption import PREEMPTED_MARKER

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "dit.cli",
           "train", "--config", str(DEMO),
           *small_overrides(run, small_shards, small_vae, **{"train.steps": 2000, "train.batch_size": 2,
                                                             "train.checkpoint_every": 1000})]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while len(steps_logged(run)) < 3:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    rank1 = [w for w in workers if "LOCAL_RANK=1\0" in Path(f"/proc/{w}/environ").read_text()]
    assert len(rank1) == 1, workers
    os.kill(int(rank1[0]), signal.SIGUSR1)  # only rank 1 hears it
    output, _ = proc.communicate(timeout=300)
    stopped_at = _json.loads((run / PREEMPTED_MARKER).read_text())["step"]
    for rank in (0, 1):  # both ranks checkpointed the same step and exited 42 (torchrun itself exits 1)
        assert f"rank {rank}: preempted after step {stopped_at}, checkpointed; exiting with 42" in output, output
    assert f"exitcode  : {REQUEUE_EXIT_CODE}" in output and "exitcode  : 1 " not in output
    assert [p.name for p in list_checkpoints(run)] == [f"step-{stopped_at:08d}"]
    assert steps_logged(run)[-1] == stopped_at
