"""The training data loader: WebDataset shards → batches of clips ``[B, 3, T, H, W]`` in [-1, 1].

The pipeline is a visible list of small stages (as in open_clip's ``get_wds_dataset``):

    ReadSamples        per dataset and epoch: shard URLs shuffled by seed + epoch → every world_size-th
                       shard for this rank (rank read at build time) → every num_workers-th for this
                       worker → tar samples {"__key__", "mp4" | "jpg" | ..., "txt", "json"} → a shuffle
                       buffer seeded by (seed, dataset, epoch, rank, worker); datasets mixed by weight;
                       each sample carries the reader's position (for ``state_dict``)
    DecodeClips        decode + sample frames + resize/crop; bad samples are logged, counted and skipped
    Batch              stack into {"video", "caption", "key"} plus the counts since the last batch
    in_worker_order    (main process) batches round-robin over workers, from the worker whose turn it is

Bad samples never stop a run unless more than ``data.max_bad_fraction`` of them fail (checked after
20 samples). Counts by reason travel with the batches, so ``loader.stats`` is right with workers too.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset import tariterators

from data_pipelines.decode import IMAGE_EXTS, VIDEO_EXTS, DecodeError, decode_image, decode_video, resize_crop
from data_pipelines.sampling import FramePicker, TooShort
from data_pipelines.shards import expand_shards
from data_pipelines.state import VERSION as STATE_VERSION
from data_pipelines.state import fingerprint, in_worker_order, plan_resume
from dit.config import DataConfig

log = logging.getLogger(__name__)

MIN_SAMPLES_FOR_BAD_CHECK = 20
# Why a sample was skipped. tar_error counts unreadable tar data (a truncated or missing shard).
REASONS = ("no_media", "decode_error", "too_short", "no_caption", "bad_caption", "tar_error")


@dataclass
class DataStats:
    """Samples read (``seen``), decoded (``ok``) and skipped by reason (``bad``)."""

    seen: int = 0
    ok: int = 0
    bad: Counter = field(default_factory=Counter)

    @property
    def num_bad(self) -> int:
        return sum(self.bad.values())

    @property
    def bad_fraction(self) -> float:
        return self.num_bad / self.seen if self.seen else 0.0

    def add(self, seen: int = 0, ok: int = 0, bad: dict[str, int] | None = None) -> None:
        self.seen += seen
        self.ok += ok
        self.bad.update(bad or {})

    def as_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "ok": self.ok, "bad": dict(self.bad)}

    def __bool__(self) -> bool:
        return self.seen > 0


def check_bad_fraction(stats: DataStats, max_bad_fraction: float) -> None:
    """Raise once more than ``max_bad_fraction`` of at least 20 samples failed."""
    if stats.seen >= MIN_SAMPLES_FOR_BAD_CHECK and stats.bad_fraction > max_bad_fraction:
        raise RuntimeError(
            f"{stats.num_bad} of {stats.seen} samples ({stats.bad_fraction:.0%}) could not be used, more than "
            f"data.max_bad_fraction={max_bad_fraction}; reasons: {dict(stats.bad)}. Fix the shards (see the "
            "warnings above for keys) or raise data.max_bad_fraction.")


class SharedEpoch:
    """The epoch number, shared with (persistent) DataLoader workers."""

    def __init__(self, epoch: int = 0) -> None:
        self.value = mp.Value("i", epoch, lock=False)  # one writer (the main process); no lock to pickle

    def get(self) -> int:
        return self.value.value

    def set(self, epoch: int) -> None:
        self.value.value = epoch


def _rng(*parts: Any) -> random.Random:
    """A generator seeded by a tuple of values, the same in every process (str seeds are hashed stably)."""
    return random.Random(" ".join(map(str, parts)))


def _worker() -> tuple[int, int]:
    """(worker id, number of workers) of this DataLoader worker; (0, 1) in the main process."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


# ----------------------------------------------------------------------------- stages


def epoch_shards(urls: list[str], seed: int, dataset: int, epoch: int) -> list[str]:
    """The shard order of one epoch of one dataset, the same on every rank."""
    urls = list(urls)
    _rng(seed, "shards", dataset, epoch).shuffle(urls)
    return urls


class ReadSamples(IterableDataset):
    """Raw tar samples of this reader (rank, worker), epoch by epoch, mixed over datasets by weight.

    Per dataset and epoch: the epoch's shard order → this rank's every world_size-th shard → this
    worker's every num_workers-th of those → tar samples → a shuffle buffer seeded by (seed, dataset,
    epoch, rank, worker). Each sample carries ``__pos__``, the ``[epoch, offset]`` of every dataset
    after it, so a loader can stop and later skip exactly that far (``resume``), reading but not
    decoding the skipped samples. Datasets are mixed by a draw seeded by the current positions.
    """

    def __init__(self, url_lists: list[list[str]], weights: list[float], *, seed: int, rank: int, world_size: int,
                 epoch: SharedEpoch, infinite: bool, epoch_seed: bool, shuffle_buffer: int, on_tar_error: Any) -> None:
        super().__init__()
        self.url_lists, self.weights, self.seed, self.rank, self.world_size = url_lists, weights, seed, rank, world_size
        self.epoch, self.infinite, self.epoch_seed, self.bufsize = epoch, infinite, epoch_seed, shuffle_buffer
        self.on_tar_error = on_tar_error
        self.resume: dict[int, list[list[int]]] = {}  # worker -> per-dataset [epoch, offset]; used once
        self.skipping = False

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
            elif failed and not self.skipping:
                self.on_tar_error(url, failed[0])

    def dataset(self, d: int, epoch: int, skip: int, worker: int, num_workers: int) -> Iterator[tuple]:
        while True:
            e = epoch if self.epoch_seed else 0
            urls = epoch_shards(self.url_lists[d], self.seed, d, e)[self.rank::self.world_size][worker::num_workers]
            samples = self.shard_samples(urls)
            if self.bufsize > 1:
                rng = _rng(self.seed, "samples", d, e, self.rank, worker)
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

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, num_workers = _worker()
        n = len(self.url_lists)
        pos = self.resume.pop(worker, None) or [[self.epoch.get(), 0] for _ in range(n)]
        streams = [self.dataset(d, e, off, worker, num_workers) for d, (e, off) in enumerate(pos)]
        done: set[int] = set()
        while len(done) < n:
            d = 0
            if n > 1:  # the first draw, seeded by where we are, that names a dataset with samples left
                rng = _rng(self.seed, "mix", self.rank, worker, pos)
                while (d := rng.choices(range(n), self.weights)[0]) in done:
                    pass
            item = next(streams[d], None)
            if item is None:
                done.add(d)
                continue
            epoch, offset, sample = item
            pos[d] = [epoch, offset]
            sample["__pos__"], sample["__epoch__"] = [list(p) for p in pos], epoch
            yield sample


class _Skip(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class DecodeClips(wds.PipelineStage):
    """Raw samples → ``{"video": [3, T, H, W] in [-1, 1], "caption", "key", "counts", "pos"}``.

    Skips (with one warning each, and a line in ``data.bad_samples_log``) and counts samples that have no
    media, do not decode, are too short, or have a missing or non-UTF-8 caption; ``counts`` holds what
    happened since the previous yielded sample. A final ``{"counts": ...}`` carries what happened after
    the last one. Images become clips of ``frames`` identical frames (T = 1 when ``frames == 1``).
    Frame offsets are drawn from a generator seeded by (seed, epoch, key): the same clip of a sample in
    every run, whatever the number of ranks and workers, and nothing to restore on resume.
    """

    def __init__(self, cfg: DataConfig, *, seed: int) -> None:
        self.cfg, self.seed = cfg, seed
        self.pending = DataStats()  # counts not yet attached to a yielded sample

    def skip_tar_error(self, url: str, exn: Exception) -> None:
        """Count a shard that broke off (``ReadSamples.shard_samples``), warn and log it."""
        detail = str(exn.args[0] if exn.args else exn)[:300]
        log.warning("shard %s is unreadable from some point on (truncated?), going on with the next: %s", url, detail)
        self.pending.add(seen=1, bad={"tar_error": 1})
        self.log_bad("-", "tar_error", url, detail)

    def log_bad(self, key: str, reason: str, url: str, detail: str) -> None:
        if self.cfg.bad_samples_log:
            line = "\t".join(x.replace("\t", " ").replace("\n", " ") for x in (key, reason, url, detail)) + "\n"
            with open(self.cfg.bad_samples_log, "a", encoding="utf-8") as f:  # one short append: atomic enough
                f.write(line)

    def caption(self, sample: dict[str, Any]) -> str:
        field_ = self.cfg.caption_field
        try:
            if field_ and "json" in sample:
                meta = json.loads(sample["json"].decode("utf-8"))
                if isinstance(meta, dict) and isinstance(meta.get(field_), str):
                    return meta[field_].strip()
            if "txt" not in sample:
                where = f"KEY.json field {field_!r} or " if field_ else ""
                raise _Skip("no_caption", f"no caption: no {where}KEY.txt")
            return sample["txt"].decode("utf-8").strip()
        except UnicodeDecodeError as e:
            raise _Skip("bad_caption", f"caption is not UTF-8: {e}") from e
        except json.JSONDecodeError as e:
            raise _Skip("bad_caption", f"KEY.json is not valid JSON: {e}") from e

    def clip(self, sample: dict[str, Any], rng: random.Random) -> tuple[torch.Tensor, str]:
        cfg = self.cfg
        video_ext = next((e for e in VIDEO_EXTS if e in sample), None)
        image_ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if video_ext is None and image_ext is None:
            exts = sorted(k for k in sample if not k.startswith("__"))
            raise _Skip("no_media", f"no video ({'/'.join(VIDEO_EXTS)}) or image ({'/'.join(IMAGE_EXTS)}); has {exts}")
        caption = self.caption(sample)
        try:
            if video_ext is not None:
                pick = FramePicker(cfg.frames, cfg.frame_stride, cfg.fps, rng)  # only these frames are decoded
                frames, _ = decode_video(sample[video_ext], pick)
                return resize_crop(frames, cfg.height, cfg.width), caption
            image = resize_crop(decode_image(sample[image_ext])[None], cfg.height, cfg.width)  # [3, 1, H, W]
            return image.expand(-1, cfg.frames, -1, -1), caption  # a still clip
        except TooShort as e:
            raise _Skip("too_short", str(e)) from e
        except (DecodeError, ValueError, IndexError, RuntimeError) as e:
            raise _Skip("decode_error", str(e)[:300]) from e

    def run(self, src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        total = DataStats()  # this process's counts in this pass, for the bad-fraction check
        pos = None
        for sample in src:
            key, pos = sample.get("__key__", "?"), sample["__pos__"]
            rng = _rng(self.seed, "frames", sample["__epoch__"], key)
            try:
                video, caption = self.clip(sample, rng)
            except _Skip as skip:
                url = sample.get("__url__", "?")
                log.warning("skipping sample %s in %s: %s (%s)", key, url, skip.reason, skip)
                self.log_bad(key, skip.reason, url, str(skip))
                self.pending.add(seen=1, bad={skip.reason: 1})
            else:
                self.pending.add(seen=1, ok=1)
                total.add(**self.pending.as_dict())
                counts, self.pending = self.pending, DataStats()
                yield {"video": video, "caption": caption, "key": key, "counts": counts, "pos": pos}
            check_bad_fraction(_sum(total, self.pending), self.cfg.max_bad_fraction)
        counts, self.pending = self.pending, DataStats()
        yield {"counts": counts, "pos": pos, "end": True}


def _sum(a: DataStats, b: DataStats) -> DataStats:
    out = DataStats()
    out.add(**a.as_dict())
    out.add(**b.as_dict())
    return out


class Batch(wds.PipelineStage):
    """Stack samples into ``{"video": [B, 3, T, H, W], "caption", "key", "seen", "bad_counts", "worker", "pos"}``.

    ``seen`` and ``bad_counts`` count what this reader read since its previous batch; ``pos`` is the
    reader position after the batch's last sample. When the reader ends (finite loaders), a final
    ``{"end": True, ...}`` without ``video`` carries the counts after the last batch (or a dropped one).
    """

    def __init__(self, batch_size: int, drop_last: bool) -> None:
        self.batch_size, self.drop_last = batch_size, drop_last

    @staticmethod
    def collate(samples: list[dict[str, Any]], counts: DataStats, **extra: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"seen": counts.seen, "bad_counts": dict(counts.bad), "worker": _worker()[0], **extra}
        if samples:
            out["video"] = torch.stack([s["video"] for s in samples])
            out["caption"] = [s["caption"] for s in samples]
            out["key"] = [s["key"] for s in samples]
            out["pos"] = samples[-1]["pos"]
        return out

    def run(self, src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        samples, counts = [], DataStats()
        for sample in src:
            counts.add(**sample["counts"].as_dict())
            if "video" in sample:
                samples.append(sample)
            if len(samples) == self.batch_size:
                yield self.collate(samples, counts)
                samples, counts = [], DataStats()
            if sample.get("end"):
                if samples and not self.drop_last:
                    yield self.collate(samples, counts)
                    samples, counts = [], DataStats()
                yield self.collate([], counts, end=True, pos=sample["pos"])


# ----------------------------------------------------------------------------- loader


class Loader:
    """Iterate for batches ``{"video": [B, 3, T, H, W], "caption": list[str], "key": list[str], "seen": int,
    "bad_counts": dict[str, int]}``. ``stats`` sums the counts of every batch (from all workers).

    Each ``iter(loader)`` starts the next epoch (shard and sample order seeded by seed + epoch when
    ``epoch_seed``); ``set_epoch`` picks one. An infinite loader runs epoch after epoch in one iteration.
    ``state_dict`` / ``load_state_dict`` (before ``iter``) resume exactly where a run stopped
    (see ``data_pipelines.state``).
    """

    def __init__(self, pipeline: wds.DataPipeline, reader: ReadSamples, *, cfg: DataConfig, batch_size: int,
                 epoch: SharedEpoch, layout: dict[str, Any]) -> None:
        self.pipeline, self.reader, self.cfg, self.batch_size = pipeline, reader, cfg, batch_size
        self.shared_epoch = epoch
        self.layout, self.rank = layout, reader.rank
        self.num_readers = max(1, cfg.num_workers)
        self.stats = DataStats()
        self.epoch = 0  # the epoch the next iter() starts
        self._current: dict[str, Any] | None = None  # the iteration in progress: epoch, readers, next_worker, ended
        self._resume: dict[str, Any] | None = None
        self.dataloader = self._dataloader()

    def _dataloader(self) -> DataLoader | None:
        if self.cfg.num_workers == 0:
            return None
        return DataLoader(self.pipeline, batch_size=None, num_workers=self.cfg.num_workers,
                          persistent_workers=True, pin_memory=torch.cuda.is_available())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def state_dict(self) -> dict[str, Any]:
        """This rank's position and counts, as plain data (safe for ``torch.load(weights_only=True)``)."""
        cur = self._current
        mine = {"rank": self.rank, "epoch": self.epoch, "readers": [], "next_worker": 0, "ended": []}
        if cur is not None:
            mine = {"rank": self.rank, "epoch": cur["epoch"], "next_worker": cur["next_worker"],
                    "ended": sorted(cur["ended"]),
                    "readers": [{"worker": w, "datasets": [list(p) for p in pos]}
                                for w, pos in sorted(cur["readers"].items())]}
        return {"version": STATE_VERSION, **self.layout, "stats": self.stats.as_dict(), "ranks": [mine]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (from ``state_dict``, or ``merge_states`` of all ranks) at the next ``iter``."""
        plan = plan_resume(state, self.layout, self.rank)
        self.stats = DataStats()
        self.stats.add(**state["stats"])
        self.epoch, self._resume = plan["epoch"], plan
        self.reader.resume = dict(plan["readers"])
        self.dataloader = self._dataloader()  # fresh workers take the resume positions with them

    def __iter__(self) -> Iterator[dict[str, Any]]:
        plan, self._resume = self._resume or {"readers": {}, "next_worker": 0, "ended": []}, None
        self.shared_epoch.set(self.epoch)
        cur = self._current = {"epoch": self.epoch, "readers": dict(plan["readers"]),
                               "next_worker": plan["next_worker"], "ended": set(plan["ended"])}
        self.epoch += 1
        source = self.dataloader if self.dataloader is not None else self.pipeline
        for batch in in_worker_order(source, self.num_readers, cur["next_worker"], cur["ended"]):
            cur["next_worker"] = batch["next_worker"]
            if batch.get("pos") is not None:
                cur["readers"][batch["worker"]] = batch["pos"]
            bad = {k: int(v) for k, v in batch["bad_counts"].items()}
            self.stats.add(seen=int(batch["seen"]), ok=int(batch["seen"]) - sum(bad.values()), bad=bad)
            check_bad_fraction(self.stats, self.cfg.max_bad_fraction)
            if "video" in batch:
                yield {k: batch[k] for k in ("video", "caption", "key", "seen", "bad_counts")}
        self._current = None


def build_loader(cfg: DataConfig, batch_size: int, *, seed: int = 0, epoch_seed: bool = True, infinite: bool = True,
                 drop_last: bool = True) -> Loader:
    """Build the loader for ``cfg`` (a ``DataConfig``); missing shard paths fail here, before any work.

    ``seed`` must be the same on every rank: the ranks split one shard order between them (sample
    shuffles differ by rank and worker; frame offsets by sample). ``infinite=True`` runs epoch after
    epoch in one iteration, so ranks never run dry at different times; ``infinite=False`` gives one
    epoch per ``iter(loader)`` (evaluation, tests). ``drop_last`` drops a short final batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sources = cfg.sources()
    url_lists = [expand_shards(spec) for spec, _ in sources]
    rank, world_size, _, _ = wds.utils.pytorch_worker_info()  # torch.distributed, or RANK / WORLD_SIZE
    readers = world_size * max(1, cfg.num_workers)
    if not infinite and min(map(len, url_lists)) < readers:
        log.warning("%d shards for %d readers (ranks x workers): some readers get no data; use more shards "
                    "or fewer data.num_workers", min(map(len, url_lists)), readers)
    epoch = SharedEpoch()
    decoder = DecodeClips(cfg, seed=seed)
    reader = ReadSamples(url_lists, [w for _, w in sources], seed=seed, rank=rank, world_size=world_size,
                         epoch=epoch, infinite=infinite, epoch_seed=epoch_seed, shuffle_buffer=cfg.shuffle_buffer,
                         on_tar_error=decoder.skip_tar_error)
    pipeline = wds.DataPipeline(reader, decoder, Batch(batch_size, drop_last))
    layout = {"world_size": world_size, "num_workers": cfg.num_workers, "seed": seed, "batch_size": batch_size,
              "shuffle_buffer": cfg.shuffle_buffer, "epoch_seed": epoch_seed,
              "shards": fingerprint(url_lists + [[repr(w) for _, w in sources]])}
    return Loader(pipeline, reader, cfg=cfg, batch_size=batch_size, epoch=epoch, layout=layout)
