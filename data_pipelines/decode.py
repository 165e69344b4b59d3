"""Decode media bytes into frames, and frames into model-ready clips.

- ``decode_video``: decord ``VideoReader`` over the bytes, reading only the frames asked for
  (``get_batch``); PyAV when decord is missing or fails on a file, or when the bytes are not a container
  that decord can open (``_decord_refuses``: decord leaks memory on every input it cannot open).
- ``decode_image``: Pillow, EXIF-rotated, always RGB (alpha composited on white).
- ``resize_crop``: resize the shorter side to cover (height, width), center crop, to float [-1, 1].

Anything that cannot be decoded raises ``DecodeError``; ``TooShort`` (from the index function) passes through.

decord and PyAV are imported on first use, so that this module (and the loader, training and sampling above it) imports
where neither is installed, e.g. a GPU machine training from latent shards (tools/gpu_check.sh).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image, ImageOps

from data_pipelines.sampling import FramePicker, Rejected


def _load_decord() -> ModuleType | None:
    """decord, imported once on first use; None where it is not installed (it has no wheels on some platforms, e.g.
    macOS arm64: PyAV then decodes everything). Kept as the module attribute ``decord``, which tests replace."""
    if "decord" not in globals():
        try:
            import decord
        except ImportError:  # pragma: no cover
            decord = None
        else:
            decord.logging.set_level(decord.logging.QUIET)
        globals()["decord"] = decord
    return globals()["decord"]


def __getattr__(name: str) -> object:  # PEP 562: ``decode.decord`` imports it on first access
    if name == "decord":
        return _load_decord()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")

Indices = Callable[[int], Sequence[int]] | Sequence[int] | None


class DecodeError(ValueError):
    """The bytes are not a readable video or image."""


@dataclass
class VideoInfo:
    num_frames: int  # frames in the whole clip
    fps: float
    height: int
    width: int
    backend: str  # decord | pyav


def _short(exc: BaseException, limit: int = 200) -> str:
    msg = f"{type(exc).__name__}: {exc}"
    return msg if len(msg) <= limit else msg[:limit] + "..."


def resolve_indices(indices: Indices, num_frames: int, fps: float) -> list[int]:
    """The frame indices to read: all frames (None), a fixed list, ``indices(num_frames)``, or for a
    ``FramePicker`` ``indices(num_frames, fps)``."""
    if indices is None:
        return list(range(num_frames))
    if isinstance(indices, FramePicker):
        idx = indices(num_frames, fps)
    else:
        idx = list(indices(num_frames)) if callable(indices) else list(indices)
    if not idx or min(idx) < 0 or max(idx) >= num_frames:
        raise IndexError(f"frame indices {idx[:3]}..{idx[-3:]} out of range for a clip of {num_frames} frames")
    return idx


_BMFF_BOXES = {b"ftyp", b"styp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot", b"uuid", b"meta", b"moof",
               b"mfra", b"sidx", b"pdin", b"prft", b"emsg"}


def _decord_refuses(data: bytes) -> str | None:
    """Why these bytes are not given to decord (None: they are).

    decord 0.6.0 leaks the whole reader, with its copy of the bytes, when FFmpeg cannot open the input
    (``_CAPI_VideoReaderGetVideoReader`` returns null without freeing it): about 1.5x the file size per bad
    file, for the life of the process, so a long run over data with cut-off downloads grows without bound
    (``tools/bench_rss.py --bad-every 10``). So decord only gets an mp4/mov whose ``moov`` box is complete
    (a cut-off mp4 has none: FFmpeg's "moov atom not found"), or a Matroska/WebM or AVI file; anything else
    goes straight to PyAV, which frees what it allocates.
    """
    if len(data) >= 8 and data[4:8] in _BMFF_BOXES:  # ISO BMFF (mp4, mov): walk the top-level boxes
        pos = 0
        while pos + 8 <= len(data):
            size, header = int.from_bytes(data[pos : pos + 4], "big"), 8
            if size == 1:  # 64-bit size follows
                if pos + 16 > len(data):
                    break
                size, header = int.from_bytes(data[pos + 8 : pos + 16], "big"), 16
            elif size == 0:  # runs to the end of the file
                size = len(data) - pos
            if size < header:
                return "a malformed mp4 box"
            if data[pos + 4 : pos + 8] == b"moov":
                return None if pos + size <= len(data) else "an mp4 cut off inside its moov box"
            pos += size
        return "an mp4 without a moov box (cut off?)"
    if data.startswith(b"\x1a\x45\xdf\xa3") or (data.startswith(b"RIFF") and data[8:12] == b"AVI "):
        return None  # Matroska / WebM, AVI
    return "not an mp4, mov, mkv, webm or avi container"


def _decode_decord(data: bytes, indices: Indices, num_threads: int) -> tuple[np.ndarray, VideoInfo]:
    decord = _load_decord()
    vr = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=num_threads)
    n = len(vr)
    if n == 0:
        raise DecodeError("video has no frames")
    fps = float(vr.get_avg_fps())
    idx = resolve_indices(indices, n, fps)  # TooShort propagates: it is a property of the clip, not of the decoder
    frames = vr.get_batch(idx).asnumpy()
    return frames, VideoInfo(n, fps, frames.shape[1], frames.shape[2], "decord")


def _decode_pyav(data: bytes, indices: Indices) -> tuple[np.ndarray, VideoInfo]:
    import av

    with av.open(io.BytesIO(data)) as container:
        if not container.streams.video:
            raise DecodeError("no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        fps = float(stream.average_rate or stream.guessed_rate or 0.0)
        n = stream.frames  # 0 when the container does not say
        if n > 0:  # decode up to the last needed frame only
            idx = resolve_indices(indices, n, fps)
            wanted, last, got = set(idx), max(idx), {}
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    got[i] = frame.to_ndarray(format="rgb24")
                if i >= last:
                    break
            if len(got) == len(wanted):
                frames = np.stack([got[i] for i in idx])
                return frames, VideoInfo(n, fps, frames.shape[1], frames.shape[2], "pyav")
    with av.open(io.BytesIO(data)) as container:  # no (or a wrong) frame count in the header: decode all
        everything = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not everything:
        raise DecodeError("video has no frames")
    idx = resolve_indices(indices, len(everything), fps)
    frames = np.stack([everything[i] for i in idx])
    return frames, VideoInfo(len(everything), fps, frames.shape[1], frames.shape[2], "pyav")


def decode_video(data: bytes, indices: Indices = None, *, num_threads: int = 1) -> tuple[np.ndarray, VideoInfo]:
    """Decode the frames ``indices`` of a video: uint8 ``[T, H, W, 3]`` and the clip's ``VideoInfo``.

    ``indices`` is None (all frames), a list, or a function ``num_frames -> list`` (e.g. a
    ``frame_indices`` partial) so that only the needed frames are decoded.
    """
    errors = []
    refused = _decord_refuses(data) if _load_decord() is not None else "not installed"
    if refused:
        errors.append(f"decord: not tried ({refused})")
    else:
        try:
            return _decode_decord(data, indices, num_threads)
        except Rejected:
            raise
        except Exception as e:  # decord raises bare RuntimeErrors (DECORDError) for unreadable input
            errors.append(f"decord: {_short(e)}")
    try:
        return _decode_pyav(data, indices)
    except Rejected:
        raise
    except Exception as e:
        errors.append(f"pyav: {_short(e)}")
    raise DecodeError(f"cannot decode video ({len(data)} bytes): " + "; ".join(errors))


def decode_image(data: bytes) -> np.ndarray:
    """Decode an image (jpg/png/webp/...) to uint8 ``[H, W, 3]`` RGB."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            img = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img.alpha_composite(rgba)
        arr = np.array(img.convert("RGB"))  # a writable copy
    except Exception as e:
        raise DecodeError(f"cannot decode image ({len(data)} bytes): {_short(e)}") from e
    if arr.ndim != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DecodeError(f"image has an empty shape {arr.shape}")
    return arr


# ----------------------------------------------------------------------------- preprocess


def resize_crop(frames: np.ndarray | torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 ``[T, H, W, 3]`` → float ``[3, T, height, width]`` in [-1, 1].

    The shorter side is resized (bilinear, antialiased) so the frame covers (height, width), then
    the center is cropped: no padding, no change of aspect ratio.
    """
    x = torch.as_tensor(frames)
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
        raise ValueError(f"expected uint8 frames [T, H, W, 3], got {x.dtype} {tuple(x.shape)}")
    x = rearrange(x, "t h w c -> t c h w").contiguous()
    h, w = x.shape[-2:]
    scale = max(height / h, width / w)
    rh, rw = max(height, round(h * scale)), max(width, round(w * scale))
    if (rh, rw) != (h, w):
        x = F.interpolate(x, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)  # uint8 in, out
    top, left = (rh - height) // 2, (rw - width) // 2
    x = x[:, :, top : top + height, left : left + width]
    return rearrange(x, "t c h w -> c t h w").float().div_(127.5).sub_(1.0)
