"""data.decode_cache_mb: videos decoded whole once and then indexed from memory give the batches that decoding the
picked frames every time gives, and the cache keeps to its budget."""

from pathlib import Path

import pytest
import torch

from data_pipelines.loader import build_loader
from dit.config import ConfigError, DataConfig


def epochs(cfg: DataConfig, n: int, batch_size: int = 2) -> tuple[list[dict], object]:
    loader = build_loader(cfg, batch_size, seed=3, infinite=False, drop_last=False)
    batches = [b for _ in range(n) for b in loader]
    return batches, loader.decoder.cache


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x["key"] == y["key"] and x["caption"] == y["caption"]
        assert torch.equal(x["video"], y["video"])


@pytest.mark.parametrize("timing", [{"frame_stride": 2}, {"fps": 12.0}])
def test_real_videos_same_batches_with_cache(real_media_shards, timing):
    """H.264 clips of 9-17 frames, 5 frames at a random offset per epoch (a stride, or re-timed to 12 fps): the
    frames indexed from a whole decode are the frames decoded one by one, in every epoch."""
    spec = ",".join(real_media_shards["video"])
    plain = DataConfig(shards=spec, frames=5, height=64, width=64, shuffle_buffer=4, **timing)
    cached = DataConfig(shards=spec, frames=5, height=64, width=64, shuffle_buffer=4, decode_cache_mb=64, **timing)
    want, none = epochs(plain, 4)
    got, cache = epochs(cached, 4)
    assert none is None
    assert_same(got, want)
    videos = len(real_media_shards["video_keys"])
    clips: dict[str, set] = {}
    for b in want:
        for key, video in zip(b["key"], b["video"]):
            clips.setdefault(key, set()).add(video.flatten()[::97].numpy().tobytes())
    assert any(len(c) > 1 for c in clips.values())  # a clip's picked frames change between epochs: real indexing
    # epoch 1 decodes the picked frames and notes sizes, epoch 2 decodes each clip whole and keeps it; a clip too
    # short for 5 frames at 12 fps is skipped in every epoch, as without the cache
    short = videos - len(clips)
    assert cache.stats()["videos"] == len(clips) and cache.hits == 3 * len(clips)
    assert cache.misses == len(clips) + 4 * short and (short > 0) == ("fps" in timing)
    assert 0 < cache.used <= cache.budget


def test_budget_keeps_what_fits(synthetic_shards):
    """A budget for a few clips keeps only those; the others are decoded as without the cache, and the batches
    are the same either way."""
    shard = synthetic_shards[3]  # 12 clips of 9 x 64 x 64
    clip_mib = 9 * 64 * 64 * 3 / 2**20
    base = dict(shards=shard, frames=5, height=32, width=32, shuffle_buffer=8)
    want, _ = epochs(DataConfig(**base), 3, batch_size=4)
    got, cache = epochs(DataConfig(**base, decode_cache_mb=3.5 * clip_mib), 3, batch_size=4)
    assert_same(got, want)
    assert cache.stats()["videos"] == 3 and cache.used <= cache.budget
    assert cache.hits == 3 + 3 and cache.misses == 12 + 9 + 9  # 3 decoded whole in epoch 2; hits in epochs 2, 3


def test_negative_budget_is_a_config_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="data.decode_cache_mb"):
        DataConfig(shards=str(tmp_path), decode_cache_mb=-1)
