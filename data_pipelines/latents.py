"""Latent shards (written by ``dit encode``), as the loader reads them with ``data.latents: true``.

Per sample: ``KEY.mean.npy`` and ``KEY.logvar.npy`` (the VAE posterior, ``[C, t, h, w]`` float32, not
normalised), ``KEY.text.npy`` (the caption's text states without padding, ``[n, D]``; optional; with
text.padding=unmasked all ``[L, D]`` of them and ``KEY.text_mask.npy`` ``[L]``, 1 on the real tokens), ``KEY.txt``
and ``KEY.json`` (what made it); for a Wan I2V model of the code form also ``KEY.image_code.npy`` (the normalized
VAE code of [first frame, grey...], ``[C, t, h, w]``), and for Wan 2.1 I2V or HunyuanVideo 1.5 I2V
``KEY.image_states.npy`` (the first frame's CLIP or SigLIP states, ``[n, D]``).
Arrays are read with ``allow_pickle=False``: nothing is unpickled.

The pixel shape a latent stands for is its shape times the VAE's compression (``pixel_shape`` in
data_pipelines/config.py): the first frame alone, then ``temporal`` frames per latent frame, and ``spatial`` x in
space. ``dit encode`` records the compression of the VAE that made a sample in its KEY.json (``latent_compression``);
samples without it are our CausalVAE's (4, 8).
"""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import numpy as np
import torch
from webdataset import tariterators

from data_pipelines.config import SPATIAL, TEMPORAL, ConfigError, DataConfig
from data_pipelines.shards import expand_shards

log = logging.getLogger(__name__)
MEAN, LOGVAR, TEXT, TEXT_MASK = "mean.npy", "logvar.npy", "text.npy", "text_mask.npy"
# Wan 2.1 I2V's inputs (dit/models/condition.py): the normalized code of [first frame, grey...] and its CLIP states
IMAGE_CODE, IMAGE_STATES = "image_code.npy", "image_states.npy"


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


def latent_compression(sample: dict[str, Any]) -> tuple[int, int]:
    """(temporal, spatial) compression of the VAE that coded a latent sample, from its KEY.json; (4, 8) without."""
    try:
        meta = json.loads(sample["json"]) if "json" in sample else {}
    except (ValueError, UnicodeDecodeError):
        meta = {}
    meta = meta if isinstance(meta, dict) else {}
    temporal, spatial = meta.get("temporal_compression", TEMPORAL), meta.get("spatial_compression", SPATIAL)
    ok = all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (temporal, spatial))
    return (temporal, spatial) if ok else (TEMPORAL, SPATIAL)


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


def check_latent_shards(data: DataConfig, *, vae_path: str | None, latent_channels: int, vae_encoder: str,
                        text_encoder: str, text_max_length: int, text_dim: int, text_name: str | None,
                        text_padding: str | None = None, image_code: bool = False, image_width: int = 0,
                        image_frames: str | None = None) -> bool:
    """Before training: the first sample of each source's first shard is a latent sample when ``data.latents``
    (a raw one otherwise), coded by the VAE whose encoder digest is ``vae_encoder`` (``vae_path`` names it in
    messages) with ``latent_channels``, with text states of this text encoder (kind, dim, max_length; and whether
    the encoder saw the padding, ``text_padding`` unmasked, which changes every state) when it holds them. Raises
    ConfigError (a ValueError; one line at the CLI) naming the difference; returns whether text is stored.
    ``image_code`` (a Wan I2V run of the code form): the shards hold the image code; ``image_width`` > 0 (Wan 2.1
    I2V's CLIP states' width, HunyuanVideo 1.5 I2V's SigLIP): image encoder states of that width; ``image_frames``:
    of those frames ("first", or "first_last" for FLF2V; shards that do not say hold "first")."""
    stored_text = True
    for spec, _ in data.sources():
        url = expand_shards(spec)[0]
        first = first_sample(url)
        if first is None:
            continue  # unreadable or empty: the loader skips and counts it
        exts = first["extensions"]
        if not data.latents:
            if MEAN in exts:
                raise ConfigError(f"{url} is a latent shard (KEY.{MEAN}, from `dit encode`) but data.latents is "
                                 "false: set data.latents=true to train from it")
            continue
        if MEAN not in exts:
            raise ConfigError(f"data.latents=true but {url} holds no latent samples (its first has {exts}): make "
                             "latent shards with `dit encode SHARDS OUT --config ...`, or set data.latents=false "
                             "to read raw shards")
        meta, shapes = first["meta"], first["shapes"]
        channels = (shapes.get(MEAN) or (None,))[0]
        if channels != latent_channels:
            raise ConfigError(f"{url}: latents have {channels} channels, vae.checkpoint={vae_path} has "
                             f"{latent_channels}: re-encode with this VAE, or point vae.checkpoint at the one "
                             "that made them")
        if meta.get("vae_encoder") not in (None, vae_encoder):
            raise ConfigError(f"{url} was encoded by another VAE (encoder digest {meta['vae_encoder']}, from "
                             f"{meta.get('vae')}) than vae.checkpoint={vae_path} "
                             f"({vae_encoder}): re-encode, or point vae.checkpoint at that VAE")
        if image_code or image_width:
            states = shapes.get(IMAGE_STATES) or (None, None)
            wanted = [f"KEY.{name}" for name, want in ((IMAGE_CODE, image_code), (IMAGE_STATES, image_width))
                      if want and name not in exts]
            if wanted:
                raise ConfigError(f"{url} holds no image-to-video inputs ({', '.join(wanted)}): re-encode with this "
                                 "run's config (`dit encode SHARDS OUT --config ...`), or train from the raw shards "
                                 "(data.latents=false)")
            made = meta.get("image_frames", "first")
            if image_code and image_frames and made != image_frames:
                raise ConfigError(f"{url} holds the image inputs of the {made.replace('_', ' and ')} frame, this run's "
                                 f"model takes the {image_frames.replace('_', ' and ')} frame: re-encode with this "
                                 "run's config (`dit encode SHARDS OUT --config ...`)")
            if image_width and states[1] != image_width:
                raise ConfigError(f"{url} holds image encoder states of width {states[1]}, model.image_encoder gives "
                                 f"{image_width}: re-encode with this run's model.image_encoder")
        if TEXT not in exts:
            stored_text = False
            continue
        dim = (shapes.get(TEXT) or (None, None))[1]
        made = {"text.encoder": meta.get("text"), "text.max_length": meta.get("text_max_length")}
        want = {"text.encoder": text_encoder, "text.max_length": text_max_length}
        if text_encoder == "none":  # (no tokens, so no max_length)
            del made["text.max_length"], want["text.max_length"]
        differ = {k: (made[k], want[k]) for k in made if made[k] is not None and made[k] != want[k]}
        padding = meta.get("text_padding")
        if text_padding is not None and padding is not None and (padding == "unmasked") != (text_padding == "unmasked"):
            differ["text.padding"] = (padding, text_padding)
        if dim != text_dim:
            differ["text dim"] = (dim, text_dim)
        if differ:
            raise ConfigError(f"{url} holds text states of another text encoder than the config's: "
                             + ", ".join(f"{k} {a!r} (shards) vs {b!r} (config)" for k, (a, b) in differ.items())
                             + ". Set text.* as when encoding, or re-encode the latent shards")
        if text_encoder == "hf" and meta.get("text_name") not in (None, text_name):
            log.warning("%s was encoded with the text encoder in %s, the config has %s (same kind and dim): make sure "
                        "they are the same model", url, meta.get("text_name"), text_name)
    return stored_text
