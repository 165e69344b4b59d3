"""Frame sampling: which frames of a clip to decode."""

from __future__ import annotations

import random
from dataclasses import dataclass


class Rejected(ValueError):
    """The clip is readable but does not fit what was asked (decoders pass this on instead of retrying)."""


class TooShort(Rejected):
    """The clip has fewer frames than the requested count and stride need."""


def frames_needed(count: int, stride: int) -> int:
    """Frames a clip must have to give ``count`` frames ``stride`` apart: ``1 + (count - 1) * stride``."""
    return 1 + (count - 1) * stride


def frame_indices(num_frames: int, count: int, stride: int = 1, rng: random.Random | None = None) -> list[int]:
    """``count`` frame indices ``stride`` apart inside a clip of ``num_frames`` frames.

    The window starts at a random frame when ``rng`` is given, else at frame 0.
    Raises ``TooShort`` when the clip has fewer than ``1 + (count - 1) * stride`` frames.
    """
    if count < 1 or stride < 1:
        raise ValueError(f"count and stride must be >= 1, got count={count}, stride={stride}")
    span = frames_needed(count, stride)
    if num_frames < span:
        raise TooShort(f"clip has {num_frames} frames; {count} frames at stride {stride} need {span}")
    start = rng.randint(0, num_frames - span) if rng is not None else 0
    return [start + i * stride for i in range(count)]


def fps_indices(num_frames: int, src_fps: float, count: int, fps: float, rng: random.Random | None = None) -> list[int]:
    """``count`` frame indices that play at ``fps`` from a clip recorded at ``src_fps`` (nearest frames).

    The step between picked frames is ``src_fps / fps`` source frames (fractional steps round to the
    nearest frame; a step below 1 repeats frames). Raises ``TooShort`` when the clip lasts less than
    ``(count - 1) / fps`` seconds, and ``ValueError`` when the container reports no frame rate.
    """
    if count < 1 or fps <= 0:
        raise ValueError(f"count must be >= 1 and fps > 0, got count={count}, fps={fps}")
    if not src_fps or src_fps <= 0:
        raise ValueError("the video reports no frame rate; use data.frame_stride instead of data.fps")
    step = src_fps / fps
    last_start = num_frames - 1 - (count - 1) * step  # the latest start that keeps the last frame inside
    if last_start < 0:
        raise TooShort(f"clip has {num_frames} frames at {src_fps:g} fps ({num_frames / src_fps:.2f}s); {count} "
                       f"frames at {fps:g} fps need {1 + (count - 1) * step:.1f} source frames")
    start = rng.uniform(0, last_start) if rng is not None else 0.0
    return [min(num_frames - 1, round(start + i * step)) for i in range(count)]


@dataclass(frozen=True)
class FramePicker:
    """The frames to decode from a clip, by count and either stride or target fps (``decode_video`` calls it
    with the clip's frame count and real fps, read from the container).

    ``count`` may be a tuple of counts (bucket frame counts): the longest one the clip covers is taken.
    """

    count: int | tuple[int, ...]
    stride: int = 1
    fps: float | None = None
    rng: random.Random | None = None

    def pick(self, num_frames: int, src_fps: float, count: int) -> list[int]:
        if self.fps is not None:
            return fps_indices(num_frames, src_fps, count, self.fps, self.rng)
        return frame_indices(num_frames, count, self.stride, self.rng)

    def __call__(self, num_frames: int, src_fps: float) -> list[int]:
        if isinstance(self.count, int):
            return self.pick(num_frames, src_fps, self.count)
        for count in sorted(self.count, reverse=True):  # the longest that fits
            try:
                return self.pick(num_frames, src_fps, count)
            except TooShort as e:
                error = e
        raise TooShort(f"shorter than every bucket: {error}")
