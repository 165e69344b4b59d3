"""Synthetic captioned clips: one coloured shape moving across a black frame.

Captions are exactly ``a {color} {shape} moving {direction}`` and come from the clip's true
attributes, which are also stored in ``KEY.json``. The 60 (color, shape, direction) combinations of the base colours
are cycled in shuffled order, so any 60 consecutive clips hold each combination once.

``measure_clip`` reads colour and motion direction back from pixels; it scores how well a generated
clip follows its prompt, and is exact on the clips written here.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

import numpy as np

from data_pipelines.config import ConfigError, size_problems
from data_pipelines.writer import encode_image, encode_mp4, write_shards

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "white": (255, 255, 255),
    "magenta": (255, 0, 255),  # not in the base data: the colour `dit demo --finetune` teaches
}
BASE_COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "white")  # what make_synthetic draws by default
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
_MOTION = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy); y points down

_MTIME = 1_700_000_000.0  # fixed tar timestamps: the same seed gives byte-identical shards


def caption_for(color: str, shape: str, direction: str) -> str:
    return f"a {color} {shape} moving {direction}"


def _shape_mask(shape: str, cx: float, cy: float, size: float, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Boolean [H, W] mask of a shape of side/diameter ``size`` centred at (cx, cy), sampled at pixel centres."""
    half = size / 2
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= half**2
    if shape == "square":
        return (np.abs(xs - cx) <= half) & (np.abs(ys - cy) <= half)
    if shape == "triangle":  # apex up, base at the bottom of the size x size box
        depth = ys - (cy - half)
        return (depth >= 0) & (depth <= size) & (np.abs(xs - cx) <= depth / 2)
    raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")


def render_clip(color: str, shape: str, direction: str, *, frames: int, height: int, width: int,
                rng: random.Random) -> tuple[np.ndarray, dict[str, Any]]:
    """One clip: uint8 ``[T, H, W, 3]`` and its attributes.

    The shape (side ~ 1/4 of the shorter frame side) travels half the frame along the direction's
    axis and stays fully inside the frame; the start is random within the range that allows this.
    """
    size = max(4.0, round(min(height, width) / 4))
    half = size / 2
    dx, dy = _MOTION[direction]
    along, across = (width, height) if dx else (height, width)
    distance = along / 2
    a0 = rng.uniform(half, along - half - distance)  # moving in + direction
    a1 = a0 + distance
    if dx + dy < 0:  # left / up: mirror
        a0, a1 = along - a0, along - a1
    c = rng.uniform(half, across - half)
    start, end = ((a0, c), (a1, c)) if dx else ((c, a0), (c, a1))  # (x, y)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    video = np.zeros((frames, height, width, 3), np.uint8)
    for t in range(frames):
        f = t / (frames - 1) if frames > 1 else 0.0
        cx, cy = start[0] + f * (end[0] - start[0]), start[1] + f * (end[1] - start[1])
        video[t][_shape_mask(shape, cx, cy, size, ys, xs)] = COLORS[color]
    if frames == 1:
        end = start
    meta = {"color": color, "shape": shape, "direction": direction, "caption": caption_for(color, shape, direction),
            "start": [round(v, 3) for v in start], "end": [round(v, 3) for v in end], "size": size,
            "frames": frames, "height": height, "width": width}
    return video, meta


def make_synthetic(out_dir: str | Path, *, num_clips: int = 256, frames: int = 17, height: int = 64, width: int = 64,
                   clips_per_shard: int = 64, fps: int = 8, seed: int = 0,
                   colors: tuple[str, ...] = BASE_COLORS) -> list[str]:
    """Write ``num_clips`` synthetic clips to ``out_dir/{00000..}.tar`` and return the shard paths.

    Each sample has ``KEY.mp4`` (h264, crf 10 so colours survive), or ``KEY.png`` when ``frames == 1``,
    plus ``KEY.txt`` (the caption) and ``KEY.json`` (the attributes). Deterministic for a seed.

    The size follows the VAE's rule (``size_problems``: frames 4k+1, sides multiples of 8), so the clips train as
    they are; a size that breaks it, or no clips, is a ``ConfigError`` naming the nearest valid values.
    """
    if num_clips < 1 or clips_per_shard < 1 or fps < 1:
        raise ConfigError(f"--num-clips, --clips-per-shard and the fps must be >= 1, got {num_clips}, "
                          f"{clips_per_shard} and {fps}")
    problems = size_problems(frames, height, width)
    if problems:
        raise ConfigError("; ".join(f"--{p}" for p in problems.values()))
    rng = random.Random(seed)
    combos = list(itertools.product(colors, SHAPES, DIRECTIONS))

    def samples():
        order: list[tuple[str, str, str]] = []
        for i in range(num_clips):
            if not order:
                order = rng.sample(combos, len(combos))
            color, shape, direction = order.pop()
            video, meta = render_clip(color, shape, direction, frames=frames, height=height, width=width, rng=rng)
            key = f"{i:06d}"
            media = {"png": encode_image(video[0], "png")} if frames == 1 else {"mp4": encode_mp4(video, fps, crf=10)}
            yield {"__key__": key, **media, "txt": meta["caption"], "json": {"key": key, **meta, "fps": fps}}

    return write_shards(samples(), str(Path(out_dir) / "%05d.tar"), clips_per_shard, mtime=_MTIME)


# ----------------------------------------------------------------------------- measuring


def _to_thwc01(video: Any) -> np.ndarray:
    """[T, H, W, 3] | [3, T, H, W] | [H, W, 3] | [3, H, W], uint8 or float in [-1, 1] or [0, 1]
    → float [T, H, W, 3] in [0, 1]."""
    if hasattr(video, "detach"):
        video = video.detach().float().cpu().numpy()
    x = np.asarray(video)
    if x.ndim == 3:
        x = x[None] if x.shape[-1] == 3 else x[:, None]
    if x.ndim != 4 or 3 not in (x.shape[0], x.shape[-1]):
        raise ValueError(f"expected a clip [T, H, W, 3] or [3, T, H, W], got shape {x.shape}")
    if x.shape[-1] != 3:
        x = np.moveaxis(x, 0, -1)
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    x = x.astype(np.float32)
    if x.min() < -1e-3:
        x = (x + 1.0) / 2.0  # the project's [-1, 1] contract
    elif x.max() > 1.0 + 1e-3:
        x = x / 255.0
    return np.clip(x, 0.0, 1.0)


def measure_clip(video: Any, *, threshold: float = 0.4, min_motion: float = 0.05) -> dict[str, Any]:
    """Colour and motion direction of the bright object in a clip.

    Pixels whose brightest channel is above ``threshold`` (of full scale) are the object; its colour
    is the palette colour nearest to their mean RGB. The direction is the dominant axis (and sign) of
    the object's centroid displacement from the first to the last frame that shows it; None when it
    moves less than ``min_motion`` of the frame along that axis, or is never seen.
    Returns ``color``, ``direction``, ``rgb`` (mean, 0-255), ``start`` / ``end`` centroids (x, y in
    pixels), ``displacement`` (dx, dy) and ``bright_fraction``.
    """
    x = _to_thwc01(video)
    _, h, w, _ = x.shape
    bright = x.max(axis=-1) >= threshold  # [T, H, W]
    out: dict[str, Any] = {"color": None, "direction": None, "rgb": None, "start": None, "end": None,
                           "displacement": None, "bright_fraction": float(bright.mean())}
    if not bright.any():
        return out
    rgb = x[bright].mean(axis=0) * 255.0
    palette = np.array(list(COLORS.values()), np.float32)
    out["rgb"] = [round(float(v), 1) for v in rgb]
    out["color"] = list(COLORS)[int(np.argmin(((palette - rgb) ** 2).sum(axis=1)))]
    seen = [t for t in range(len(bright)) if bright[t].any()]
    centroids = {}
    for t in (seen[0], seen[-1]):
        ys, xs = np.nonzero(bright[t])
        centroids[t] = (float(xs.mean()) + 0.5, float(ys.mean()) + 0.5)
    start, end = centroids[seen[0]], centroids[seen[-1]]
    dx, dy = end[0] - start[0], end[1] - start[1]
    out.update(start=start, end=end, displacement=(dx, dy))
    if abs(dx) >= abs(dy) and abs(dx) >= min_motion * w:
        out["direction"] = "right" if dx > 0 else "left"
    elif abs(dy) > abs(dx) and abs(dy) >= min_motion * h:
        out["direction"] = "down" if dy > 0 else "up"
    return out
