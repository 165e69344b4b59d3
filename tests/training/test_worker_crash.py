"""A DataLoader worker that dies mid-run (a decoder segfault, the OOM killer's SIGKILL) stops `dit train` at once
with one error line naming the worker, the signal, and the sample and shard it was on: no hang, no traceback, no
silent skip, and no worker process left behind. The fault is real: the worker kills itself with the signal
(tests/training/worker_faults.py, loaded into the workers by the ``worker_fault`` hook)."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest
from runs import dit_train

from data_pipelines.worker_crash import _cause


def processes_with(marker: str) -> list[int]:
    """Live processes whose environment holds ``marker`` (the run, its forkserver and its workers inherit it)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker.encode() in (proc / "environ").read_bytes():
                found.append(int(proc.name))
        except OSError:  # gone meanwhile, or not ours
            pass
    return found


def test_a_worker_killed_by_a_decoder_segfault_stops_the_run_with_its_sample(tmp_path: Path, small_shards: str,
                                                                            small_vae: Path) -> None:
    run = tmp_path / "run"
    fault = {"key": "000005", "signal": "SIGSEGV", "tag": str(run)}  # the tag marks this run's processes
    done = dit_train(run, small_shards, small_vae, hooks={"worker_fault": fault},
                     **{"data.num_workers": 2, "train.steps": 40})
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    msg = errors[0]
    print(msg)
    assert re.search(r"loader worker [01] \(pid \d+\) died, killed by SIGSEGV", msg), msg
    assert "on sample '000005' of shard " in msg and "00000.tar" in msg, msg  # make_synthetic: 000005 is in shard 0
    assert "--resume auto" in msg
    pid = int(re.search(r"\(pid (\d+)\)", msg).group(1))
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not processes_with(str(run))  # the workers and their forkserver went with the run
    assert not (run / "checkpoints").exists() or not list((run / "checkpoints").glob(".tmp-*"))


def test_the_cause_names_the_signal() -> None:
    assert _cause(-signal.SIGKILL) == "killed by SIGKILL (Killed)"
    assert _cause(-signal.SIGSEGV).startswith("killed by SIGSEGV (Segmentation fault")
    assert _cause(3) == "exit code 3" and _cause(None) == "it exited"
