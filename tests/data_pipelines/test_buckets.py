import io
import itertools
import math
import random
from collections import Counter

import pytest
import torch
from shaped_clips import shaped_clip_samples

from data_pipelines.buckets import BucketChooser, NoBucket, bucket_size, make_buckets, parse_ratio, tokens
from data_pipelines.loader import build_loader
from data_pipelines.writer import write_shards
from dit.config import BucketConfig, ConfigError, DataConfig

RATIOS = ["1:1", "4:3", "3:4", "16:9", "9:16", "2.39:1", "1:2.39"]


def test_bucket_grid_sizes_and_token_budget():
    cfg = BucketConfig(enabled=True, frames=[1, 17, 33], resolution=256, tokens_per_batch=4096)
    buckets = make_buckets(cfg, batch_size=8)
    assert len(buckets) == 3 * len(RATIOS)
    for b in buckets:
        assert (b.frames - 1) % 4 == 0 and b.height % 16 == 0 and b.width % 16 == 0
        assert 0.75 < b.height * b.width / 256**2 < 1.3  # about resolution^2 pixels
        n = tokens(b.frames, b.height, b.width, cfg.patch)
        assert b.batch_size * n <= 4096 < (b.batch_size + 1) * n or (b.batch_size == 1 and n > 4096)
    aspects = sorted({round(b.aspect, 2) for b in buckets})
    for r in RATIOS:  # every ratio (portrait ones too) within the rounding of 16-pixel sides
        assert min(abs(math.log(a / parse_ratio(r))) for a in aspects) < 0.12
    by = {(b.frames, round(b.aspect, 1)): b for b in buckets}
    assert by[(1, 1.0)].batch_size > by[(17, 1.0)].batch_size > by[(33, 1.0)].batch_size >= 1
    assert all(b.batch_size == 8 for b in make_buckets(BucketConfig(enabled=True), batch_size=8))  # no budget


def test_chooser_takes_longest_duration_then_nearest_aspect():
    chooser = BucketChooser(BucketConfig(enabled=True, frames=[1, 9, 17], resolution=128), 4)
    assert chooser.video_frames == (9, 17)
    pick = lambda f, h, w, image=False: chooser.choose(f, h, w, image=image)  # noqa: E731
    size = lambda ratio: bucket_size(parse_ratio(ratio), 128, 16)  # noqa: E731
    shape = lambda b: (b.frames, (b.height, b.width))  # noqa: E731
    assert shape(pick(17, 720, 1280)) == (17, size("16:9"))
    assert shape(pick(9, 272, 640)) == (9, size("2.39:1"))  # bikes: 2.35
    assert shape(pick(9, 144, 176)) == (9, size("4:3"))  # carphone: 1.22 (4:3 is nearer than 1:1 in log ratio)
    assert shape(pick(9, 1280, 720)) == (9, size("9:16"))  # portrait
    assert shape(pick(1, 300, 451, image=True)) == (1, size("4:3"))
    with pytest.raises(NoBucket) as err:
        pick(9, 100, 400)
    assert err.value.reason == "bucket_aspect" and "data.buckets.aspect_ratios" in str(err.value)
    no_images = BucketChooser(BucketConfig(enabled=True, frames=[9]), 4)
    with pytest.raises(NoBucket, match="has no 1") as err:
        no_images.choose(1, 64, 64, image=True)
    assert err.value.reason == "bucket_no_image"


def test_bucket_config_is_checked():
    with pytest.raises(ConfigError, match=r"data.buckets.frames.*4k\+1"):
        BucketConfig(frames=[1, 16])
    with pytest.raises(ConfigError, match="WIDTH:HEIGHT"):
        BucketConfig(aspect_ratios=["16x9"])


def test_real_media_land_in_the_expected_buckets(real_media_shards):
    """Three video aspect ratios and durations (17, 13 and 9 frames) and photos, one run."""
    buckets = BucketConfig(enabled=True, frames=[1, 5, 9, 17], resolution=128, aspect_ratios=RATIOS)
    cfg = DataConfig(shards=",".join(real_media_shards["video"] + real_media_shards["image"]), buckets=buckets)
    loader = build_loader(cfg, 2, infinite=False, drop_last=False)
    got = {}
    for b in loader:
        t, h, w = b["video"].shape[2:]
        assert b["bucket"] == f"{t}x{h}x{w}" and (t - 1) % 4 == 0
        got.update({key: (b["bucket"], caption) for key, caption in zip(b["key"], b["caption"])})
    name = lambda frames, ratio: "x".join(map(str, (frames, *bucket_size(parse_ratio(ratio), 128, 16))))  # noqa: E731
    expected = {"an animated rabbit in a sunny meadow": name(17, "16:9"),  # 180x320, 17 frames: the longest
                "cyclists riding past a street": name(9, "2.39:1"),  # 136x320 (2.35), 13 frames: 9 fit
                "a man talking on a phone": name(9, "4:3"),  # 144x176 (1.22), 9 frames
                "an astronaut in a space suit": name(1, "1:1"), "a ginger cat": name(1, "4:3"),  # 451x300
                "a cup of coffee on a saucer": name(1, "4:3"), "a man with a camera": name(1, "1:1"),
                "the scikit-image logo": name(1, "1:1")}
    assert {key: bucket for key, (bucket, _) in got.items()} == {key: expected[c] for key, (_, c) in got.items()}
    assert len(got) == 11 and len(set(expected.values())) == 5
    assert loader.stats.buckets == Counter({name(17, "16:9"): 2, name(9, "2.39:1"): 2, name(9, "4:3"): 2,
                                            name(1, "1:1"): 3, name(1, "4:3"): 2})
    narrow = DataConfig(shards=cfg.shards, buckets=BucketConfig(enabled=True, frames=[1, 9, 17], resolution=64,
                                                               aspect_ratios=["1:1", "16:9"], max_aspect_error=0.1))
    loader = build_loader(narrow, 2, infinite=False, drop_last=False)
    assert sum(len(b["key"]) for b in loader) == 5  # the bunny and the square photos
    assert loader.stats.bad == Counter({"bucket_aspect": 6})  # bikes, carphone, cat, coffee: counted, not lost


@pytest.fixture(scope="module")
def shaped_shards(tmp_path_factory) -> list[str]:
    """36 synthetic clips of three sizes (1:1, 4:3, 16:9) and three lengths (5, 9, 13 frames) in 3 shards."""
    rng = random.Random(0)
    samples = shaped_clip_samples(4, rng)
    rng.shuffle(samples)
    return write_shards(samples, str(tmp_path_factory.mktemp("shaped") / "%05d.tar"), maxcount=12)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_with_buckets_equals_uninterrupted(shaped_shards, workers):
    """Samples waiting in bucket queues at the stop are replayed: the next batches are the same."""
    buckets = BucketConfig(enabled=True, frames=[5, 9], resolution=64, tokens_per_batch=100)
    cfg = DataConfig(shards=",".join(shaped_shards), buckets=buckets, num_workers=workers, shuffle_buffer=4)
    reference = build_loader(cfg, 2, seed=1)
    full = list(itertools.islice(iter(reference), 30))
    reference.close()  # (no worker processes left behind when the next loader forks its own)
    assert len({b["bucket"] for b in full}) == 6  # 3 sizes x 2 lengths (13-frame clips give 9)
    for b in full:  # the batch size keeps the tokens per batch near the budget
        assert b["video"].shape[0] == 100 // tokens(*b["video"].shape[2:], [1, 2, 2])
    first = build_loader(cfg, 2, seed=1)
    list(itertools.islice(iter(first), 7))
    state = first.state_dict()
    first.close()
    assert any(r["pending"] for r in state["ranks"][0]["readers"])  # something was waiting
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    resumed = build_loader(cfg, 2, seed=1)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    for a, b in zip(itertools.islice(iter(resumed), 23), full[7:], strict=True):
        assert a["key"] == b["key"] and a["bucket"] == b["bucket"] and torch.equal(a["video"], b["video"])
    assert resumed.stats.seen == sum(b["seen"] for b in full)
    resumed.close()
