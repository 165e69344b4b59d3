"""data.image_ratio: joint image + video training with a configured fraction of image (T = 1) batches, seeded and
resumable."""

import io
import itertools
import logging
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from data_pipelines.loader import build_loader
from data_pipelines.synthetic import render_clip
from data_pipelines.writer import encode_image, encode_mp4, write_shards
from dit.config import BucketConfig, ConfigError, DataConfig

BUCKETS = BucketConfig(enabled=True, frames=[1, 5], resolution=32, aspect_ratios=["1:1"])


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, list[str]]:
    """24 clips (5 frames) and 24 photos of 32x32: mixed in 4 shards, and apart (2 shards each)."""
    root = tmp_path_factory.mktemp("joint")
    rng = random.Random(0)
    videos, images = [], []
    for i in range(24):
        clip, meta = render_clip("red", "square", "left", frames=5, height=32, width=32, rng=rng)
        videos.append({"__key__": f"v{i:02d}", "mp4": encode_mp4(clip, 8), "txt": "a red square", "json": meta})
        still, meta = render_clip("blue", "circle", "up", frames=1, height=32, width=32, rng=rng)
        images.append({"__key__": f"i{i:02d}", "png": encode_image(still[0], "png"), "txt": "a blue circle",
                       "json": meta})
    mixed = videos + images
    rng.shuffle(mixed)
    return {"mixed": write_shards(mixed, str(root / "mixed" / "%05d.tar"), maxcount=12),
            "videos": write_shards(videos, str(root / "videos" / "%05d.tar"), maxcount=12),
            "images": write_shards(images, str(root / "images" / "%05d.tar"), maxcount=12)}


def config(media, layout: str, **kw) -> DataConfig:
    if layout == "mixed":
        return DataConfig(shards=",".join(media["mixed"]), buckets=BUCKETS, shuffle_buffer=4, **kw)
    datasets = [{"shards": ",".join(media["videos"]), "kind": "video"},
                {"shards": ",".join(media["images"]), "weight": 3.0, "kind": "image"}]
    return DataConfig(datasets=datasets, buckets=BUCKETS, shuffle_buffer=4, **kw)


def is_image(batch) -> bool:
    return batch["video"].shape[2] == 1


def roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("layout", ["mixed", "kinds"])
def test_the_fraction_of_image_batches_follows_the_ratio_and_resumes(media, layout):
    cfg = config(media, layout, image_ratio=0.25)
    full = list(itertools.islice(iter(build_loader(cfg, 2, seed=3)), 160))
    fraction = sum(map(is_image, full)) / len(full)
    assert 0.17 < fraction < 0.33, fraction  # the data alone would give 0.5 (mixed) or 0.75 (kinds, by weight)
    for b in full:  # a batch is all images or all clips
        assert all(k.startswith("i" if is_image(b) else "v") for k in b["key"])
    first = build_loader(cfg, 2, seed=3)
    list(itertools.islice(iter(first), 23))
    state = roundtrip(first.state_dict())
    assert state["image_ratio"] == 0.25 and state["ranks"][0]["readers"][0]["batches"] == 23
    resumed = build_loader(cfg, 2, seed=3)
    resumed.load_state_dict(state)
    for a, b in zip(itertools.islice(iter(resumed), 40), full[23:63], strict=True):
        assert a["key"] == b["key"] and torch.equal(a["video"], b["video"])
    assert sum(map(is_image, itertools.islice(iter(build_loader(config(media, layout, image_ratio=0.8), 2,
                                                                seed=3)), 80))) > 0.7 * 80


@pytest.mark.parametrize("workers", [0, 2])
def test_one_epoch_still_holds_every_sample_once(media, workers):
    """Finite: each kind runs through its samples once; when one kind is used up the batches are of the other."""
    cfg = config(media, "mixed", image_ratio=0.1, num_workers=workers)
    loader = build_loader(cfg, 2, seed=5, infinite=False, drop_last=False)
    batches = list(loader)
    loader.close()
    assert Counter(k for b in batches for k in b["key"]) == Counter([f"v{i:02d}" for i in range(24)]
                                                                    + [f"i{i:02d}" for i in range(24)])
    assert loader.stats.as_dict() == {"seen": 48, "ok": 48, "bad": {}, "buckets": {"1x32x32": 24, "5x32x32": 24}}
    if workers == 0:  # 10% image batches while there are clips left, then the rest of the photos
        kinds = [is_image(b) for b in batches]
        tail = kinds.index(False, len(kinds) - 1 - kinds[::-1].index(False))  # the last clip batch
        assert sum(kinds[:tail]) < 0.3 * tail and all(kinds[tail + 1:])


def test_data_without_images_gives_video_batches(synthetic_shards, caplog):
    cfg = DataConfig(shards=str(Path(synthetic_shards[0]).parent), image_ratio=0.5, shuffle_buffer=4,
                     buckets=BucketConfig(enabled=True, frames=[1, 5], resolution=32, aspect_ratios=["1:1"]))
    with caplog.at_level(logging.WARNING, logger="data_pipelines.reader"):
        batches = list(itertools.islice(iter(build_loader(cfg, 4, seed=1)), 20))  # infinite: must not spin
    assert all(b["video"].shape[2] == 5 for b in batches)
    assert "holds no image samples" in caplog.text


def test_image_ratio_needs_image_and_video_buckets():
    with pytest.raises(ConfigError, match="data.image_ratio: needs data.buckets.enabled"):
        DataConfig(shards="x", image_ratio=0.3)
    with pytest.raises(ConfigError, match="data.image_ratio"):
        DataConfig(shards="x", image_ratio=0.3, buckets=BucketConfig(enabled=True, frames=[5, 9]))
    with pytest.raises(ConfigError, match=r"data.image_ratio: must be in \[0, 1\]"):
        DataConfig(shards="x", image_ratio=1.5, buckets=BUCKETS)
    with pytest.raises(ConfigError, match=r"data.datasets\[0\].kind"):
        DataConfig(datasets=[{"shards": "x", "kind": "audio"}])
