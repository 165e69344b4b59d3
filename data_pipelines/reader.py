"""The first loader stage: raw tar samples of one reader (rank, worker), epoch by epoch, datasets mixed by weight.

Per stream and epoch: the epoch's shard order (seeded by seed, dataset, epoch; the same on every rank)
→ this rank's every world_size-th shard → this worker's every num_workers-th of those → tar samples →
a shuffle buffer seeded by (seed, dataset, epoch, rank, worker). A stream is one dataset; with
``data.image_ratio`` each dataset is two streams, its images and its videos (samples of the other kind are
dropped before the shuffle buffer), and ``KindSchedule`` says which kind the batch being filled is.
Streams are mixed by a weighted draw seeded by the draw's index, so the mix is reproducible and resumable.

Each sample carries where the reader is after it (``__pos__``: ``[epoch, offset]`` per stream;
``__draw__``: its index in this reader's stream), so a loader can stop and later go on from there
(``resume``): skipped samples are read but never decoded. Samples still waiting in bucket queues at
the stop are replayed (decoded again, not counted again) so that the batches that follow are the same:
each stream goes back to just before its oldest waiting sample and hands on only the waiting ones, in their
old order, until it is where it was.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import random
from collections.abc import Callable, Iterator
from typing import Any

import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info
from webdataset import tariterators

from data_pipelines.config import ConfigError

log = logging.getLogger(__name__)


class NoReadableSamples(ConfigError, RuntimeError):
    """A reader's whole share of a dataset gave no sample in a pass over it (every shard unreadable, or empty):
    reading it again would only loop, so the run stops with this (printed as one ``error:`` line)."""


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


class KindSchedule:
    """The batches one reader has made, and with ``data.image_ratio`` (``ratio``) the kind ("image" or "video")
    of each, drawn with a generator seeded by (seed, rank, worker, batch index): the same in every run and after
    a resume.

    ``Batch`` counts the batches it makes (``batches``, saved in the loader state and restored by
    ``ReadSamples``); ``ReadSamples`` asks ``want()`` before each draw and reads from streams of that kind only,
    so the batch being filled is of that kind. Both stages hold this one object (they live in the same process:
    the main one, or a worker).
    """

    def __init__(self, ratio: float | None, seed: int) -> None:
        self.ratio, self.seed = ratio, seed
        self.rank = self.worker = self.batches = 0
        self._drawn: tuple[int, str] | None = None

    def start(self, rank: int, worker: int, batches: int) -> None:
        self.rank, self.worker, self.batches, self._drawn = rank, worker, batches, None

    def want(self) -> str:
        assert self.ratio is not None
        if self._drawn is None or self._drawn[0] != self.batches:
            rng = seeded(self.seed, "kind", self.rank, self.worker, self.batches)
            self._drawn = (self.batches, "image" if rng.random() < self.ratio else "video")
        return self._drawn[1]


class ReadSamples(IterableDataset):
    """Raw samples ``{"__key__", "__url__", "mp4" | "jpg" | ..., "txt", "json", "__pos__", "__draw__",
    "__dataset__" (the stream), "__epoch__", "__replay__"}`` of this reader (see the module docstring).

    With a ``schedule`` that has a ratio, ``kinds`` says what each dataset holds: "image", "video", or None (both:
    read once per kind); ``kind_of(sample)`` tells "image", "video" or None (neither: such a sample goes with its
    dataset's first stream, where it is counted as bad).
    """

    def __init__(self, url_lists: list[list[str]], weights: list[float], *, seed: int, rank: int, world_size: int,
                 epoch: SharedEpoch, infinite: bool, epoch_seed: bool, shuffle_buffer: int,
                 on_tar_error: Callable[[str, Exception], None], schedule: KindSchedule,
                 kinds: list[str | None] | None = None, kind_of: Callable[[dict], str | None] | None = None) -> None:
        super().__init__()
        self.url_lists, self.weights, self.seed, self.rank, self.world_size = url_lists, weights, seed, rank, world_size
        self.epoch, self.infinite, self.epoch_seed, self.bufsize = epoch, infinite, epoch_seed, shuffle_buffer
        self.on_tar_error, self.schedule, self.kind_of = on_tar_error, schedule, kind_of
        if schedule.ratio is None:  # (dataset, kind) per stream; kind None: every sample
            self.streams: list[tuple[int, str | None]] = [(d, None) for d in range(len(url_lists))]
        else:
            kinds = kinds or [None] * len(url_lists)
            self.streams = [(d, k) for d in range(len(url_lists)) for k in ([kinds[d]] if kinds[d] else
                                                                             ["video", "image"])]
        self.resume: dict[int, dict[str, Any]] = {}  # worker -> {"datasets", "draws", "pending", "batches"}; once
        self.skipping = self.replaying = False  # tar errors met then were counted before the stop

    def shard_samples(self, urls: list[str], report: bool = True,
                      failures: list[str] | None = None) -> Iterator[dict[str, Any]]:
        """Tar samples of each shard. A shard that cannot be opened or read to its end (truncated, a failed
        ``pipe:``) ends there: its samples before the break are kept, the one being read is dropped, and the
        shard counts once as ``tar_error`` (not again when a resumed loader skips over it, nor by the second
        stream of a dataset: ``report=False``); ``failures`` collects "url: error" of each."""
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
            elif failed and report and not (self.skipping or self.replaying):
                self.on_tar_error(url, failed[0])
            if failed and failures is not None:
                failures.append(f"{url}: {str(failed[0])[:200]}")

    def stream(self, s: int, epoch: int, skip: int, worker: int, num_workers: int) -> Iterator[tuple]:
        """``(epoch, offset, sample)`` of stream ``s`` from ``epoch``, skipping its first ``skip`` samples."""
        d, kind = self.streams[s]
        primary = next(k for dd, k in self.streams if dd == d)  # the kind of the dataset's first stream
        while True:
            e = epoch if self.epoch_seed else 0
            urls = epoch_shards(self.url_lists[d], self.seed, d, e)[self.rank::self.world_size][worker::num_workers]
            failures: list[str] = []  # shards of this pass that broke off
            samples = self.shard_samples(urls, report=kind == primary, failures=failures)
            if kind is not None:  # this kind only (a sample of neither kind: in the dataset's first stream)
                samples = (x for x in samples if (self.kind_of(x) or primary) == kind)
            if self.bufsize > 1:
                rng = seeded(self.seed, "samples", d, e, self.rank, worker, *([kind] if kind else []))
                samples = wds.shuffle(self.bufsize, initial=self.bufsize, rng=rng)(samples)
            self.skipping = skip > 0
            offset = 0
            for offset, sample in enumerate(samples, start=1):
                if offset <= skip:
                    self.skipping = offset < skip
                    continue
                yield epoch, offset, sample
            if kind is None and skip == 0 and offset == 0 and urls and self.infinite:
                raise self.nothing_read(d, urls, failures, worker, num_workers)  # (else: the same pass for ever)
            if kind is not None and skip == 0 and offset == 0 and self.infinite:
                log.warning("dataset %d holds no %s samples for rank %d worker %d: its %s batches come from the "
                            "other datasets (or there are none)", d, kind, self.rank, worker, kind)
                return  # an epoch from its start without one: there are none (else this would spin for ever)
            self.skipping, skip, epoch = False, 0, epoch + 1
            if not self.infinite:
                return

    def nothing_read(self, d: int, urls: list[str], failures: list[str], worker: int,
                     num_workers: int) -> NoReadableSamples:
        """The error for a pass over ``urls`` (this reader's share of dataset ``d``) that gave no sample."""
        where = (f"{len(urls)} shard{'s' if len(urls) > 1 else ''} of dataset {d} read by rank {self.rank}"
                 f"{f', loader worker {worker} of {num_workers}' if num_workers > 1 else ''}")
        if len(failures) == len(urls):
            return NoReadableSamples(
                f"no readable shards: none of the {where} could be read as tar files (first: {failures[0]}). Fix or "
                "remove them (`dit inspect-shards SPEC` shows what each holds; `dit make-shards` writes checked "
                "shards from a folder of clips)")
        return NoReadableSamples(
            f"no samples: the {where} hold no tar samples (first: {urls[0]}"
            f"{'; unreadable: ' + failures[0] if failures else ''}). Check data.shards (`dit inspect-shards SPEC`)")

    def choose(self, draw: int, done: set[int], worker: int) -> int:
        """The stream of draw ``draw``: one of the kind the schedule wants (the other when that kind is used up),
        by a weighted draw seeded by the draw's index; the first such draw that names a stream with samples left."""
        candidates = list(range(len(self.streams)))
        if self.schedule.ratio is not None:
            want = self.schedule.want()
            of_kind = [s for s in candidates if self.streams[s][1] == want]
            candidates = of_kind if any(s not in done for s in of_kind) else [s for s in candidates if s not in of_kind]
        live = [s for s in candidates if s not in done]
        if len(live) == 1 or len(candidates) == 1:
            return live[0]
        rng = seeded(self.seed, "mix", self.rank, worker, draw)
        weights = [self.weights[self.streams[s][0]] for s in candidates]
        while (s := rng.choices(candidates, weights)[0]) in done:
            pass
        return s

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, num_workers = worker_info()
        n = len(self.streams)
        resume = self.resume.pop(worker, None) or {}
        pos = [list(p) for p in resume.get("datasets") or [[self.epoch.get(), 0] for _ in range(n)]]
        draw, pending = resume.get("draws", 0), sorted(resume.get("pending") or [], key=lambda w: w[2])
        self.schedule.start(self.rank, worker, resume.get("batches", 0))
        start = [list(p) for p in pos]  # each stream from just before its oldest waiting sample, or where it was
        for p, s, _ in reversed(pending):
            start[s] = [p[s][0], p[s][1] - 1]
        streams = [self.stream(s, e, off, worker, num_workers) for s, (e, off) in enumerate(start)]
        at = [list(p) for p in start]
        # Replay: the samples that waited in bucket queues at the stop, in their old order, decoded again but not
        # counted again; what lies between them was delivered (or counted) before the stop and is read over.
        self.replaying = bool(pending)
        for p, s, d in pending:
            while at[s] != p[s]:
                epoch, offset, sample = next(streams[s])
                at[s] = [epoch, offset]
            sample.update(__pos__=[list(x) for x in p], __draw__=d, __dataset__=s, __epoch__=at[s][0],
                          __replay__=True)
            yield sample
        for s in range(n):  # then on to where each stream was at the stop
            while at[s] != pos[s]:
                at[s] = list(next(streams[s])[:2])
        self.replaying = False
        done: set[int] = set()
        while len(done) < n:
            s = self.choose(draw, done, worker) if n > 1 else 0
            item = next(streams[s], None)
            if item is None:
                done.add(s)
                continue
            epoch, offset, sample = item
            pos[s] = [epoch, offset]
            draw += 1
            sample.update(__pos__=[list(p) for p in pos], __draw__=draw - 1, __dataset__=s, __epoch__=epoch,
                          __replay__=False)
            yield sample
