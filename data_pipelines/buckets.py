"""Frames x resolution buckets: clips of many shapes and durations, batched without padding or distortion.

A bucket is ``(frames, height, width)`` with a batch size. The grid is every frame count in
``data.buckets.frames`` (4k+1; 1 = images) times every aspect ratio in ``data.buckets.aspect_ratios``,
each at about ``resolution^2`` pixels with sides that are multiples of ``multiple``. A sample goes to

- frames: the longest bucket duration it covers (by stride or target fps); images, and nothing else, go
  to T = 1 buckets (unless 1 is the only frame count: then videos give single frames too);
- size: the bucket aspect ratio nearest its own (in log ratio); it is resized to cover and center-cropped.

Batch sizes keep the latent tokens per batch near ``tokens_per_batch``, so a 33-frame batch is smaller
than an image batch. A sample that fits no bucket is skipped and counted by reason: ``too_short``
(shorter than every video bucket), ``bucket_aspect`` (aspect ratio too far from every bucket),
``bucket_no_image`` (an image, with no T = 1 bucket).

A latent sample (``data.latents``) cannot be resized: it goes to the bucket of exactly its pixel shape (its
latent shape times the VAE's compression), or is counted as ``latent_shape``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from data_pipelines.config import BucketConfig, latent_shape


class NoBucket(ValueError):
    """The sample fits no bucket; ``reason`` says why."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class Bucket:
    frames: int
    height: int
    width: int
    batch_size: int

    @property
    def name(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"

    @property
    def aspect(self) -> float:
        return self.width / self.height


def parse_ratio(ratio: str) -> float:
    """``"16:9"`` -> 16/9 (width over height)."""
    w, h = ratio.split(":")
    return float(w) / float(h)


def bucket_size(ratio: float, resolution: int, multiple: int) -> tuple[int, int]:
    """(height, width): about ``resolution^2`` pixels, width/height near ``ratio``, sides multiples of ``multiple``.

    Of the heights next to the ideal one, the one whose snapped width gives the least aspect error (plus half
    the area error, both in log) wins, so that nearby ratios (4:3, 16:9) stay apart even at small sizes.
    """
    snap = lambda x: max(multiple, round(x / multiple) * multiple)  # noqa: E731
    ideal = snap(math.sqrt(resolution * resolution / ratio))
    best = None
    for h in {max(multiple, ideal + k * multiple) for k in (-1, 0, 1)}:
        w = snap(h * ratio)
        score = abs(math.log(w / h / ratio)) + 0.5 * abs(math.log(w * h / resolution**2))
        best = min(best or (score, h, w), (score, h, w))
    return best[1], best[2]


def tokens(frames: int, height: int, width: int, patch: list[int]) -> int:
    """Latent tokens of one sample: latent frames x (H/8) x (W/8) over the patch volume."""
    (pt, ph, pw), (t, h, w) = patch, latent_shape(frames, height, width)
    return max(1, math.ceil(t / pt) * (h // ph) * (w // pw))


def make_buckets(cfg: BucketConfig, batch_size: int) -> list[Bucket]:
    """Every (frames, aspect) bucket of ``cfg``; batch size from the token budget, else ``batch_size``."""
    out = []
    sizes = dict.fromkeys(bucket_size(parse_ratio(r), cfg.resolution, cfg.multiple) for r in cfg.aspect_ratios)
    for frames in sorted(set(cfg.frames)):
        for h, w in sizes:
            n = batch_size if cfg.tokens_per_batch == 0 else max(1, cfg.tokens_per_batch // tokens(frames, h, w,
                                                                                                   cfg.patch))
            out.append(Bucket(frames, h, w, n))
    return out


class BucketChooser:
    """Picks the bucket of a decoded sample (see the module docstring for the rule)."""

    def __init__(self, cfg: BucketConfig, batch_size: int) -> None:
        self.cfg, self.buckets = cfg, make_buckets(cfg, batch_size)
        frames = sorted(set(cfg.frames))
        self.video_frames = tuple(f for f in frames if f > 1) or (1,)  # what videos are cut to
        self.has_images = 1 in frames

    def choose(self, frames: int, height: int, width: int, *, image: bool) -> Bucket:
        """The bucket for a sample of ``frames`` picked frames (a video) or an image, of height x width pixels."""
        if image and not self.has_images:
            raise NoBucket("bucket_no_image", f"an image, but data.buckets.frames={self.cfg.frames} has no 1 "
                                              "(add 1 for T = 1 image buckets)")
        candidates = [b for b in self.buckets if b.frames == (1 if image else frames)]
        if not candidates:
            raise ValueError(f"no bucket with {frames} frames (frames are picked from {self.video_frames})")
        err = lambda b: abs(math.log((width / height) / b.aspect))  # noqa: E731
        best = min(candidates, key=err)
        if err(best) > math.log1p(self.cfg.max_aspect_error):
            raise NoBucket("bucket_aspect", f"aspect ratio {width}x{height} = {width / height:.2f} is more than "
                                            f"{self.cfg.max_aspect_error:.0%} from every bucket "
                                            f"({', '.join(self.cfg.aspect_ratios)}); add a ratio to "
                                            "data.buckets.aspect_ratios or raise data.buckets.max_aspect_error")
        return best

    def exact(self, frames: int, height: int, width: int) -> Bucket:
        """The bucket of exactly frames x height x width (a latent sample's pixel shape), else ``NoBucket``."""
        for b in self.buckets:
            if (b.frames, b.height, b.width) == (frames, height, width):
                return b
        raise NoBucket("latent_shape", f"a latent of {frames}x{height}x{width} (frames x height x width) fits no "
                                       f"bucket ({', '.join(b.name for b in self.buckets)}): encode with the "
                                       "same data.buckets as training uses")
