"""Frame sampling: which frames of a clip to decode."""

from __future__ import annotations

import random


class TooShort(ValueError):
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
