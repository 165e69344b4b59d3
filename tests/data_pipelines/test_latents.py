"""data.latents: the loader reads `dit encode` latent shards with the buckets, split, resume and bad-sample counts
of the raw shards they came from."""

import io
import itertools
import random
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch
import webdataset as wds
from shaped_clips import shaped_clip_samples

from data_pipelines.loader import build_loader
from data_pipelines.synthetic import render_clip
from data_pipelines.writer import encode_image, write_shards
from dit.config import BucketConfig, DataConfig, load_config
from dit.encode import encode_shards
from dit.models.vae import CausalVAE, save_vae

BUCKETS = BucketConfig(enabled=True, frames=[1, 5, 9], resolution=64, tokens_per_batch=100)


@pytest.fixture(scope="module")
def shaped(tmp_path_factory) -> dict:
    """Raw shards of clips of three sizes and three lengths plus photos, and the latent shards `dit encode` made of
    them with the same buckets (a random tiny VAE, no text encoder)."""
    root = tmp_path_factory.mktemp("latent_data")
    rng = random.Random(0)
    samples = shaped_clip_samples(2, rng)
    for i, (h, w) in enumerate([(48, 48), (36, 64)] * 4):
        video, meta = render_clip("blue", "circle", "up", frames=1, height=h, width=w, rng=rng)
        samples.append({"__key__": f"p{i:03d}", "png": encode_image(video[0], "png"), "txt": "a blue circle",
                        "json": meta})
    rng.shuffle(samples)
    raw = write_shards(samples, str(root / "raw" / "%05d.tar"), maxcount=9)
    torch.manual_seed(0)
    save_vae(CausalVAE(latent_channels=4, base_channels=8), root / "vae")
    cfg = load_config(None, [f"vae.checkpoint={root / 'vae'}", "text.encoder=none"])
    cfg.data = replace(cfg.data, buckets=BUCKETS)
    assert encode_shards(",".join(raw), root / "latents", cfg, batch_size=4)["samples"] == 26
    return {"raw": raw, "latents": sorted(str(p) for p in (root / "latents").iterdir())}


def by_key(batches) -> dict[str, str]:
    out = {}
    for b in batches:
        out.update({k: b["bucket"] for k in b["key"]})
    return out


def test_latent_samples_get_the_buckets_and_keys_of_their_raw_samples(shaped):
    raw_cfg = DataConfig(shards=",".join(shaped["raw"]), buckets=BUCKETS, shuffle_buffer=4)
    raw_loader = build_loader(raw_cfg, 2, seed=1, infinite=False, drop_last=False)
    raw = list(raw_loader)
    latent_loader = build_loader(replace(raw_cfg, shards=",".join(shaped["latents"]), latents=True), 2, seed=1,
                                 infinite=False, drop_last=False)
    latent = list(latent_loader)
    assert by_key(latent) == by_key(raw) and len(by_key(raw)) == 26  # (in a shard, `dit encode` writes bucket order)
    assert latent_loader.stats.buckets == raw_loader.stats.buckets and len(raw_loader.stats.buckets) == 8  # 3 x 2 + 2
    assert latent_loader.stats.as_dict()["bad"] == {} and latent_loader.stats.seen == 26
    assert Counter(b["bucket"] for b in latent) == Counter(b["bucket"] for b in raw)
    for b in latent:
        assert "video" not in b and "text" in b and b["text"].shape == (len(b["key"]), 1, 8)  # NoText: one token
        frames, height, width = map(int, b["bucket"].split("x"))
        assert b["mean"].shape == b["logvar"].shape == (len(b["key"]), 4, 1 + (frames - 1) // 4, height // 8,
                                                        width // 8)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_on_latent_shards_with_buckets(shaped, workers):
    cfg = DataConfig(shards=",".join(shaped["latents"]), latents=True, buckets=BUCKETS, shuffle_buffer=4,
                     num_workers=workers)
    reference = build_loader(cfg, 2, seed=2)
    full = list(itertools.islice(iter(reference), 20))
    reference.close()
    first = build_loader(cfg, 2, seed=2)
    list(itertools.islice(iter(first), 6))
    state = first.state_dict()
    first.close()
    assert state["latents"] is True and any(r["pending"] for r in state["ranks"][0]["readers"])
    resumed = build_loader(cfg, 2, seed=2)
    resumed.load_state_dict(state)
    for a, b in zip(itertools.islice(iter(resumed), 14), full[6:], strict=True):
        assert a["key"] == b["key"] and a["bucket"] == b["bucket"] and torch.equal(a["mean"], b["mean"])
    resumed.close()
    raw = build_loader(replace(cfg, latents=False, num_workers=0), 2, seed=2)
    raw.load_state_dict(state)
    assert raw._resume["exact"] is False  # another layout: the next epoch, not this position


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=array.dtype == object)
    return buf.getvalue()


def test_bad_latent_samples_are_skipped_and_counted(shaped, tmp_path):
    good = [s for s in wds.WebDataset(shaped["latents"][0], shardshuffle=False)][:3]
    good = [{k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"} for s in good]
    mean = good[0]["mean.npy"]
    bad = [
        {"__key__": "nomean", "logvar.npy": mean, "txt": b"a caption"},
        {"__key__": "garbage", "mean.npy": b"not an npy file", "logvar.npy": mean, "txt": b"a caption"},
        {"__key__": "pickled", "mean.npy": _npy(np.array([{"a": 1}], dtype=object)), "logvar.npy": mean,
         "txt": b"a caption"},  # never unpickled
        {"__key__": "mismatch", "mean.npy": mean, "logvar.npy": _npy(np.zeros((4, 1, 2, 2), np.float32)),
         "txt": b"a caption"},
        {"__key__": "oddshape", "mean.npy": _npy(np.zeros((4, 2, 3, 3), np.float32)),
         "logvar.npy": _npy(np.zeros((4, 2, 3, 3), np.float32)), "txt": b"a caption"},
        {"__key__": "badcaption", "mean.npy": mean, "logvar.npy": mean, "txt": b"\xff\xfe not utf-8"},
        {"__key__": "raw", "png": b"\x89PNG", "txt": b"a caption"},
    ]
    shard = write_shards(good + bad, str(tmp_path / "%05d.tar"), maxcount=100)[0]
    cfg = DataConfig(shards=shard, latents=True, buckets=BUCKETS, shuffle_buffer=1)
    loader = build_loader(cfg, 1, infinite=False, drop_last=False)
    keys = [k for b in loader for k in b["key"]]
    assert sorted(keys) == sorted(s["__key__"] for s in good)
    assert loader.stats.as_dict()["bad"] == {"no_media": 2, "decode_error": 3, "latent_shape": 1, "bad_caption": 1}
    # without buckets a latent must have the shape of data.frames x height x width
    fixed = DataConfig(shards=",".join(shaped["latents"]), latents=True, frames=5, height=64, width=64,
                       max_bad_fraction=1.0)
    loader = build_loader(fixed, 1, infinite=False, drop_last=False)
    assert {tuple(b["mean"].shape) for b in loader} == {(1, 4, 2, 8, 8)}  # the 1:1 5-frame bucket's
    assert loader.stats.as_dict() == {"seen": 26, "ok": 2, "bad": {"latent_shape": 24}}
