"""The watchdog names the stuck rank, its phase and the collective it waits in (2 real gloo processes)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dit.distributed.watchdog import Watchdog


def _worker(rank: int, init: str, log_file: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    handler = logging.FileHandler(f"{log_file}.{rank}")
    logging.getLogger("dit.watchdog").addHandler(handler)
    with Watchdog(0.5, rank, poll_s=0.05) as watchdog:
        if rank == 1:
            watchdog.mark("data")
            time.sleep(2.0)  # a slow rank: the other one waits for it in the collective
        watchdog.mark("loss all-reduce")
        dist.all_reduce(torch.ones(1))
        watchdog.mark("done")
    handler.flush()
    dist.destroy_process_group()


def test_a_rank_waiting_in_a_collective_is_reported_with_its_stack(tmp_path: Path) -> None:
    log_file = str(tmp_path / "watchdog.log")
    mp.spawn(_worker, args=(f"file://{tmp_path / 'store'}", log_file), nprocs=2, join=True)
    waiting, slow = Path(f"{log_file}.0").read_text(), Path(f"{log_file}.1").read_text()
    assert "rank 0 stuck for" in waiting and "in phase 'loss all-reduce'" in waiting
    assert "all_reduce" in waiting  # the stack shows the collective
    assert "rank 1 stuck for" in slow and "in phase 'data'" in slow and "time.sleep" in slow


def test_no_report_while_phases_move_on(caplog) -> None:
    with caplog.at_level(logging.ERROR, logger="dit.watchdog"), Watchdog(0.3, 0, poll_s=0.02) as watchdog:
        for i in range(10):
            watchdog.mark(f"step {i}")
            time.sleep(0.05)
    assert not caplog.records
