"""The first loader stage: raw tar samples of one reader (rank, worker), epoch by epoch, datasets mixed by weight.

Per dataset and epoch: the epoch's shard order (seeded by seed, dataset, epoch; the same on every rank)
→ this rank's every world_size-th shard → this worker's every num_workers-th of those → tar samples →
a shuffle buffer seeded by (seed, dataset, epoch, rank, worker). Datasets are mixed by a weighted draw
seeded by the draw's index, so the mix is reproducible and resumable.

Each sample carries where the reader is after it (``__pos__``: ``[epoch, offset]`` per dataset;
``__draw__``: its index in this reader's stream), so a loader can stop and later go on from there
(``resume``): skipped samples are read but never decoded. Samples still waiting in bucket queues at
the stop are replayed (decoded again, not counted again) so that the batches that follow are the same.
"""

from __future__ import annotations

import multiprocessing as mp
import random
from collections.abc import Callable, Iterator
from typing import Any

import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info
from webdataset import tariterators


class SharedEpoch:
    """The epoch number, shared with (persistent) DataLoader workers."""

    def __init__(self, epoch: int = 0) -> None:
        self.value = mp.Value("i", epoch, lock=False)  # one writer (the main process); no lock to pickle

    def get(self) -> int:
        return self.value.value

    def set(self, epoch: int) -> None:
        self.value.value = epoch


def seeded(*parts: Any) -> random.Random:
    """A generator seeded by a tuple of values, the same in every process (str seeds are hashed stably)."""
    return random.Random(" ".join(map(str, parts)))


def worker_info() -> tuple[int, int]:
    """(worker id, number of workers) of this DataLoader worker; (0, 1) in the main process."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def epoch_shards(urls: list[str], seed: int, dataset: int, epoch: int) -> list[str]:
    """The shard order of one epoch of one dataset, the same on every rank."""
    urls = list(urls)
    seeded(seed, "shards", dataset, epoch).shuffle(urls)
    return urls


class ReadSamples(IterableDataset):
    """Raw samples ``{"__key__", "__url__", "mp4" | "jpg" | ..., "txt", "json", "__pos__", "__draw__",
    "__dataset__", "__epoch__", "__replay__"}`` of this reader (see the module docstring)."""

    def __init__(self, url_lists: list[list[str]], weights: list[float], *, seed: int, rank: int, world_size: int,
                 epoch: SharedEpoch, infinite: bool, epoch_seed: bool, shuffle_buffer: int,
                 on_tar_error: Callable[[str, Exception], None]) -> None:
        super().__init__()
        self.url_lists, self.weights, self.seed, self.rank, self.world_size = url_lists, weights, seed, rank, world_size
        self.epoch, self.infinite, self.epoch_seed, self.bufsize = epoch, infinite, epoch_seed, shuffle_buffer
        self.on_tar_error = on_tar_error
        self.resume: dict[int, dict[str, Any]] = {}  # worker -> {"datasets", "draws", "pending"}; used once
        self.skipping = self.replaying = False  # tar errors met then were counted before the stop

    def shard_samples(self, urls: list[str]) -> Iterator[dict[str, Any]]:
        """Tar samples of each shard. A shard that cannot be opened or read to its end (truncated, a failed
        ``pipe:``) ends there: its samples before the break are kept, the one being read is dropped, and the
        shard counts once as ``tar_error`` (not again when a resumed loader skips over it)."""
        for url in urls:
            failed: list[Exception] = []
            stop = failed.append  # returns None (falsy): stop reading this shard at its first error
            members = tariterators.tar_file_expander(tariterators.url_opener([{"url": url}], handler=stop),
                                                     handler=stop, eof_value=None)
            previous = None
            for sample in tariterators.group_by_keys(members, handler=stop):
                if previous is not None:
                    yield previous
                previous = sample
            if not failed and previous is not None:
                yield previous
            elif failed and not (self.skipping or self.replaying):
                self.on_tar_error(url, failed[0])

    def dataset(self, d: int, epoch: int, skip: int, worker: int, num_workers: int) -> Iterator[tuple]:
        """``(epoch, offset, sample)`` of dataset ``d`` from ``epoch``, skipping its first ``skip`` samples."""
        while True:
            e = epoch if self.epoch_seed else 0
            urls = epoch_shards(self.url_lists[d], self.seed, d, e)[self.rank::self.world_size][worker::num_workers]
            samples = self.shard_samples(urls)
            if self.bufsize > 1:
                rng = seeded(self.seed, "samples", d, e, self.rank, worker)
                samples = wds.shuffle(self.bufsize, initial=self.bufsize, rng=rng)(samples)
            self.skipping = skip > 0
            for offset, sample in enumerate(samples, start=1):
                if offset <= skip:
                    self.skipping = offset < skip
                    continue
                yield epoch, offset, sample
            self.skipping, skip, epoch = False, 0, epoch + 1
            if not self.infinite:
                return

    def start(self, worker: int) -> tuple[list[list[int]], int, set[int], int | None]:
        """Where this worker starts: positions, draw index, the draws to replay, and the position to replay to."""
        n = len(self.url_lists)
        resume = self.resume.pop(worker, None)
        if not resume:
            return [[self.epoch.get(), 0] for _ in range(n)], 0, set(), None
        pos, draws, pending = [list(p) for p in resume["datasets"]], resume["draws"], resume.get("pending") or []
        if not pending:
            return pos, draws, set(), None
        first_pos, first_dataset, first_draw = pending[0]  # go back to just before the oldest waiting sample
        before = [list(p) for p in first_pos]
        before[first_dataset][1] -= 1
        return before, first_draw, {draw for _, _, draw in pending}, draws

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, num_workers = worker_info()
        n = len(self.url_lists)
        pos, draw, replay, until = self.start(worker)
        streams = [self.dataset(d, e, off, worker, num_workers) for d, (e, off) in enumerate(pos)]
        done: set[int] = set()
        while len(done) < n:
            d = 0
            if n > 1:  # the first draw (seeded by its index) that names a dataset with samples left
                rng = seeded(self.seed, "mix", self.rank, worker, draw)
                while (d := rng.choices(range(n), self.weights)[0]) in done:
                    pass
            self.replaying = until is not None
            item = next(streams[d], None)
            if item is None:
                done.add(d)
                continue
            epoch, offset, sample = item
            pos[d] = [epoch, offset]
            draw += 1
            waiting = draw - 1 in replay  # was in a bucket queue at the stop: decode again, count not again
            if until is not None:  # replaying up to where the saved run was
                if draw == until:
                    until, self.replaying = None, False
                if not waiting:
                    continue  # delivered (or counted) before the stop
            sample.update(__pos__=[list(p) for p in pos], __draw__=draw - 1, __dataset__=d, __epoch__=epoch,
                          __replay__=waiting)
            yield sample
