"""`dit encode`: raw shards -> latent shards, one output shard per input shard, safe to rerun.

    dit encode 'data/{00000..00099}.tar' latents/ --config configs/tiny.yaml vae.checkpoint=runs/vae/vae
    dit encode ... vae.family=wan vae.pretrained=/models/Wan2.1-T2V-1.3B-Diffusers/vae
    dit encode ... --device cpu     (default auto: the first CUDA GPU when there is one)

Each clip is decoded and sampled exactly as training reads it (data.frames / height / width / fps), then
coded by the frozen VAE and the caption by the text encoder. Per sample the output shard holds

    KEY.mean.npy     posterior mean   [C, t, h, w] float32 (not normalised: vae.normalize at training time)
    KEY.logvar.npy   posterior logvar [C, t, h, w] float32 (so training can draw z = mean + std * noise)
    KEY.text.npy     text states of the real tokens [n, D] float32 (the padding is dropped: training puts it back
                     as the encoder gives it); with text.padding=unmasked, whose padded states are not zeros, all
                     text.max_length states [L, D], and
    KEY.text_mask.npy  which of them are real tokens [L] (1.0 / 0.0; only with text.padding=unmasked)
    KEY.image_code.npy    a Wan I2V model's of the code form (Wan 2.1 I2V, Wan 2.2 I2V A14B): the normalized VAE
                     code of [first frame, grey...] [C, t, h, w] float32; for Wan 2.1 I2V and HunyuanVideo 1.5 I2V
    KEY.image_states.npy  the first frame's CLIP (SigLIP) states [n, D] float32 (dit/models/condition.py)
    KEY.txt          the caption
    KEY.json         key, caption, frames, height, width (of this clip: with buckets they differ), the VAE
                     (path, family, latent channels, temporal / spatial compression, a digest of its encoder
                     weights) and the text encoder (kind, name, dim, max_length, padding) used

Arrays are plain .npy (read with allow_pickle=False): nothing is unpickled. An output shard is written under a
temporary name and renamed when complete, so a killed run leaves no half shard, and a rerun skips finished ones
(which is what makes slurm/encode.sbatch array jobs restartable). An input shard that gives no sample (unreadable,
or every sample bad) gets no output at all, so a rerun tries it again, and the command fails naming it. Training
reads them with ``data.latents=true`` (data_pipelines/latents.py); its ``check_latent_shards`` stops a run whose VAE
or text encoder differ from the ones that made them, before any training.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import webdataset as wds

from data_pipelines.latents import IMAGE_CODE, IMAGE_STATES
from data_pipelines.loader import Loader, TooManyBadSamples, build_loader
from data_pipelines.shards import expand_shards
from dit.config import Config, ConfigError
from dit.fileio import atomic_file
from dit.models.condition import (
    check_image_condition,
    clip_condition,
    clip_states_of,
    code_condition,
    image_code,
    image_frames,
)
from dit.models.image_encoder import ImageEncoder, build_image_encoder
from dit.models.text import TextEncoder, build_text_encoder, text_device
from dit.models.vae import CausalVAE, encoder_digest, load_vae_from_config

if TYPE_CHECKING:
    from dit.models.vae_families import PretrainedVAE

log = logging.getLogger("dit.encode")


def _npy(array: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array.detach().float().cpu().numpy(), allow_pickle=False)
    return buf.getvalue()


def latent_sample(key: str, caption: str, mean: torch.Tensor, logvar: torch.Tensor, meta: dict[str, Any],
                  text_states: torch.Tensor | None = None, text_mask: torch.Tensor | None = None,
                  image: tuple[torch.Tensor | None, torch.Tensor | None] | None = None) -> dict[str, Any]:
    """One latent shard sample as `dit encode` writes it: mean / logvar [C, t, h, w], the caption, its json
    (``meta``, with key and caption added) and, when given, text states: the real tokens' [n, D], or all of them
    [L, D] with ``text_mask`` [L] saying which are real (text.padding=unmasked); ``image``: a Wan I2V model's image
    code [C, t, h, w] or None, and the image encoder's states [n, D] (Wan 2.1 I2V's CLIP, HunyuanVideo 1.5's
    SigLIP) or None."""
    sample = {"__key__": key, "mean.npy": _npy(mean), "logvar.npy": _npy(logvar), "txt": caption,
              "json": json.dumps({"key": key, "caption": caption, **meta})}
    if text_states is not None:
        sample["text.npy"] = _npy(text_states)
    if text_mask is not None:
        sample["text_mask.npy"] = _npy(text_mask)
    if image is not None:
        if image[0] is not None:
            sample[IMAGE_CODE] = _npy(image[0])
        if image[1] is not None:
            sample[IMAGE_STATES] = _npy(image[1])
    return sample


def output_name(url: str) -> str:
    """The output file name of an input shard: its own file name (``.../00007.tar`` -> ``00007.tar``)."""
    name = url.rstrip("/").rsplit("/", 1)[-1].split()[-1]
    return name if name.endswith(".tar") else f"{name}.tar"


def has_samples(path: Path) -> bool:
    """Whether a finished output shard holds at least one sample (an empty or unreadable one is not finished)."""
    try:
        with tarfile.open(path) as tf:
            return tf.next() is not None
    except (tarfile.TarError, OSError):
        return False


class _NoSamples(Exception):
    """Raised inside an output shard's atomic write when nothing was encoded: the temporary file is removed."""


def encode_device(device: str) -> torch.device:
    """Where `dit encode` runs the VAE and text encoder: ``auto`` is the first CUDA GPU when there is one (an array
    task of slurm/encode.sbatch sees its own), else the CPU; ``cpu``, ``cuda`` or ``cuda:N`` as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device!r}: use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not (torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count()):
        raise ConfigError(f"--device {device}: no such CUDA GPU is visible here ({torch.cuda.device_count()} are); "
                          "use --device cpu, or run on a GPU node (sbatch --gpus=1)")
    return dev


@torch.no_grad()
def encode_shards(shards: str, out_dir: str | Path, cfg: Config, batch_size: int = 8,
                  device: str = "auto") -> dict[str, int]:
    """Encode every shard of ``shards`` into ``out_dir`` on ``device`` (``encode_device``); returns counts
    (``encoded``, ``skipped``, ``samples``).

    An input shard that gives no sample (unreadable, every sample bad, or more than data.max_bad_fraction bad) is
    written nowhere; after the other shards, ``ConfigError`` names each such shard and why."""
    if cfg.vae.family == "ours" and not cfg.vae.checkpoint:
        raise ConfigError("vae.checkpoint is not set: pass vae.checkpoint=RUN_DIR/vae (a `dit train-vae` output), or "
                          "a pretrained VAE: vae.family=wan vae.pretrained=/path/to/diffusers/vae")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    check_image_condition(cfg)  # (an I2V model's shards hold its image inputs: what they need is checked)
    dev = encode_device(device)
    urls = expand_shards(shards, name="SHARDS")  # fails now on a missing shard
    out = Path(out_dir)
    names = [output_name(u) for u in urls]
    if len(set(names)) != len(names):
        raise ConfigError("two input shards have the same file name; encode them into different output folders")
    out.mkdir(parents=True, exist_ok=True)
    vae = load_vae_from_config(cfg.vae).eval().requires_grad_(False).to(dev)
    text_dev = text_device(cfg.text, dev)
    text = build_text_encoder(cfg.text, cache=False).to(text_dev)  # the shards store the states themselves
    # the code form's image code ("first", or "first_last" for FLF2V; "" without); Wan 2.1 I2V's CLIP states beside,
    # HunyuanVideo 1.5 I2V's SigLIP states alone
    code = image_frames(cfg.model) if code_condition(cfg.model) else ""
    image_encoder = build_image_encoder(cfg.model.image_encoder) if clip_condition(cfg.model) else None
    if image_encoder is not None:
        image_encoder.to(dev)
    log.info("encoding on %s (text encoder on %s)", dev, text_dev)
    made_by = {"vae": str(cfg.vae.checkpoint or cfg.vae.pretrained), "vae_family": cfg.vae.family,
               "vae_encoder": encoder_digest(vae), "latent_channels": vae.latent_channels,
               "temporal_compression": vae.temporal_compression, "spatial_compression": vae.spatial_compression,
               "text": cfg.text.encoder, "text_name": text.name, "text_dim": text.dim,
               "text_max_length": cfg.text.max_length, "text_padding": cfg.text.padding}
    if image_encoder is not None:
        made_by["image_encoder"] = str(cfg.model.image_encoder)
    if code:
        made_by["image_frames"] = code
    # real-token states + zero padding rebuild the others exactly; the unmasked padding's states are kept whole
    full_text = cfg.text.padding == "unmasked"
    counts = {"encoded": 0, "skipped": 0, "samples": 0}
    failed: list[str] = []  # "URL: why" of the input shards that gave no sample
    for url, name in zip(urls, names):
        final = out / name
        if final.exists():
            if has_samples(final):
                log.info("skip %s: %s exists", url, final)
                counts["skipped"] += 1
                continue
            log.warning("%s holds no sample (an empty output of an earlier run): encoding %s again", final, url)
            final.unlink()
        data = replace(cfg.data, shards=url, datasets=[], shuffle_buffer=1, num_workers=0, latents=False,
                       image_ratio=None)
        loader = build_loader(data, batch_size, seed=cfg.train.seed, epoch_seed=False, infinite=False, drop_last=False)
        written = 0
        try:
            with atomic_file(final) as tmp:
                with wds.TarWriter(str(tmp)) as sink:
                    written = _encode_shard(loader, sink, vae, text, made_by, full_text, dev, code, image_encoder)
                if written == 0:
                    raise _NoSamples
        except _NoSamples:
            failed.append(f"{url}: no sample could be used (bad samples: {dict(loader.stats.bad) or 'none read'})")
            continue
        except TooManyBadSamples as e:
            failed.append(f"{url}: {e}")
            continue
        counts["encoded"] += 1
        counts["samples"] += written
        log.info("encoded %s -> %s (bad samples: %s)", url, final, dict(loader.stats.bad))
    if failed:
        raise ConfigError(f"{len(failed)} of {len(urls)} input shards gave no latent shard (nothing written for "
                          f"them): {'; '.join(failed)}. The other {counts['encoded']} were encoded "
                          f"({counts['samples']} samples) and {counts['skipped']} were already there, in {out}. Fix or "
                          "drop the failed shards (`dit inspect-shards` shows what they hold) and run again: finished "
                          "shards are skipped")
    return counts


def _encode_shard(loader: Loader, sink: wds.TarWriter, vae: CausalVAE | PretrainedVAE, text: TextEncoder,
                  made_by: dict[str, Any], full_text: bool, device: torch.device, code: str = "",
                  image_encoder: ImageEncoder | None = None) -> int:
    """Write one input shard's samples (VAE posterior, text states, caption, json) to ``sink``; returns how many.
    ``full_text``: all the states and the mask (text.padding=unmasked), else the real tokens' states;
    ``code``: the image code of each clip's first frame too (Wan I2V's code form; "first_last": and its last frame,
    FLF2V); ``image_encoder``: those frames' CLIP states (Wan 2.1 I2V), or the first frame's SigLIP states
    (HunyuanVideo 1.5 I2V, no code)."""
    written = 0
    for batch in loader:
        video = batch["video"].to(device)  # [B, 3, T, H, W]
        posterior = vae.encode(video)  # mean, logvar [B, C, t, h, w]
        states, mask = text.encode(batch["caption"])  # [B, L, D], [B, L]
        frames, height, width = batch["video"].shape[2:]
        image = None
        if code:  # as draw_batch codes it from raw shards (FLF2V: the last frame too)
            first, last = video[:, :, 0], video[:, :, -1] if code == "first_last" else None
            image = (image_code(vae, first, frames, last),
                     clip_states_of(image_encoder, first, last) if image_encoder is not None else None)
        elif image_encoder is not None:  # HunyuanVideo 1.5 I2V: the first frame's SigLIP states alone
            image = (None, clip_states_of(image_encoder, video[:, :, 0]))
        for i, (key, caption) in enumerate(zip(batch["key"], batch["caption"])):
            meta = {"frames": frames, "height": height, "width": width, **made_by}
            text_states = states[i] if full_text else states[i][mask[i]]  # [L, D] or [n, D]
            sink.write(latent_sample(key, caption, posterior.mean[i], posterior.logvar[i], meta, text_states,
                                     mask[i] if full_text else None,
                                     None if image is None else tuple(None if x is None else x[i] for x in image)))
            written += 1
    return written
