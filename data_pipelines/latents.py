"""Latent shards (written by ``dit encode``), as the loader reads them with ``data.latents: true``.

Per sample: ``KEY.mean.npy`` and ``KEY.logvar.npy`` (the VAE posterior, ``[C, t, h, w]`` float32, not
normalised), ``KEY.text.npy`` (the caption's text states without padding, ``[L, D]``; optional), ``KEY.txt``
and ``KEY.json`` (what made it). Arrays are read with ``allow_pickle=False``: nothing is unpickled.

The pixel shape a latent stands for is its shape times the VAE's compression (``pixel_shape`` in
data_pipelines/config.py): the first frame alone, then 4 frames per latent frame, and 8x in space.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import torch
from webdataset import tariterators

MEAN, LOGVAR, TEXT = "mean.npy", "logvar.npy", "text.npy"


def load_npy(data: bytes) -> torch.Tensor:
    """A float32 tensor from .npy bytes (no pickles); ValueError when the bytes are not a plain array."""
    return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32, copy=False))


def npy_shape(data: bytes) -> tuple[int, ...] | None:
    """The shape in a .npy header, without reading the array; None when it is not one."""
    try:
        f = io.BytesIO(data)
        major, _ = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        return tuple(read(f)[0])
    except (ValueError, OSError):
        return None


def latent_kind(sample: dict[str, Any]) -> str | None:
    """"image" (one latent frame), "video", or None (no readable KEY.mean.npy)."""
    shape = npy_shape(sample[MEAN]) if MEAN in sample else None
    if shape is None or len(shape) != 4:
        return None
    return "image" if shape[1] == 1 else "video"


def first_sample(url: str) -> dict[str, Any] | None:
    """The first sample of a shard as ``{"extensions", "meta" (its json or {}), "shapes" (of its .npy files)}``;
    None when the shard holds none or cannot be read (the loader then counts it)."""
    errors: list[Exception] = []
    try:
        members = tariterators.tar_file_expander(tariterators.url_opener([{"url": url}], handler=errors.append),
                                                 handler=errors.append, eof_value=None)
        sample = next(iter(tariterators.group_by_keys(members, handler=errors.append)), None)
    except Exception:  # a shard that does not open is the loader's to count, not this check's
        return None
    if sample is None:
        return None
    exts = sorted(k for k in sample if not k.startswith("__"))
    try:
        meta = json.loads(sample["json"]) if "json" in sample else {}
    except (ValueError, UnicodeDecodeError):
        meta = {}
    shapes = {k: npy_shape(sample[k]) for k in exts if k.endswith(".npy")}
    return {"extensions": exts, "meta": meta if isinstance(meta, dict) else {}, "shapes": shapes}
