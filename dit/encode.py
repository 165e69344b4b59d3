"""`dit encode`: raw shards -> latent shards, one output shard per input shard, safe to rerun.

    dit encode 'data/{00000..00099}.tar' latents/ --config configs/tiny.yaml vae.checkpoint=runs/vae/vae

Each clip is decoded and sampled exactly as training reads it (data.frames / height / width / fps), then
coded by the frozen VAE and the caption by the text encoder. Per sample the output shard holds

    KEY.mean.npy     posterior mean   [C, t, h, w] float32 (not normalised: vae.normalize at training time)
    KEY.logvar.npy   posterior logvar [C, t, h, w] float32 (so training can draw z = mean + std * noise)
    KEY.text.npy     text states of the real tokens [L, D] float32 (the padding is dropped)
    KEY.txt          the caption
    KEY.json         key, caption, frames, height, width (of this clip: with buckets they differ), the VAE
                     (path, latent channels, a digest of its encoder weights) and the text encoder (kind, name,
                     dim, max_length) used

Arrays are plain .npy (read with allow_pickle=False): nothing is unpickled. An output shard is written under a
temporary name and renamed when complete, so a killed run leaves no half shard, and a rerun skips finished ones
(which is what makes slurm/encode.sbatch array jobs restartable). Training reads them with ``data.latents=true``
(data_pipelines/latents.py); ``check_latent_shards`` stops a run whose VAE or text encoder differ from the ones
that made them, before any training.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from data_pipelines.latents import MEAN, TEXT, first_sample
from data_pipelines.loader import build_loader
from data_pipelines.shards import expand_shards
from dit.config import Config
from dit.models.text import TextEncoder, build_text_encoder
from dit.models.vae import CausalVAE, load_vae

log = logging.getLogger("dit.encode")


def _npy(array: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array.detach().float().cpu().numpy(), allow_pickle=False)
    return buf.getvalue()


def encoder_digest(vae: CausalVAE) -> str:
    """A short digest of the VAE encoder's weights: what the stored posteriors depend on (not the decoder, nor
    the latent statistics, which may be refitted)."""
    h = hashlib.sha256()
    for name, tensor in sorted(vae.encoder.state_dict().items()):
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def check_latent_shards(cfg: Config, vae: CausalVAE, text: TextEncoder) -> bool:
    """Before training: the first sample of each source's first shard is a latent sample when ``data.latents``
    (a raw one otherwise), coded by this VAE's encoder, with text states of this text encoder (kind, dim,
    max_length) when it holds them. Raises ValueError naming the difference; returns whether text is stored."""
    stored_text = True
    for spec, _ in cfg.data.sources():
        url = expand_shards(spec)[0]
        first = first_sample(url)
        if first is None:
            continue  # unreadable or empty: the loader skips and counts it
        exts = first["extensions"]
        if not cfg.data.latents:
            if MEAN in exts:
                raise ValueError(f"{url} is a latent shard (KEY.{MEAN}, from `dit encode`) but data.latents is "
                                 "false: set data.latents=true to train from it")
            continue
        if MEAN not in exts:
            raise ValueError(f"data.latents=true but {url} holds no latent samples (its first has {exts}): make "
                             "latent shards with `dit encode SHARDS OUT --config ...`, or set data.latents=false "
                             "to read raw shards")
        meta, shapes = first["meta"], first["shapes"]
        channels = (shapes.get(MEAN) or (None,))[0]
        if channels != vae.latent_channels:
            raise ValueError(f"{url}: latents have {channels} channels, vae.checkpoint={cfg.vae.checkpoint} has "
                             f"{vae.latent_channels}: re-encode with this VAE, or point vae.checkpoint at the one "
                             "that made them")
        if meta.get("vae_encoder") not in (None, encoder_digest(vae)):
            raise ValueError(f"{url} was encoded by another VAE (encoder digest {meta['vae_encoder']}, from "
                             f"{meta.get('vae')}) than vae.checkpoint={cfg.vae.checkpoint} "
                             f"({encoder_digest(vae)}): re-encode, or point vae.checkpoint at that VAE")
        if TEXT not in exts:
            stored_text = False
            continue
        dim = (shapes.get(TEXT) or (None, None))[1]
        made = {"text.encoder": meta.get("text"), "text.max_length": meta.get("text_max_length")}
        want = {"text.encoder": cfg.text.encoder, "text.max_length": cfg.text.max_length}
        if cfg.text.encoder == "none":  # (no tokens, so no max_length)
            del made["text.max_length"], want["text.max_length"]
        differ = {k: (made[k], want[k]) for k in made if made[k] is not None and made[k] != want[k]}
        if dim != text.dim:
            differ["text dim"] = (dim, text.dim)
        if differ:
            raise ValueError(f"{url} holds text states of another text encoder than the config's: "
                             + ", ".join(f"{k} {a!r} (shards) vs {b!r} (config)" for k, (a, b) in differ.items())
                             + ". Set text.* as when encoding, or re-encode the latent shards")
        if cfg.text.encoder == "hf" and meta.get("text_name") not in (None, text.name):
            log.warning("%s was encoded with the text encoder in %s, the config has %s (same kind and dim): make sure "
                        "they are the same model", url, meta.get("text_name"), text.name)
    return stored_text


def output_name(url: str) -> str:
    """The output file name of an input shard: its own file name (``.../00007.tar`` -> ``00007.tar``)."""
    name = url.rstrip("/").rsplit("/", 1)[-1].split()[-1]
    return name if name.endswith(".tar") else f"{name}.tar"


@torch.no_grad()
def encode_shards(shards: str, out_dir: str | Path, cfg: Config, batch_size: int = 8) -> dict[str, int]:
    """Encode every shard of ``shards`` into ``out_dir``; returns counts (``encoded``, ``skipped``, ``samples``)."""
    if not cfg.vae.checkpoint:
        raise ValueError("vae.checkpoint is not set: pass vae.checkpoint=RUN_DIR/vae (a `dit train-vae` output)")
    urls = expand_shards(shards)  # fails now on a missing shard
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [output_name(u) for u in urls]
    if len(set(names)) != len(names):
        raise ValueError("two input shards have the same file name; encode them into different output folders")
    vae = load_vae(cfg.vae.checkpoint).eval().requires_grad_(False)
    text = build_text_encoder(cfg.text)
    made_by = {"vae": str(cfg.vae.checkpoint), "vae_encoder": encoder_digest(vae),
               "latent_channels": vae.latent_channels, "text": cfg.text.encoder, "text_name": text.name,
               "text_dim": text.dim, "text_max_length": cfg.text.max_length}
    counts = {"encoded": 0, "skipped": 0, "samples": 0}
    for url, name in zip(urls, names):
        final = out / name
        if final.exists():
            log.info("skip %s: %s exists", url, final)
            counts["skipped"] += 1
            continue
        data = replace(cfg.data, shards=url, datasets=[], shuffle_buffer=1, num_workers=0, latents=False,
                       image_ratio=None)
        loader = build_loader(data, batch_size, seed=cfg.train.seed, epoch_seed=False, infinite=False, drop_last=False)
        tmp = out / f".tmp-{name}-{os.getpid()}"
        with wds.TarWriter(str(tmp)) as sink:
            for batch in loader:
                posterior = vae.encode(batch["video"])  # mean, logvar [B, C, t, h, w]
                states, mask = text.encode(batch["caption"])  # [B, L, D], [B, L]
                frames, height, width = batch["video"].shape[2:]
                for i, (key, caption) in enumerate(zip(batch["key"], batch["caption"])):
                    meta = {"key": key, "caption": caption, "frames": frames, "height": height, "width": width,
                            **made_by}
                    sink.write({"__key__": key, "mean.npy": _npy(posterior.mean[i]),
                                "logvar.npy": _npy(posterior.logvar[i]), "text.npy": _npy(states[i][mask[i]]),
                                "txt": caption, "json": json.dumps(meta)})
                    counts["samples"] += 1
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        counts["encoded"] += 1
        log.info("encoded %s -> %s (bad samples: %s)", url, final, dict(loader.stats.bad))
    return counts
