"""A loader worker that dies (a decoder segfault, the OOM killer) is reported with the shard and sample it was on.

Each worker writes the shard URL and key of the sample it starts decoding into its slot of a small shared-memory
buffer; when PyTorch's DataLoader reports a dead worker, the main process reads that slot and stops the run with
one ``error:`` line (``LoaderWorkerDied``), never a hang or a silent skip. The checkpoints stay as they were, so
``--resume auto`` continues from the newest."""

from __future__ import annotations

import re
import signal
from multiprocessing.context import BaseContext
from typing import Any

from torch.utils.data import get_worker_info

from data_pipelines.config import ConfigError

SLOT = 1024  # bytes per worker: "url\tkey", cut to fit


class LoaderWorkerDied(ConfigError, RuntimeError):
    """A DataLoader worker process died; the message names the worker, the cause and the sample it was on."""


class WorkerPositions:
    """One slot per worker in shared memory: the sample each worker last started (written in the worker)."""

    def __init__(self, num_workers: int, ctx: BaseContext) -> None:
        self.num_workers = num_workers
        self.buf = ctx.RawArray("c", num_workers * SLOT)

    def mark(self, url: str, key: str) -> None:
        info = get_worker_info()
        if info is None:  # in the main process (data.num_workers=0): a crash there is the process's own
            return
        data = f"{url}\t{key}".encode("utf-8", "replace")[:SLOT - 1]
        start = info.id * SLOT
        self.buf[start:start + len(data) + 1] = data + b"\0"

    def read(self, worker: int) -> tuple[str, str] | None:
        raw = bytes(self.buf[worker * SLOT:(worker + 1) * SLOT]).split(b"\0", 1)[0].decode("utf-8", "replace")
        if not raw:
            return None
        url, _, key = raw.partition("\t")
        return url, key


def _cause(exitcode: int | None) -> str:
    if exitcode is None:
        return "it exited"
    if exitcode < 0:
        try:
            sig = signal.Signals(-exitcode)
            return f"killed by {sig.name} ({signal.strsignal(sig)})"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


def crash_report(err: RuntimeError, dataloader: Any, positions: WorkerPositions | None) -> LoaderWorkerDied | None:
    """The report for ``err`` when it is PyTorch's "DataLoader worker (pid ...) ..." error, else None."""
    text = str(err)
    if "DataLoader worker (pid" not in text:
        return None
    pids = {int(p) for p in re.findall(r"\d+", text.split("DataLoader worker (pid", 1)[1].split(")", 1)[0])}
    workers = list(getattr(getattr(dataloader, "_iterator", None), "_workers", None) or [])
    lines = []
    for w, proc in enumerate(workers):
        if proc.pid not in pids and not (proc.exitcode and not pids):
            continue
        where = positions.read(w) if positions is not None else None
        on = (f"on sample {where[1]!r} of shard {where[0]} (the last sample it started)" if where
              else "before it started a sample")
        lines.append(f"loader worker {w} (pid {proc.pid}) died, {_cause(proc.exitcode)}, {on}")
    if not lines:
        lines.append(text.strip().splitlines()[0])
    return LoaderWorkerDied(
        "; ".join(lines) + ". The run stopped; its checkpoints are intact and `--resume auto` continues from the "
        "newest. If the same sample kills its worker again (a decoder crash), remove that sample or its shard from "
        "the data; if the worker was out of memory (SIGKILL), lower data.num_workers or the batch size")
