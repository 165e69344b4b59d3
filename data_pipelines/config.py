"""The data layer's config: ``DataConfig`` (and its ``BucketConfig``), the frame-count rule and the
``ConfigError`` every config check raises. ``dit.config`` builds the full experiment config on top of these;
the data layer never imports the model library.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A config key or value that cannot be used; the message names the key and the fix."""


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


# ---- the frame and size rule, given the VAE's compression -----------------------------------------------------
# A causal video VAE codes the first frame alone, then each `temporal` frames as one latent frame, and `spatial`
# pixels as one latent position: clips of temporal*k + 1 frames, sides that are multiples of `spatial` (times the
# denoiser's patch). Our CausalVAE (dit/models/vae.py) is the default.
TEMPORAL, SPATIAL = 4, 8


def latent_frames(frames: int, temporal: int = TEMPORAL) -> int:
    """Latent frames of a clip of ``frames`` = temporal*k + 1 frames: 1 + k."""
    return 1 + (frames - 1) // temporal


def pixel_shape(t: int, h: int, w: int, temporal: int = TEMPORAL, spatial: int = SPATIAL) -> tuple[int, int, int]:
    """(frames, height, width) of the clip that a latent grid (t, h, w) was coded from."""
    return 1 + temporal * (t - 1), spatial * h, spatial * w


def nearest_frames(frames: int, temporal: int = TEMPORAL) -> list[int]:
    """The valid frame counts (temporal*k + 1) nearest to ``frames``."""
    lo = max(1, (frames - 1) // temporal * temporal + 1)
    return sorted({lo, lo + temporal} if lo != frames else {frames})


def nearest_multiple(size: int, m: int) -> list[int]:
    """The positive multiples of ``m`` nearest to ``size``."""
    lo = max(m, size // m * m)
    return sorted({lo, lo + m} if lo != size else {size})


def frames_problem(frames: int, *, temporal: int = TEMPORAL, patch: int = 1) -> str | None:
    """Why a clip of ``frames`` frames cannot be coded (or patchified in time by ``patch``), naming the nearest
    valid counts; None when it can."""
    if frames < 1 or (frames - 1) % temporal:
        return f"frames={frames} must be {temporal}k+1 (nearest valid: {nearest_frames(frames, temporal)})"
    t = latent_frames(frames, temporal)
    if t % patch:
        near = [1 + temporal * (n - 1) for n in nearest_multiple(t, patch)]
        return (f"frames={frames} gives {t} latent frames, not divisible by the temporal patch {patch} "
                f"(nearest valid: {near})")
    return None


def side_problem(name: str, size: int, *, spatial: int = SPATIAL, patch: int = 1) -> str | None:
    """Why a height or width of ``size`` pixels cannot be coded and patchified, naming the nearest valid sizes."""
    m = spatial * patch
    if size < 1 or size % m:
        return f"{name}={size} must be a multiple of {m} (nearest valid: {nearest_multiple(size, m)})"
    return None


def size_problems(frames: int, height: int, width: int, *, patch: tuple[int, int, int] = (1, 1, 1),
                  temporal: int = TEMPORAL, spatial: int = SPATIAL) -> dict[str, str]:
    """What keeps a frames x height x width clip from a VAE of this compression and a denoiser of this patch, by
    dimension ("frames", "height", "width"), each naming the nearest valid values; {} when it fits."""
    problems = {"frames": frames_problem(frames, temporal=temporal, patch=patch[0]),
                "height": side_problem("height", height, spatial=spatial, patch=patch[1]),
                "width": side_problem("width", width, spatial=spatial, patch=patch[2])}
    return {k: v for k, v in problems.items() if v is not None}


def latent_shape(frames: int, height: int, width: int, *, temporal: int = TEMPORAL,
                 spatial: int = SPATIAL) -> tuple[int, int, int]:
    """(t, h, w) of the latent grid of a frames x height x width clip; ValueError naming the nearest valid sizes."""
    problems = size_problems(frames, height, width, temporal=temporal, spatial=spatial)
    if problems:
        raise ValueError("; ".join(problems.values()))
    return latent_frames(frames, temporal), height // spatial, width // spatial


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
        _check(bool(self.frames) and not any(frames_problem(f) for f in self.frames), "data.buckets.frames",
               f"every entry must be {TEMPORAL}k+1; nearest valid: {[nearest_frames(f) for f in self.frames]}")
        _check(self.multiple > 0 and self.multiple % SPATIAL == 0, "data.buckets.multiple",
               f"must be a multiple of {SPATIAL}")
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
    decode_cache_mb: float = 0  # MiB of whole decoded videos each reader keeps, so each is decoded once, not every
    #                             epoch (data_pipelines/decoded_cache.py); 0: off
    shuffle_buffer: int = 64
    max_bad_fraction: float = 0.5  # stop when more than this fraction of samples fails to decode
    bad_samples_log: str | None = None  # append "key<TAB>reason<TAB>shard<TAB>detail" lines for skipped samples
    buckets: BucketConfig = field(default_factory=BucketConfig)  # frames x size buckets (off: fixed size above)
    # held-out shards (raw, or latent with data.latents) for the validation loss (train.val_every): read in order,
    # the same clips every time, never trained on; "" for none
    val_shards: str = ""

    def __post_init__(self) -> None:
        for name, problem in size_problems(self.frames, self.height, self.width).items():  # the VAE's rule
            _check(False, f"data.{name}", problem)
        _check(self.frame_stride >= 1, "data.frame_stride", "must be >= 1")
        _check(self.fps is None or self.fps > 0, "data.fps", "must be > 0 (frames per second) or null")
        _check(self.fps is None or self.frame_stride == 1, "data.fps",
               "set either data.fps or data.frame_stride, not both")
        _check(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        _check(self.decode_cache_mb >= 0, "data.decode_cache_mb", "must be >= 0 (MiB; 0: off)")
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

    def validation(self) -> DataConfig:
        """The data of data.val_shards, read as the training data is (size, buckets, latents), without shuffling
        or mixing."""
        return dataclasses.replace(self, shards=self.val_shards, datasets=[], image_ratio=None, shuffle_buffer=0,
                                   num_workers=0, decode_cache_mb=0, val_shards="")

    def kinds(self) -> list[str | None]:
        """What each source holds (``datasets[i].kind``: "image", "video", or None for not said / mixed)."""
        return [d.get("kind") for d in self.datasets] if self.datasets else [None]
