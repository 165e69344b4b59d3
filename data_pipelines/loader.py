"""The training data loader: WebDataset shards → batches of clips ``[B, 3, T, H, W]`` in [-1, 1].

The pipeline is a visible list of small stages (as in open_clip's ``get_wds_dataset``):

    EpochShards        shard URLs, shuffled by seed + epoch; one pass per epoch, or endless epochs
    SplitByNode        each rank takes every world_size-th shard (rank and world size read at build time)
    split_by_worker    each DataLoader worker takes every num_workers-th shard of its rank
    tarfile_to_samples tar members grouped by key: {"__key__", "mp4" | "jpg" | ..., "txt", "json"}
    SeededShuffle      a sample buffer of data.shuffle_buffer, seeded by (seed, epoch, rank, worker)
    DecodeClips        decode + sample frames + resize/crop; bad samples are logged, counted and skipped
    Batch              stack into {"video", "caption", "key"} plus the counts since the last batch

Bad samples never stop a run unless more than ``data.max_bad_fraction`` of them fail (checked after
20 samples). Counts by reason travel with the batches, so ``loader.stats`` is right with workers too.
"""

from __future__ import annotations

import itertools
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

from data_pipelines.decode import IMAGE_EXTS, VIDEO_EXTS, DecodeError, decode_image, decode_video, resize_crop
from data_pipelines.sampling import TooShort, frame_indices
from data_pipelines.shards import expand_shards
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


def _worker() -> int:
    info = get_worker_info()
    return info.id if info is not None else 0


# ----------------------------------------------------------------------------- stages


class EpochShards(IterableDataset):
    """Shard URLs in an order shuffled by (seed, epoch): one pass, or epoch after epoch when ``infinite``."""

    def __init__(self, urls: list[str], *, seed: int, epoch: SharedEpoch, infinite: bool, epoch_seed: bool) -> None:
        super().__init__()
        self.urls, self.seed, self.epoch, self.infinite, self.epoch_seed = list(urls), seed, epoch, infinite, epoch_seed

    def __iter__(self) -> Iterator[dict[str, str]]:
        epoch = self.epoch.get()
        while True:
            urls = list(self.urls)
            _rng(self.seed, "shards", epoch if self.epoch_seed else 0).shuffle(urls)
            for url in urls:
                yield {"url": url}
            if not self.infinite:
                return
            epoch += 1


class SplitByNode(wds.PipelineStage):
    """Rank ``rank`` of ``world_size`` takes every world_size-th shard.

    Unlike ``wds.split_by_node``, the rank is fixed when the loader is built (in the training process),
    so DataLoader workers split correctly even where RANK / WORLD_SIZE are not in the environment.
    """

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size

    def run(self, src: Iterator[dict]) -> Iterator[dict]:
        return itertools.islice(src, self.rank, None, self.world_size)


class SeededShuffle(wds.PipelineStage):
    """A shuffle buffer seeded by (seed, epoch, rank, worker): reproducible, different per worker and epoch."""

    def __init__(self, bufsize: int, *, seed: int, rank: int, epoch: SharedEpoch, epoch_seed: bool) -> None:
        self.bufsize, self.seed, self.rank, self.epoch, self.epoch_seed = bufsize, seed, rank, epoch, epoch_seed

    def run(self, src: Iterator[dict]) -> Iterator[dict]:
        if self.bufsize <= 1:
            return src
        rng = _rng(self.seed, "samples", self.epoch.get() if self.epoch_seed else 0, self.rank, _worker())
        return wds.shuffle(self.bufsize, initial=self.bufsize, rng=rng)(src)


class _Skip(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class DecodeClips(wds.PipelineStage):
    """Raw samples → ``{"video": [3, T, H, W] in [-1, 1], "caption", "key", "counts"}``.

    Skips (with one warning each) and counts samples that have no media, do not decode, are too
    short, or have a missing or non-UTF-8 caption; ``counts`` holds what happened since the previous
    yielded sample. A final ``{"counts": ...}`` carries what happened after the last one.
    Images become clips of ``frames`` identical frames (T = 1 when ``frames == 1``).
    """

    def __init__(self, cfg: DataConfig, *, seed: int, rank: int, epoch: SharedEpoch, epoch_seed: bool) -> None:
        self.cfg, self.seed, self.rank, self.epoch, self.epoch_seed = cfg, seed, rank, epoch, epoch_seed
        self.pending = DataStats()  # counts not yet attached to a yielded sample

    def skip_tar_error(self, exn: Exception) -> bool:
        """``tarfile_to_samples`` handler: warn, count, and go on with the next shard."""
        log.warning("skipping unreadable tar data: %s", str(exn)[:300])
        self.pending.add(seen=1, bad={"tar_error": 1})
        return True

    def clip(self, sample: dict[str, Any], rng: random.Random) -> tuple[torch.Tensor, str]:
        cfg = self.cfg
        video_ext = next((e for e in VIDEO_EXTS if e in sample), None)
        image_ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if video_ext is None and image_ext is None:
            exts = sorted(k for k in sample if not k.startswith("__"))
            raise _Skip("no_media", f"no video ({'/'.join(VIDEO_EXTS)}) or image ({'/'.join(IMAGE_EXTS)}); has {exts}")
        if "txt" not in sample:
            raise _Skip("no_caption", "no .txt caption")
        try:
            caption = sample["txt"].decode("utf-8").strip()
        except UnicodeDecodeError as e:
            raise _Skip("bad_caption", f"caption is not UTF-8: {e}") from e
        try:
            if video_ext is not None:
                pick = lambda n: frame_indices(n, cfg.frames, cfg.frame_stride, rng)  # only these are decoded
                frames, _ = decode_video(sample[video_ext], pick)
                return resize_crop(frames, cfg.height, cfg.width), caption
            image = resize_crop(decode_image(sample[image_ext])[None], cfg.height, cfg.width)  # [3, 1, H, W]
            return image.expand(-1, cfg.frames, -1, -1), caption  # a still clip
        except TooShort as e:
            raise _Skip("too_short", str(e)) from e
        except (DecodeError, ValueError, IndexError, RuntimeError) as e:
            raise _Skip("decode_error", str(e)[:300]) from e

    def run(self, src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        rng = _rng(self.seed, "frames", self.epoch.get() if self.epoch_seed else 0, self.rank, _worker())
        total = DataStats()  # this process's counts in this pass, for the bad-fraction check
        for sample in src:
            key = sample.get("__key__", "?")
            try:
                video, caption = self.clip(sample, rng)
            except _Skip as skip:
                log.warning("skipping sample %s in %s: %s (%s)", key, sample.get("__url__", "?"), skip.reason, skip)
                self.pending.add(seen=1, bad={skip.reason: 1})
            else:
                self.pending.add(seen=1, ok=1)
                total.add(**self.pending.as_dict())
                counts, self.pending = self.pending, DataStats()
                yield {"video": video, "caption": caption, "key": key, "counts": counts}
            check_bad_fraction(_sum(total, self.pending), self.cfg.max_bad_fraction)
        if self.pending:
            counts, self.pending = self.pending, DataStats()
            yield {"counts": counts}


def _sum(a: DataStats, b: DataStats) -> DataStats:
    out = DataStats()
    out.add(**a.as_dict())
    out.add(**b.as_dict())
    return out


class Batch(wds.PipelineStage):
    """Stack samples into ``{"video": [B, 3, T, H, W], "caption", "key", "seen", "bad_counts"}``.

    ``seen`` and ``bad_counts`` count what this process read since its previous batch. Counts that
    arrive after the last batch (or with a dropped partial batch) come as a batch without ``video``.
    """

    def __init__(self, batch_size: int, drop_last: bool) -> None:
        self.batch_size, self.drop_last = batch_size, drop_last

    @staticmethod
    def collate(samples: list[dict[str, Any]], counts: DataStats) -> dict[str, Any]:
        out: dict[str, Any] = {"seen": counts.seen, "bad_counts": dict(counts.bad)}
        if samples:
            out["video"] = torch.stack([s["video"] for s in samples])
            out["caption"] = [s["caption"] for s in samples]
            out["key"] = [s["key"] for s in samples]
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
        if samples and not self.drop_last:
            yield self.collate(samples, counts)
        elif counts:
            yield self.collate([], counts)


# ----------------------------------------------------------------------------- loader


class Loader:
    """Iterate for batches ``{"video": [B, 3, T, H, W], "caption": list[str], "key": list[str], "seen": int,
    "bad_counts": dict[str, int]}``. ``stats`` sums the counts of every batch (from all workers).

    Each ``iter(loader)`` starts the next epoch (shard and sample order seeded by seed + epoch when
    ``epoch_seed``); ``set_epoch`` picks one. An infinite loader runs epoch after epoch in one iteration.
    """

    def __init__(self, pipeline: wds.DataPipeline, *, cfg: DataConfig, batch_size: int, epoch: SharedEpoch) -> None:
        self.pipeline, self.cfg, self.batch_size, self.shared_epoch = pipeline, cfg, batch_size, epoch
        self.stats = DataStats()
        self.epoch = 0
        self.dataloader = None
        if cfg.num_workers > 0:
            self.dataloader = DataLoader(pipeline, batch_size=None, num_workers=cfg.num_workers,
                                         persistent_workers=True, pin_memory=torch.cuda.is_available())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.shared_epoch.set(self.epoch)
        self.epoch += 1
        for batch in self.dataloader if self.dataloader is not None else self.pipeline:
            bad = {k: int(v) for k, v in batch["bad_counts"].items()}
            self.stats.add(seen=int(batch["seen"]), ok=int(batch["seen"]) - sum(bad.values()), bad=bad)
            check_bad_fraction(self.stats, self.cfg.max_bad_fraction)
            if "video" in batch:
                yield batch


def build_loader(cfg: DataConfig, batch_size: int, *, seed: int = 0, epoch_seed: bool = True, infinite: bool = True,
                 drop_last: bool = True) -> Loader:
    """Build the loader for ``cfg`` (a ``DataConfig``); missing shard paths fail here, before any work.

    ``seed`` must be the same on every rank: the ranks split one shard order between them (sample
    shuffles and frame offsets differ by rank and worker anyway). ``infinite=True`` runs epoch after
    epoch in one iteration, so ranks never run dry at different times; ``infinite=False`` gives one
    epoch per ``iter(loader)`` (evaluation, tests). ``drop_last`` drops a short final batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    urls = expand_shards(cfg.shards)
    rank, world_size, _, _ = wds.utils.pytorch_worker_info()  # torch.distributed, or RANK / WORLD_SIZE
    readers = world_size * max(1, cfg.num_workers)
    if not infinite and len(urls) < readers:
        log.warning("%d shards for %d readers (ranks x workers): some readers get no data; use more shards "
                    "or fewer data.num_workers", len(urls), readers)
    epoch = SharedEpoch()
    decoder = DecodeClips(cfg, seed=seed, rank=rank, epoch=epoch, epoch_seed=epoch_seed)
    pipeline = wds.DataPipeline(
        EpochShards(urls, seed=seed, epoch=epoch, infinite=infinite, epoch_seed=epoch_seed),
        SplitByNode(rank, world_size),
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=decoder.skip_tar_error),
        SeededShuffle(cfg.shuffle_buffer, seed=seed, rank=rank, epoch=epoch, epoch_seed=epoch_seed),
        decoder,
        Batch(batch_size, drop_last),
    )
    return Loader(pipeline, cfg=cfg, batch_size=batch_size, epoch=epoch)
