"""Synthetic clips of three sizes (1:1, 4:3, 16:9) and three lengths (5, 9, 13 frames), for the bucket tests."""

from __future__ import annotations

import itertools
import random

from data_pipelines.synthetic import render_clip
from data_pipelines.writer import encode_mp4


def shaped_clip_samples(repeats: int, rng: random.Random) -> list[dict]:
    """9 * ``repeats`` WebDataset samples ``c000``, ``c001``, ...: every size x length, ``repeats`` times."""
    samples = []
    for i, ((h, w), frames) in enumerate(itertools.product([(48, 48), (36, 48), (36, 64)], [5, 9, 13] * repeats)):
        video, meta = render_clip("red", "square", "left", frames=frames, height=h, width=w, rng=rng)
        samples.append({"__key__": f"c{i:03d}", "mp4": encode_mp4(video, 8), "txt": "a red square moving left",
                        "json": meta})
    return samples
