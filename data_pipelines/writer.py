"""Write WebDataset shards: ``KEY.mp4|KEY.jpg|...``, ``KEY.txt``, ``KEY.json`` per sample.

- ``write_shards``: samples → tar shards (a thin, checked layer over ``webdataset.ShardWriter``)
- ``encode_mp4``: uint8 frames → h264 mp4 bytes (PyAV)
- ``cut_clips``: a video file → consecutive short clips (uint8 arrays), e.g. to build test shards

PyAV is imported by the functions that use it, so that writing shards of other media needs no PyAV.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds


def encode_mp4(frames: np.ndarray, fps: float, *, crf: int = 18, preset: str = "medium") -> bytes:
    """uint8 ``[T, H, W, 3]`` RGB frames → h264 (yuv420p) mp4 bytes. H and W must be even (yuv420p)."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames [T, H, W, 3], got {frames.dtype} {frames.shape}")
    t, h, w, _ = frames.shape
    if t == 0 or h % 2 or w % 2:
        raise ValueError(f"h264/yuv420p needs at least one frame and even height and width, got {h}x{w}x{t} "
                         f"(crop to {h - h % 2}x{w - w % 2})")
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": str(crf), "preset": preset}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush
    return buf.getvalue()


def encode_image(image: np.ndarray, ext: str = "jpg", *, quality: int = 95) -> bytes:
    """uint8 ``[H, W, 3]`` (or ``[H, W]`` grey) → jpg/png/webp bytes via Pillow."""
    from PIL import Image

    fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext.lower()]
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image)).save(buf, format=fmt, **({} if fmt == "PNG" else {"quality": quality}))
    return buf.getvalue()


def write_shards(samples: Iterable[dict[str, Any]], out_pattern: str, maxcount: int, *,
                 mtime: float | None = None) -> list[str]:
    """Write samples to shards named by the printf pattern ``out_pattern`` (``out/train-%05d.tar``).

    A sample is ``{"__key__": str, "mp4" | "jpg" | ...: bytes, "txt": str, "json": dict}``; keys must
    not contain a dot (WebDataset splits ``KEY.EXT`` at the first dot). ``mtime`` fixes the tar
    timestamps so that the same samples give byte-identical shards. Returns the shard paths written.
    """
    if "%" not in out_pattern:
        raise ValueError(f"out_pattern {out_pattern!r} needs a printf field for the shard number, "
                         "e.g. out/train-%05d.tar")
    Path(out_pattern % 0).parent.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    kw = {} if mtime is None else {"mtime": mtime}
    with wds.ShardWriter(out_pattern, maxcount=maxcount, verbose=0, post=written.append, **kw) as sink:
        for sample in samples:
            key = sample.get("__key__")
            if not isinstance(key, str) or not key or "." in key:
                raise ValueError(f"sample key {key!r} must be a non-empty string without dots")
            sink.write(sample)
    return written


def cut_clips(path: str | Path, clip_frames: int, max_clips: int,
              size: tuple[int, int] | None = None) -> list[np.ndarray]:
    """Cut a video into up to ``max_clips`` consecutive clips of ``clip_frames`` uint8 ``[T, H, W, 3]`` frames.

    ``size=(height, width)`` resizes each frame while decoding (cheap for big sources).
    """
    import av

    clips: list[np.ndarray] = []
    current: list[np.ndarray] = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            if size is not None:
                frame = frame.reformat(width=size[1], height=size[0])
            current.append(frame.to_ndarray(format="rgb24"))
            if len(current) == clip_frames:
                clips.append(np.stack(current))
                current = []
                if len(clips) == max_clips:
                    break
    return clips


def video_fps(path: str | Path) -> float:
    """The average frame rate of a video file."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return float(stream.average_rate or stream.guessed_rate)
