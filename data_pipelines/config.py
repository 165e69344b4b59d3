"""The data layer's config: ``DataConfig`` (and its ``BucketConfig``), the frame-count rule and the
``ConfigError`` every config check raises. ``dit.config`` builds the full experiment config on top of these;
the data layer never imports the model library.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A config key or value that cannot be used; the message names the key and the fix."""


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def latent_frames(frames: int) -> int:
    """Latent frames of the causal VAE: the first frame alone, then 4 frames per latent frame."""
    return 1 + (frames - 1) // 4


def nearest_frames(frames: int) -> list[int]:
    """The valid frame counts (4k+1) nearest to ``frames``."""
    lo = max(1, (frames - 1) // 4 * 4 + 1)
    return sorted({lo, lo + 4} if lo != frames else {frames})


def nearest_multiple(size: int, m: int) -> list[int]:
    lo = max(m, size // m * m)
    return sorted({lo, lo + m} if lo != size else {size})


@dataclass
class BucketConfig:
    """Frames x resolution buckets (data_pipelines/buckets.py); off by default (fixed frames/height/width)."""

    enabled: bool = False
    frames: list[int] = field(default_factory=lambda: [1, 17, 33])  # 4k+1 each; 1 = image (still) buckets
    resolution: int = 256  # each bucket has about resolution^2 pixels
    aspect_ratios: list[str] = field(default_factory=lambda: ["1:1", "4:3", "3:4", "16:9", "9:16", "2.39:1",
                                                              "1:2.39"])  # width:height
    multiple: int = 16  # bucket sides are multiples of this (8 x the DiT's spatial patch)
    tokens_per_batch: int = 0  # latent positions (t*h/8*w/8 / patch volume) per batch; 0: train.batch_size
    patch: list[int] = field(default_factory=lambda: [1, 2, 2])  # the DiT patch [pt, ph, pw], for token counts
    max_aspect_error: float = 0.25  # a sample whose aspect is further than this (relative) from every bucket
    #                                 is counted as bucket_aspect and skipped

    def __post_init__(self) -> None:
        _check(bool(self.frames) and all(f >= 1 and (f - 1) % 4 == 0 for f in self.frames), "data.buckets.frames",
               f"every entry must be 4k+1; nearest valid: {[nearest_frames(f) for f in self.frames]}")
        _check(self.multiple > 0 and self.multiple % 8 == 0, "data.buckets.multiple", "must be a multiple of 8")
        _check(self.resolution >= self.multiple, "data.buckets.resolution", f"must be >= {self.multiple}")
        for r in self.aspect_ratios:
            parts = r.split(":")
            ok = len(parts) == 2 and all(p.replace(".", "", 1).isdigit() and float(p) > 0 for p in parts)
            _check(ok, "data.buckets.aspect_ratios", f"{r!r} must look like WIDTH:HEIGHT, e.g. 16:9 or 1:2.39")
        _check(self.tokens_per_batch >= 0, "data.buckets.tokens_per_batch", "must be >= 0")
        _check(len(self.patch) == 3 and all(p >= 1 for p in self.patch), "data.buckets.patch",
               "must be three positive integers [pt, ph, pw]")
        _check(self.max_aspect_error > 0, "data.buckets.max_aspect_error", "must be > 0")


@dataclass
class DataConfig:
    """Where the training data comes from and how it is cut into batches (data_pipelines/loader.py).

    ``latents``: false reads raw shards (KEY.mp4 | KEY.jpg ..., decoded, sampled, resized, then coded by the VAE
    in the training loop); true reads the latent shards that ``dit encode`` made of them (KEY.mean.npy /
    KEY.logvar.npy: the VAE posterior, KEY.text.npy: the caption's text states), so training skips the VAE
    encoder and the text encoder. Everything else is the same for both: shard split per rank and worker,
    buckets (a latent's bucket is its latent shape times the VAE's compression: frames 1 + 4(t-1), 8x in
    space), exact resume and the counting of bad samples. A latent whose shape is no bucket's (or, without
    buckets, not the shape of data.frames x height x width) is skipped and counted as ``latent_shape``.

    ``image_ratio``: with buckets that hold both images (frames 1) and videos, the fraction of batches that are
    image batches (a seeded draw per batch, resumable); null takes batches as the data comes. Each dataset is
    then read as two streams, its images and its videos; ``datasets[i].kind: image | video`` says a dataset
    holds only that kind, so it is read once (without it a dataset is read once per kind, and a kind it lacks
    costs one pass over it before the loader knows).
    """

    shards: str = ""  # brace pattern, directory, or comma-separated list of .tar files
    datasets: list[dict] = field(default_factory=list)  # several sources: [{shards: SPEC, weight: 2.0}, ...]
    latents: bool = False  # read `dit encode` latent shards (VAE posterior + text states) instead of raw media
    image_ratio: float | None = None  # fraction of image (T = 1) batches in joint image+video training; needs buckets
    frames: int = 17  # 4k + 1; 1 for images
    height: int = 64
    width: int = 64
    frame_stride: int = 1
    fps: float | None = None  # sample frames at this rate (re-timed by each video's real fps) instead of a stride
    caption_field: str | None = None  # take the caption from this KEY.json field (else KEY.txt)
    num_workers: int = 0
    shuffle_buffer: int = 64
    max_bad_fraction: float = 0.5  # stop when more than this fraction of samples fails to decode
    bad_samples_log: str | None = None  # append "key<TAB>reason<TAB>shard<TAB>detail" lines for skipped samples
    buckets: BucketConfig = field(default_factory=BucketConfig)  # frames x size buckets (off: fixed size above)

    def __post_init__(self) -> None:
        _check(self.frames >= 1 and (self.frames - 1) % 4 == 0, "data.frames",
               f"must be 4k+1 (the VAE's frame rule); nearest valid: {nearest_frames(self.frames)}")
        _check(self.height > 0 and self.height % 8 == 0, "data.height", "must be a positive multiple of 8")
        _check(self.width > 0 and self.width % 8 == 0, "data.width", "must be a positive multiple of 8")
        _check(self.frame_stride >= 1, "data.frame_stride", "must be >= 1")
        _check(self.fps is None or self.fps > 0, "data.fps", "must be > 0 (frames per second) or null")
        _check(self.fps is None or self.frame_stride == 1, "data.fps",
               "set either data.fps or data.frame_stride, not both")
        _check(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        _check(0.0 < self.max_bad_fraction <= 1.0, "data.max_bad_fraction", "must be in (0, 1]")
        _check(not (self.shards and self.datasets), "data.datasets",
               "set either data.shards (one source) or data.datasets (several, with weights), not both")
        for i, d in enumerate(self.datasets):
            key = f"data.datasets[{i}]"
            _check(isinstance(d, dict) and set(d) <= {"shards", "weight", "kind"} and isinstance(d.get("shards"), str)
                   and bool(d["shards"]), key, f"must be a mapping {{shards: SPEC, weight: 1.0}}, got {d!r}")
            w = d.get("weight", 1.0)
            _check(isinstance(w, (int, float)) and not isinstance(w, bool) and w > 0, f"{key}.weight",
                   f"must be a number > 0, got {w!r}")
            _check(d.get("kind") in (None, "image", "video"), f"{key}.kind",
                   f"must be image or video (what the dataset holds) or left out, got {d.get('kind')!r}")
        if self.image_ratio is not None:
            b = self.buckets
            _check(0.0 <= self.image_ratio <= 1.0, "data.image_ratio", "must be in [0, 1] (or null)")
            _check(b.enabled and 1 in b.frames and any(f > 1 for f in b.frames), "data.image_ratio",
                   "needs data.buckets.enabled=true with image (1) and video (4k+1 > 1) entries in "
                   f"data.buckets.frames (got enabled={b.enabled}, frames={b.frames})")

    def sources(self) -> list[tuple[str, float]]:
        """``[(shard spec, weight), ...]``: ``data.datasets``, or ``data.shards`` with weight 1."""
        if self.datasets:
            return [(d["shards"], float(d.get("weight", 1.0))) for d in self.datasets]
        return [(self.shards, 1.0)]

    def kinds(self) -> list[str | None]:
        """What each source holds (``datasets[i].kind``: "image", "video", or None for not said / mixed)."""
        return [d.get("kind") for d in self.datasets] if self.datasets else [None]
