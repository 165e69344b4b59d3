"""The training data loader: WebDataset shards → batches of clips ``[B, 3, T, H, W]`` in [-1, 1], or with
``data.latents`` batches of stored VAE posteriors ``[B, C, t, h, w]`` (+ text states) from ``dit encode``.

The pipeline is a visible list of small stages (as in open_clip's ``get_wds_dataset``):

    ReadSamples        (reader.py) per dataset and epoch: shards shuffled by seed + epoch → this rank's and
                       this worker's share → tar samples → a seeded shuffle buffer; datasets mixed by
                       weight; each sample carries the reader's position (for ``state_dict``)
    DecodeClips        decode + sample frames (+ pick a bucket) + resize/crop, or load a latent sample (+ its
                       bucket); bad samples are logged, counted and skipped
    Batch              stack into {"video" | "mean", "logvar"[, "text", "text_mask"], "caption", "key"} plus the
                       counts since the last batch (one queue per bucket with data.buckets.enabled); with
                       data.image_ratio it tells the reader (KindSchedule) which kind the next batch is
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
from torch.utils.data import DataLoader

from data_pipelines.buckets import Bucket, BucketChooser, NoBucket
from data_pipelines.config import ConfigError, DataConfig, pixel_shape
from data_pipelines.decode import IMAGE_EXTS, VIDEO_EXTS, DecodeError, decode_image, decode_video, resize_crop
from data_pipelines.decoded_cache import DecodedCache
from data_pipelines.latents import (
    IMAGE_CODE,
    IMAGE_STATES,
    LOGVAR,
    MEAN,
    TEXT,
    TEXT_MASK,
    latent_compression,
    latent_kind,
    load_npy,
)
from data_pipelines.reader import KindSchedule, ReadSamples, SharedEpoch, seeded, worker_info
from data_pipelines.sampling import FramePicker, TooShort
from data_pipelines.shards import expand_shards
from data_pipelines.state import VERSION as STATE_VERSION
from data_pipelines.state import fingerprint, in_worker_order, plan_resume
from data_pipelines.worker_crash import WorkerPositions, crash_report

log = logging.getLogger(__name__)

MIN_SAMPLES_FOR_BAD_CHECK = 20
# Why a sample was skipped. tar_error counts a shard that broke off (truncated, missing, a failed pipe:);
# bucket_* count samples that fit no bucket (data_pipelines/buckets.py); latent_shape a latent sample whose shape
# is no bucket's (or not data.frames x height x width).
REASONS = ("no_media", "decode_error", "too_short", "no_caption", "bad_caption", "tar_error", "bucket_aspect",
           "bucket_no_image", "latent_shape")


@dataclass
class DataStats:
    """Samples read (``seen``), decoded (``ok``), skipped by reason (``bad``) and batched by bucket (``buckets``)."""

    seen: int = 0
    ok: int = 0
    bad: Counter = field(default_factory=Counter)
    buckets: Counter = field(default_factory=Counter)

    @property
    def num_bad(self) -> int:
        return sum(self.bad.values())

    @property
    def bad_fraction(self) -> float:
        return self.num_bad / self.seen if self.seen else 0.0

    def add(self, seen: int = 0, ok: int = 0, bad: dict[str, int] | None = None,
            buckets: dict[str, int] | None = None) -> None:
        self.seen += seen
        self.ok += ok
        self.bad.update(bad or {})
        self.buckets.update(buckets or {})

    def as_dict(self) -> dict[str, Any]:
        out = {"seen": self.seen, "ok": self.ok, "bad": dict(self.bad)}
        return out | ({"buckets": dict(self.buckets)} if self.buckets else {})

    def __bool__(self) -> bool:
        return self.seen > 0

    def __add__(self, other: DataStats) -> DataStats:
        out = DataStats()
        out.add(**self.as_dict())
        out.add(**other.as_dict())
        return out


class TooManyBadSamples(ConfigError, RuntimeError):
    """More than ``data.max_bad_fraction`` of the samples could not be used: bad data, which the user fixes (the
    command prints it as one ``error:`` line, like a config error), not a bug."""


def check_bad_fraction(stats: DataStats, max_bad_fraction: float, *, min_samples: int = MIN_SAMPLES_FOR_BAD_CHECK,
                       where: str = "") -> None:
    """Raise ``TooManyBadSamples`` once more than ``max_bad_fraction`` of at least ``min_samples`` samples failed;
    ``where`` says which samples the counts are of (e.g. " in epoch 0")."""
    if stats.seen >= min_samples and stats.bad_fraction > max_bad_fraction:
        raise TooManyBadSamples(
            f"{stats.num_bad} of {stats.seen} samples ({stats.bad_fraction:.0%}){where} could not be used, more "
            f"than data.max_bad_fraction={max_bad_fraction}; reasons: {dict(stats.bad)}. Fix the shards (see the "
            "warnings above for keys; `dit inspect-shards` shows what they hold) or raise data.max_bad_fraction.")


class _Skip(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class DecodeClips(wds.PipelineStage):
    """Raw samples → ``{"video": [3, T, H, W] in [-1, 1], "caption", "key", "counts", "pos"}``; with
    ``data.latents`` latent samples → ``{"mean", "logvar": [C, t, h, w], "text": [L, D] (when stored), ...}``.

    Skips (with one warning each, and a line in ``data.bad_samples_log``) and counts samples that have no
    media, do not decode, are too short, or have a missing or non-UTF-8 caption; ``counts`` holds what
    happened since the previous yielded sample. A final ``{"counts": ...}`` carries what happened after
    the last one. Images become clips of ``frames`` identical frames (T = 1 when ``frames == 1``).
    Frame offsets are drawn from a generator seeded by (seed, epoch, key): the same clip of a sample in
    every run, whatever the number of ranks and workers, and nothing to restore on resume.
    """

    def __init__(self, cfg: DataConfig, *, seed: int, batch_size: int) -> None:
        self.cfg, self.seed = cfg, seed
        self.buckets = BucketChooser(cfg.buckets, batch_size) if cfg.buckets.enabled else None
        self.pending = DataStats()  # counts not yet attached to a yielded sample
        self.tar_errors = 0  # broken shards not yet in the bad-fraction check's counts (see run)
        self.positions: WorkerPositions | None = None  # with workers: where each is, for a crash report
        self.cache = DecodedCache(cfg.decode_cache_mb) if cfg.decode_cache_mb > 0 else None

    def skip_tar_error(self, url: str, exn: Exception) -> None:
        """Count a shard that broke off (``ReadSamples.shard_samples``), warn and log it."""
        detail = str(exn.args[0] if exn.args else exn)[:300]
        log.warning("shard %s is unreadable from some point on (truncated?), going on with the next: %s", url, detail)
        self.pending.add(seen=1, bad={"tar_error": 1})
        self.tar_errors += 1
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

    def kind_of(self, sample: dict[str, Any]) -> str | None:
        """"image" or "video": the batches a sample can join, told before decoding (data.image_ratio); None: neither."""
        if self.cfg.latents:
            return latent_kind(sample)
        if any(e in sample for e in VIDEO_EXTS):
            return "video"
        return "image" if any(e in sample for e in IMAGE_EXTS) else None

    def media(self, sample: dict[str, Any], rng: random.Random) -> tuple[dict[str, torch.Tensor], str, Any]:
        """``({"video": ...} or {"mean", "logvar"[, "text"]}, caption, bucket or None)``; raises ``_Skip``."""
        if self.cfg.latents:
            return self.latent(sample)
        video, caption, bucket = self.clip(sample, rng)
        return {"video": video}, caption, bucket

    def latent(self, sample: dict[str, Any]) -> tuple[dict[str, torch.Tensor], str, Bucket | None]:
        """A latent sample's posterior (and text states), caption and bucket: the bucket of exactly its pixel
        shape (latent shape x the VAE's compression); raises ``_Skip`` with the reason."""
        cfg = self.cfg
        if MEAN not in sample or LOGVAR not in sample:
            exts = sorted(k for k in sample if not k.startswith("__"))
            hint = "; a raw shard? set data.latents=false" if self.has_raw_media(sample) else ""
            raise _Skip("no_media", f"no KEY.{MEAN} + KEY.{LOGVAR} (data.latents=true reads `dit encode` latent "
                                    f"shards); has {exts}{hint}")
        caption = self.caption(sample)
        try:
            fields = {"mean": load_npy(sample[MEAN]), "logvar": load_npy(sample[LOGVAR])}
            if TEXT in sample:
                fields["text"] = load_npy(sample[TEXT])
                if TEXT_MASK in sample:  # all the states (text.padding=unmasked): which are real tokens
                    fields["text_mask"] = load_npy(sample[TEXT_MASK])
            if IMAGE_CODE in sample:  # Wan I2V's image code
                fields["image_code"] = load_npy(sample[IMAGE_CODE])
            if IMAGE_STATES in sample:  # Wan 2.1 I2V's CLIP states, HunyuanVideo 1.5 I2V's SigLIP states
                fields["image_states"] = load_npy(sample[IMAGE_STATES])
        except (ValueError, OSError, EOFError) as e:
            raise _Skip("decode_error", f"not a plain .npy array: {str(e)[:300]}") from e
        mean, logvar, text = fields["mean"], fields["logvar"], fields.get("text")
        text_mask = fields.get("text_mask")
        code, states = fields.get("image_code"), fields.get("image_states")
        if (mean.ndim != 4 or mean.shape != logvar.shape or (text is not None and text.ndim != 2)
                or (text_mask is not None and tuple(text_mask.shape) != tuple(text.shape[:1]))
                or (code is not None and code.shape != mean.shape) or (states is not None and states.ndim != 2)):
            shapes = {k: tuple(v.shape) for k, v in fields.items()}
            raise _Skip("decode_error", f"expected mean and logvar [C, t, h, w] of one shape (and text [L, D], "
                                        f"text_mask [L], image_code as mean, image_states [n, D]), got {shapes}")
        if text_mask is not None:
            fields["text_mask"] = text_mask > 0.5
        temporal, spatial = latent_compression(sample)  # the VAE's that coded it (dit encode records it)
        frames, height, width = pixel_shape(*mean.shape[1:], temporal=temporal, spatial=spatial)
        if self.buckets is not None:
            try:
                return fields, caption, self.buckets.exact(frames, height, width)
            except NoBucket as e:
                raise _Skip(e.reason, str(e)) from e
        if (frames, height, width) != (cfg.frames, cfg.height, cfg.width):
            raise _Skip("latent_shape", f"a latent of {frames}x{height}x{width} (frames x height x width), not "
                                        f"data.frames x height x width = {cfg.frames}x{cfg.height}x{cfg.width}")
        return fields, caption, None

    @staticmethod
    def has_raw_media(sample: dict[str, Any]) -> bool:
        return any(e in sample for e in VIDEO_EXTS + IMAGE_EXTS)

    def clip(self, sample: dict[str, Any], rng: random.Random) -> tuple[torch.Tensor, str, Any]:
        """``(video [3, T, H, W], caption, bucket or None)``; raises ``_Skip`` with the reason."""
        cfg, buckets = self.cfg, self.buckets
        video_ext = next((e for e in VIDEO_EXTS if e in sample), None)
        image_ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if video_ext is None and image_ext is None:
            exts = sorted(k for k in sample if not k.startswith("__"))
            hint = "; a latent shard from `dit encode`? set data.latents=true" if MEAN in sample else ""
            raise _Skip("no_media", f"no video ({'/'.join(VIDEO_EXTS)}) or image ({'/'.join(IMAGE_EXTS)}); has "
                                    f"{exts}{hint}")
        caption = self.caption(sample)
        try:
            if video_ext is not None:
                count = buckets.video_frames if buckets else cfg.frames
                pick = FramePicker(count, cfg.frame_stride, cfg.fps, rng)  # only these frames are decoded
                if self.cache is not None:
                    frames = self.cache.video(sample.get("__url__", "?"), sample["__key__"], sample[video_ext], pick)
                else:
                    frames, _ = decode_video(sample[video_ext], pick)
                bucket = buckets.choose(len(frames), *frames.shape[1:3], image=False) if buckets else None
                size = (bucket.height, bucket.width) if bucket else (cfg.height, cfg.width)
                return resize_crop(frames, *size), caption, bucket
            image = decode_image(sample[image_ext])
            bucket = buckets.choose(1, *image.shape[:2], image=True) if buckets else None
            size = (bucket.height, bucket.width) if bucket else (cfg.height, cfg.width)
            clip = resize_crop(image[None], *size)  # [3, 1, H, W]
            return (clip, caption, bucket) if bucket else (clip.expand(-1, cfg.frames, -1, -1), caption, None)
        except TooShort as e:
            raise _Skip("too_short", str(e)) from e
        except NoBucket as e:
            raise _Skip(e.reason, str(e)) from e
        except (DecodeError, ValueError, IndexError, RuntimeError) as e:
            raise _Skip("decode_error", str(e)[:300]) from e

    def run(self, src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        # The bad-fraction check counts each stream's samples of the epoch it is reading, so a sample read again
        # in a later epoch is not counted twice. A stream that wraps to its next epoch has been read whole: that
        # epoch is judged on all its samples, however few (fewer than MIN_SAMPLES_FOR_BAD_CHECK too).
        epochs: dict[int, int] = {}  # stream -> the epoch of it being read
        read: dict[int, DataStats] = {}  # stream -> this reader's counts in that epoch
        where = {"pos": None, "draws": 0}
        for sample in src:
            s, epoch = sample["__dataset__"], sample["__epoch__"]
            if epochs.get(s, epoch) != epoch:
                check_bad_fraction(read.pop(s), self.cfg.max_bad_fraction, min_samples=1,
                                   where=f" in epoch {epochs[s]} (this reader's whole share of it)")
            epochs[s] = epoch
            mine = read.setdefault(s, DataStats())
            mine.add(seen=self.tar_errors, bad={"tar_error": self.tar_errors} if self.tar_errors else {})
            self.tar_errors = 0  # (counted with the stream read next: a broken shard reports no stream)
            key = sample.get("__key__", "?")
            where = {"pos": sample["__pos__"], "draws": sample["__draw__"] + 1}
            rng = seeded(self.seed, "frames", sample["__epoch__"], key)
            if self.positions is not None:
                self.positions.mark(sample.get("__url__", "?"), key)
            try:
                fields, caption, bucket = self.media(sample, rng)
            except _Skip as skip:
                url = sample.get("__url__", "?")
                log.warning("skipping sample %s in %s: %s (%s)", key, url, skip.reason, skip)
                self.log_bad(key, skip.reason, url, str(skip))
                self.pending.add(seen=1, bad={skip.reason: 1})
                mine.add(seen=1, bad={skip.reason: 1})
            else:
                if not sample["__replay__"]:  # a replayed sample was counted before the stop
                    self.pending.add(seen=1, ok=1)
                    mine.add(seen=1, ok=1)
                counts, self.pending = self.pending, DataStats()
                yield {**fields, "caption": caption, "key": key, "counts": counts, "bucket": bucket,
                       "waiting": [sample["__pos__"], sample["__dataset__"], sample["__draw__"]], **where}
            check_bad_fraction(sum(read.values(), DataStats()), self.cfg.max_bad_fraction,
                               where=" read in the current epoch (by this reader)")
        counts, self.pending = self.pending, DataStats()
        yield {"counts": counts, "end": True, **where}


class Batch(wds.PipelineStage):
    """Stack samples into ``{"video": [B, 3, T, H, W], "caption", "key", "seen", "bad_counts", "worker", "pos",
    "draws", "pending", "batches"}`` (and ``"bucket"`` with buckets: a queue per bucket, each with its batch size).
    Latent samples give ``"mean"``, ``"logvar"`` ``[B, C, t, h, w]`` instead of ``"video"``, and, when every sample
    has them, ``"text"`` ``[B, L, D]`` (zero-padded to the longest) with ``"text_mask"`` ``[B, L]``, and Wan 2.1
    I2V's ``"image_code"`` ``[B, C, t, h, w]`` and ``"image_states"`` ``[B, n, D]``.

    ``seen`` and ``bad_counts`` count what this reader read since its previous batch; ``pos`` and
    ``draws`` say where the reader is; ``pending`` lists the samples still waiting in bucket queues;
    ``batches`` counts this reader's batches (the ``KindSchedule`` position with data.image_ratio).
    When the reader ends (finite loaders), the partial queues follow (unless ``drop_last``), then a
    final ``{"end": True, ...}`` without ``key`` with the counts after the last batch.
    """

    def __init__(self, batch_size: int, drop_last: bool, schedule: KindSchedule) -> None:
        self.batch_size, self.drop_last, self.schedule = batch_size, drop_last, schedule

    def collate(self, samples: list[dict[str, Any]], counts: DataStats, where: dict[str, Any],
                queues: dict[Any, list[dict[str, Any]]], **extra: Any) -> dict[str, Any]:
        if samples:  # (with data.image_ratio the reader now draws the next batch's kind)
            self.schedule.batches += 1
        waiting = sorted((s["waiting"] for q in queues.values() for s in q), key=lambda w: w[2])
        out: dict[str, Any] = {"seen": counts.seen, "bad_counts": dict(counts.bad), "worker": worker_info()[0],
                               "pos": where["pos"], "draws": where["draws"], "pending": waiting,
                               "batches": self.schedule.batches, **extra}
        if samples:
            for name in ("video", "mean", "logvar"):
                if name in samples[0]:
                    out[name] = torch.stack([s[name] for s in samples])
            for name in ("image_code", "image_states"):  # (an I2V model's, when every sample has them)
                if all(name in s for s in samples):
                    out[name] = torch.stack([s[name] for s in samples])
            if all("text" in s for s in samples):  # [L_i, D] each -> [B, L, D] + mask
                lengths = [s["text"].shape[0] for s in samples]
                out["text"] = torch.zeros(len(samples), max(lengths), samples[0]["text"].shape[1])
                out["text_mask"] = torch.zeros(len(samples), max(lengths), dtype=torch.bool)
                for i, (s, n) in enumerate(zip(samples, lengths)):  # the stored mask, or all real
                    out["text"][i, :n], out["text_mask"][i, :n] = s["text"], s.get("text_mask", True)
            out["caption"] = [s["caption"] for s in samples]
            out["key"] = [s["key"] for s in samples]
            if samples[0]["bucket"] is not None:
                out["bucket"] = samples[0]["bucket"].name
        return out

    def run(self, src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        queues: dict[Any, list[dict[str, Any]]] = {}  # bucket (None: no buckets) -> samples, oldest first
        counts = DataStats()
        for sample in src:
            counts.add(**sample["counts"].as_dict())
            where = {"pos": sample["pos"], "draws": sample["draws"]}
            if "key" in sample:
                bucket = sample["bucket"]
                queue = queues.setdefault(bucket, [])
                queue.append(sample)
                if len(queue) == (bucket.batch_size if bucket else self.batch_size):
                    del queues[bucket]
                    yield self.collate(queue, counts, where, queues)
                    counts = DataStats()
            if sample.get("end"):
                while queues and not self.drop_last:  # oldest queue first
                    bucket = min(queues, key=lambda b: queues[b][0]["waiting"][2])
                    yield self.collate(queues.pop(bucket), counts, where, queues)
                    counts = DataStats()
                yield self.collate([], counts, where, {}, end=True)


# ----------------------------------------------------------------------------- loader


BATCH_KEYS = ("video", "mean", "logvar", "text", "text_mask", "image_code", "image_states", "caption", "key", "seen",
              "bad_counts", "bucket")


class Loader:
    """Iterate for batches ``{"video": [B, 3, T, H, W], "caption": list[str], "key": list[str], "seen": int,
    "bad_counts": dict[str, int]}`` (+ ``"bucket": "TxHxW"`` with buckets; ``"mean"``, ``"logvar"`` and maybe
    ``"text"``, ``"text_mask"`` instead of ``"video"`` with ``data.latents``, see ``Batch``). ``stats`` sums the
    counts of every batch (from all workers) and the samples batched per bucket.

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
        self.decoder = next(s for s in pipeline.pipeline if isinstance(s, DecodeClips))
        self.dataloader = self._dataloader()

    def _dataloader(self) -> DataLoader | None:
        if self.cfg.num_workers == 0:
            return None
        # Workers start from a clean forkserver process, not by forking this one: a fork inherits locks that
        # threads here (ffmpeg/decord/PyAV, queue feeders of other loaders) may hold, and can hang the worker.
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["data_pipelines.loader"])
        self.decoder.positions = WorkerPositions(self.cfg.num_workers, ctx)
        return DataLoader(self.pipeline, batch_size=None, num_workers=self.cfg.num_workers,
                          persistent_workers=True, pin_memory=torch.cuda.is_available(), multiprocessing_context=ctx)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def close(self) -> None:
        """Stop the worker processes now (they are persistent). Do this before building another loader with
        workers in the same process: forking while an old loader's queue threads run can hang the new workers."""
        it = getattr(self.dataloader, "_iterator", None)
        if it is not None:
            it._shutdown_workers()
            self.dataloader._iterator = None

    def state_dict(self) -> dict[str, Any]:
        """This rank's position and counts, as plain data (safe for ``torch.load(weights_only=True)``)."""
        cur = self._current
        mine = {"rank": self.rank, "epoch": self.epoch, "readers": [], "next_worker": 0, "ended": []}
        if cur is not None:
            mine = {"rank": self.rank, "epoch": cur["epoch"], "next_worker": cur["next_worker"],
                    "ended": sorted(cur["ended"]),
                    "readers": [{"worker": w, **r} for w, r in sorted(cur["readers"].items())]}
        return {"version": STATE_VERSION, **self.layout, "stats": self.stats.as_dict(), "ranks": [mine]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (from ``state_dict``, or ``merge_states`` of all ranks) at the next ``iter``."""
        plan = plan_resume(state, self.layout, self.rank)
        self.stats = DataStats()
        self.stats.add(**state["stats"])
        self.epoch, self._resume = plan["epoch"], plan
        self.reader.resume = dict(plan["readers"])
        self.close()
        self.dataloader = self._dataloader()  # fresh workers take the resume positions with them

    def __iter__(self) -> Iterator[dict[str, Any]]:
        plan, self._resume = self._resume or {"readers": {}, "next_worker": 0, "ended": []}, None
        self.shared_epoch.set(self.epoch)
        cur = self._current = {"epoch": self.epoch, "readers": dict(plan["readers"]),
                               "next_worker": plan["next_worker"], "ended": set(plan["ended"])}
        self.epoch += 1
        source = self.dataloader if self.dataloader is not None else self.pipeline
        for batch in self._reported(in_worker_order(source, self.num_readers, cur["next_worker"], cur["ended"])):
            cur["next_worker"] = batch["next_worker"]
            if batch["pos"] is not None:
                cur["readers"][batch["worker"]] = {"datasets": batch["pos"], "draws": batch["draws"],
                                                   "pending": batch["pending"], "batches": batch["batches"]}
            bad = {k: int(v) for k, v in batch["bad_counts"].items()}
            self.stats.add(seen=int(batch["seen"]), ok=int(batch["seen"]) - sum(bad.values()), bad=bad)
            check_bad_fraction(self.stats, self.cfg.max_bad_fraction, where=" read so far (every epoch)")
            if "key" in batch:
                if "bucket" in batch:
                    self.stats.buckets[batch["bucket"]] += len(batch["key"])
                yield {k: batch[k] for k in BATCH_KEYS if k in batch}
        self._current = None

    def _reported(self, batches: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """``batches``, with a dead worker reported by the sample it was on (``LoaderWorkerDied``)."""
        try:
            yield from batches
        except RuntimeError as e:
            report = crash_report(e, self.dataloader, self.decoder.positions) if self.dataloader is not None else None
            if report is None:
                raise
            raise report from None


def build_loader(cfg: DataConfig, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 epoch_seed: bool = True, infinite: bool = True, drop_last: bool = True) -> Loader:
    """Build the loader for ``cfg`` (a ``DataConfig``); missing shard paths fail here, before any work.

    ``rank`` / ``world_size``: this process's place in the data-parallel group, which splits the shards (the
    caller says it; the loader never reads torch.distributed or the environment). ``seed`` must be the same on
    every rank: the ranks split one shard order between them (sample shuffles differ by rank and worker; frame
    offsets by sample). ``infinite=True`` runs epoch after epoch in one iteration, so ranks never run dry at
    different times; ``infinite=False`` gives one epoch per ``iter(loader)`` (evaluation, tests). ``drop_last``
    drops a short final batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sources = cfg.sources()
    url_lists = [expand_shards(spec) for spec, _ in sources]
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    readers = world_size * max(1, cfg.num_workers)
    if min(map(len, url_lists)) < readers:
        msg = (f"{min(map(len, url_lists))} shards for {readers} readers (ranks x data.num_workers): each shard is "
               "read by exactly one reader, so some get no data; write more, smaller shards (dit make-shards) or "
               "set fewer data.num_workers")
        if infinite:  # a training reader without shards would wait for a sample for ever (and its rank with it)
            raise ConfigError(f"data.shards: {msg}")
        log.warning(msg)
    epoch = SharedEpoch()
    decoder = DecodeClips(cfg, seed=seed, batch_size=batch_size)
    schedule = KindSchedule(cfg.image_ratio, seed)  # shared by the reader and the batcher (see KindSchedule)
    reader = ReadSamples(url_lists, [w for _, w in sources], seed=seed, rank=rank, world_size=world_size,
                         epoch=epoch, infinite=infinite, epoch_seed=epoch_seed, shuffle_buffer=cfg.shuffle_buffer,
                         on_tar_error=decoder.skip_tar_error, schedule=schedule, kinds=cfg.kinds(),
                         kind_of=decoder.kind_of)
    pipeline = wds.DataPipeline(reader, decoder, Batch(batch_size, drop_last, schedule))
    kinds = [[str(k) for k in cfg.kinds()]] if any(cfg.kinds()) else []
    layout = {"world_size": world_size, "num_workers": cfg.num_workers, "seed": seed, "batch_size": batch_size,
              "shuffle_buffer": cfg.shuffle_buffer, "epoch_seed": epoch_seed,
              "buckets": repr(cfg.buckets) if cfg.buckets.enabled else "", "latents": cfg.latents,
              "image_ratio": cfg.image_ratio,
              "shards": fingerprint(url_lists + [[repr(w) for _, w in sources]] + kinds)}
    return Loader(pipeline, reader, cfg=cfg, batch_size=batch_size, epoch=epoch, layout=layout)
