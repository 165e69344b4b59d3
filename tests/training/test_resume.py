"""Exact resume: a run killed with SIGKILL at three points (one of them in the middle of writing a checkpoint)
and resumed each time with train.resume=auto ends with the same weights, bit for bit, as a run never stopped."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import torch
from runs import dit_train

from dit.config import ConfigError
from dit.export import list_checkpoints, load_weights
from dit.training.checkpoint import load_training_state

COMMON = {"train.steps": 60, "train.checkpoint_every": 20, "train.keep_last": 5}


def logged(run: Path) -> list[int]:
    f = run / "metrics.jsonl"
    if not f.is_file():
        return []
    steps = []
    for line in f.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except ValueError:
            pass
    return steps


def kill_when(proc, ready, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"exited before {what}: {proc.stdout.read()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def steps_of(run: Path) -> list[int]:
    return [int(p.name.split("-")[1]) for p in list_checkpoints(run)]


def test_kill_9_three_times_then_resume_auto_equals_an_uninterrupted_run(tmp_path: Path, small_shards: str,
                                                                          small_vae: Path) -> None:
    ref, run = tmp_path / "ref", tmp_path / "run"
    done = dit_train(ref, small_shards, small_vae, **COMMON)
    assert done.returncode == 0, done.stderr[-3000:]

    # 1: between checkpoints (after 20, before 40)
    proc = dit_train(run, small_shards, small_vae, wait=False, **COMMON)
    kill_when(proc, lambda: len(logged(run)) >= 25, "step 25")
    assert steps_of(run) == [20]

    # 2: while checkpoint 40 is being written (its files are in .tmp-step-00000040, not yet renamed)
    proc = dit_train(run, small_shards, small_vae, wait=False, extra_args=("--resume", "auto"),
                     hooks={"checkpoint_pause_s": 60}, **COMMON)
    writing = run / "checkpoints" / ".writing"
    kill_when(proc, lambda: writing.is_file() and writing.read_text() == "40", "checkpoint 40 being written")
    assert (run / "checkpoints" / ".tmp-step-00000040" / "model.safetensors").is_file()
    assert steps_of(run) == [20]  # the half-written one does not count

    # 3: after checkpoint 40, before the end
    proc = dit_train(run, small_shards, small_vae, wait=False, **COMMON)
    kill_when(proc, lambda: steps_of(run) == [20, 40] and max(logged(run), default=0) >= 45, "step 45")

    # and the last resume runs to the end
    done = dit_train(run, small_shards, small_vae, extra_args=("--resume", "auto"), **COMMON)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stderr and "step-00000040 at step 40" in done.stderr
    assert logged(run) == list(range(1, 61))  # each step once in the log, none lost

    a = load_training_state(ref / "checkpoints" / "step-00000060")
    b = load_training_state(run / "checkpoints" / "step-00000060")
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
    wa, _ = load_weights(ref / "checkpoints" / "step-00000060")
    wb, _ = load_weights(run / "checkpoints" / "step-00000060")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # the exported EMA weights too


def test_resume_never_and_a_bad_resume_path(tmp_path: Path, small_shards: str, small_vae: Path) -> None:
    from runs import small_config

    with pytest.raises(ConfigError, match="train.resume"):
        small_config(tmp_path, small_shards, small_vae, **{"train.resume": str(tmp_path / "nowhere")})
    assert small_config(tmp_path, small_shards, small_vae, **{"train.resume": "never"}).train.resume == "never"
