import json
import logging
import random
import re
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch

from data_pipelines.loader import build_loader
from data_pipelines.synthetic import measure_clip, render_clip
from data_pipelines.writer import encode_mp4, write_shards
from dit.config import ConfigError, DataConfig

CAPTION = re.compile(r"^a (red|green|blue|yellow|white) (circle|square|triangle) moving (left|right|up|down)$")


def one_epoch(loader) -> list[dict]:
    return list(loader)


def keys_of(batches) -> list[str]:
    return [k for b in batches for k in b["key"]]


def captions_by_key(paths) -> dict[str, dict]:
    out = {}
    for path in paths:
        with tarfile.open(path) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".json"):
                    meta = json.loads(tf.extractfile(m).read())
                    out[m.name.split(".")[0]] = meta
    return out


@pytest.mark.parametrize("height,width", [(64, 64), (32, 48)])
def test_synthetic_batches(synthetic_shards, height, width):
    cfg = DataConfig(shards=str(Path(synthetic_shards[0]).parent), frames=9, height=height, width=width)
    loader = build_loader(cfg, batch_size=8, infinite=False, drop_last=True)
    batches = one_epoch(loader)
    assert len(batches) == 7  # 60 clips, drop_last
    meta = captions_by_key(synthetic_shards)
    for b in batches:
        assert b["video"].shape == (8, 3, 9, height, width) and b["video"].dtype == torch.float32
        assert -1 <= b["video"].min() and b["video"].max() <= 1 and b["video"].max() > 0.9
        assert len(b["caption"]) == len(b["key"]) == 8
        for key, caption, video in zip(b["key"], b["caption"], b["video"]):
            assert CAPTION.match(caption) and caption == meta[key]["caption"]
            if height == width:  # uncropped: the pixels still say what the caption says
                m = measure_clip(video)
                assert (m["color"], m["direction"]) == (meta[key]["color"], meta[key]["direction"])
    assert len(set(keys_of(batches))) == 56
    assert loader.stats.as_dict() == {"seen": 60, "ok": 60, "bad": {}}


def test_single_frames_and_stride(synthetic_shards):
    spec = ",".join(synthetic_shards[:2])
    b = next(iter(build_loader(DataConfig(shards=spec, frames=1, height=32, width=32), 4)))
    assert b["video"].shape == (4, 3, 1, 32, 32)
    b = next(iter(build_loader(DataConfig(shards=spec, frames=5, frame_stride=2, height=32, width=32), 4)))
    assert b["video"].shape == (4, 3, 5, 32, 32)


def test_images_become_still_clips(tmp_path):
    from data_pipelines.synthetic import make_synthetic

    paths = make_synthetic(tmp_path, num_clips=6, frames=1, height=32, width=32, clips_per_shard=6)
    b = next(iter(build_loader(DataConfig(shards=paths[0], frames=1, height=16, width=16), 6)))
    assert b["video"].shape == (6, 3, 1, 16, 16)
    b = next(iter(build_loader(DataConfig(shards=paths[0], frames=5, height=16, width=16), 6)))
    assert b["video"].shape == (6, 3, 5, 16, 16)
    assert torch.equal(b["video"], b["video"][:, :, :1].expand_as(b["video"]))


def test_infinite_runs_past_an_epoch(synthetic_shards):
    loader = build_loader(DataConfig(shards=synthetic_shards[3], frames=9, height=32, width=32), 5)  # 12 clips
    it = iter(loader)
    keys = [k for _ in range(6) for k in next(it)["key"]]
    assert len(keys) == 30 and len(set(keys)) == 12 and loader.stats.seen >= 30


def test_order_is_seeded_by_seed_and_epoch(synthetic_shards):
    cfg = DataConfig(shards=",".join(synthetic_shards[:2]), frames=1, height=16, width=16, shuffle_buffer=8)
    make = lambda **kw: build_loader(cfg, 4, infinite=False, **kw)
    a, b = make(seed=1), make(seed=1)
    a0, a1, b0 = keys_of(a), keys_of(a), keys_of(b)
    assert a0 == b0 and a0 != a1 and sorted(a0) == sorted(a1)
    assert keys_of(make(seed=2)) != a0
    c = make(seed=1, epoch_seed=False)
    assert keys_of(c) == keys_of(c)
    a.set_epoch(1)
    assert keys_of(a) == a1


def test_workers_yield_the_same_keys(synthetic_shards):
    spec = str(Path(synthetic_shards[0]).parent)
    runs = {}
    for workers in (0, 2):
        cfg = DataConfig(shards=spec, frames=5, height=16, width=16, num_workers=workers)
        loader = build_loader(cfg, 4, infinite=False, drop_last=False)
        runs[workers] = [Counter(keys_of(loader)) for _ in range(2)]  # two epochs
        assert loader.stats.as_dict() == {"seen": 120, "ok": 120, "bad": {}}
    assert runs[0] == runs[2] and runs[0][0] == Counter({f"{i:06d}": 1 for i in range(60)})


def test_ranks_split_the_shards(synthetic_shards, monkeypatch):
    cfg = DataConfig(shards=str(Path(synthetic_shards[0]).parent), frames=1, height=16, width=16)
    monkeypatch.setenv("RANK", "1")  # the environment does not steer the loader: its arguments do
    monkeypatch.setenv("WORLD_SIZE", "4")
    per_rank = []
    for rank in (0, 1):
        per_rank.append(set(keys_of(build_loader(cfg, 4, rank=rank, world_size=2, seed=5, infinite=False,
                                                 drop_last=False))))
    assert sorted(map(len, per_rank)) == [28, 32]  # two shards each: 16 + 12 and 16 + 16
    assert not per_rank[0] & per_rank[1] and len(per_rank[0] | per_rank[1]) == 60


# ----------------------------------------------------------------------------- bad data


def _clip_sample(key: str, frames: int = 9, caption: str | bytes | None = "a red circle moving left") -> dict:
    video, meta = render_clip("red", "circle", "left", frames=frames, height=32, width=32, rng=random.Random(key))
    sample = {"__key__": key, "mp4": encode_mp4(video, 8), "json": meta}
    if caption is not None:
        sample["txt"] = caption
    return sample


@pytest.fixture(scope="module")
def corrupt_shard(tmp_path_factory) -> str:
    samples = [
        _clip_sample("good0"),
        {"__key__": "garbage", "mp4": b"\x00\x00\x00\x18ftypmp42 but not really" * 40, "txt": "a broken file"},
        _clip_sample("good1"),
        {"__key__": "nomedia", "txt": "a caption with nothing to show", "json": {"a": 1}},
        _clip_sample("short", frames=3),
        _clip_sample("badcaption", caption=b"\xff\xfe not utf-8 \xc3\x28"),
        _clip_sample("nocaption", caption=None),
        _clip_sample("good2"),
        _clip_sample("good3"),
    ]
    return write_shards(samples, str(tmp_path_factory.mktemp("corrupt") / "%05d.tar"), maxcount=100)[0]


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_samples_are_skipped_and_counted(corrupt_shard, workers, caplog):
    cfg = DataConfig(shards=corrupt_shard, frames=9, height=32, width=32, num_workers=workers)
    loader = build_loader(cfg, 3, infinite=False, drop_last=False)
    with caplog.at_level(logging.WARNING, logger="data_pipelines.loader"):
        batches = one_epoch(loader)
    assert sorted(keys_of(batches)) == ["good0", "good1", "good2", "good3"]
    expected = {"decode_error": 1, "no_media": 1, "too_short": 1, "bad_caption": 1, "no_caption": 1}
    assert loader.stats.as_dict() == {"seen": 9, "ok": 4, "bad": expected}
    assert sum((Counter(b["bad_counts"]) for b in batches), Counter()) == Counter(expected)  # per-batch counts add up
    if workers == 0:  # one warning per bad sample, naming it
        assert len(caplog.records) == 5
        assert all(k in caplog.text for k in ("garbage", "nomedia", "short", "badcaption", "nocaption"))


@pytest.mark.parametrize("workers", [0, 2])
def test_too_many_bad_samples_stop_the_run(tmp_path, workers):
    samples = [_clip_sample("good0"), _clip_sample("good1")]
    samples += [{"__key__": f"junk{i}", "mp4": b"junk" * 10, "txt": "x"} for i in range(25)]
    shard = write_shards(samples, str(tmp_path / "%05d.tar"), maxcount=100)[0]
    cfg = DataConfig(shards=shard, frames=9, height=32, width=32, num_workers=workers, max_bad_fraction=0.5)
    logging.getLogger("data_pipelines.loader").disabled = True
    try:
        with pytest.raises(RuntimeError, match=r"more than data.max_bad_fraction=0.5"):
            one_epoch(build_loader(cfg, 2, infinite=False))
        cfg.max_bad_fraction = 1.0
        loader = build_loader(cfg, 2, infinite=False)
        assert sorted(keys_of(loader)) == ["good0", "good1"]  # 1.0: never stop
        assert loader.stats.as_dict() == {"seen": 27, "ok": 2, "bad": {"decode_error": 25}}
    finally:
        logging.getLogger("data_pipelines.loader").disabled = False


def test_truncated_shard_is_skipped(synthetic_shards, tmp_path):
    data = Path(synthetic_shards[0]).read_bytes()
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(data[: len(data) // 2])
    cfg = DataConfig(shards=f"{truncated},{synthetic_shards[1]}", frames=9, height=16, width=16)
    loader = build_loader(cfg, 4, infinite=False, drop_last=False)
    keys = keys_of(loader)
    assert {f"{i:06d}" for i in range(16, 32)} <= set(keys)  # the whole intact shard
    assert 16 < len(keys) < 32  # and the head of the truncated one
    # the cut sample shows up as a tar error, an undecodable mp4 or a missing caption, by where the cut falls
    assert loader.stats.num_bad >= 1 and loader.stats.ok == len(keys)


def test_missing_shard_fails_at_build(synthetic_shards):
    spec = f"{synthetic_shards[0]},/no/such/dir/00007.tar"
    with pytest.raises(FileNotFoundError, match="/no/such/dir/00007.tar"):
        build_loader(DataConfig(shards=spec), 2)


# ----------------------------------------------------------------------------- real media


@pytest.mark.parametrize("height,width", [(48, 80), (96, 64)])
def test_real_videos_and_photos_together(real_media_shards, height, width):
    spec = ",".join(real_media_shards["video"] + real_media_shards["image"])
    cfg = DataConfig(shards=spec, frames=9, height=height, width=width, shuffle_buffer=16)
    loader = build_loader(cfg, 4, infinite=False, drop_last=False)
    batches = one_epoch(loader)
    videos, images = set(real_media_shards["video_keys"]), set(real_media_shards["image_keys"])
    assert sorted(keys_of(batches)) == sorted(videos | images) and len(videos) == 6 and len(images) == 5
    assert loader.stats.as_dict() == {"seen": 11, "ok": 11, "bad": {}}
    for b in batches:
        assert b["video"].shape[1:] == (3, 9, height, width)
        assert -1 <= b["video"].min() and b["video"].max() <= 1
        for key, caption, clip in zip(b["key"], b["caption"], b["video"]):
            assert caption and clip.std() > 0.05  # a real picture, not a flat frame
            moved = (clip[:, -1] - clip[:, 0]).abs().mean()
            if key in images:
                assert moved == 0  # a still clip
            elif "rabbit" not in caption:  # (the bunny's first frames are a near-static title)
                assert moved > 0.005


def _truncated_shard(path: Path) -> str:
    """Four good clips t0..t3 with the tar cut in the middle of t2's video."""
    samples = [_clip_sample(f"t{i}") for i in range(4)]
    shard = write_shards(samples, str(path / "%05d.tar"), maxcount=100)[0]
    with tarfile.open(shard) as tf:
        cut = next(m for m in tf.getmembers() if m.name == "t2.mp4")
        cut_at = cut.offset_data + cut.size // 2
    Path(shard).write_bytes(Path(shard).read_bytes()[:cut_at])
    return shard


@pytest.mark.parametrize("workers", [0, 2])
def test_every_bad_kind_and_a_truncated_shard(corrupt_shard, tmp_path, workers):
    """Good samples, every bad kind and a truncated shard: the epoch runs to its end; counts and log are right."""
    truncated = _truncated_shard(tmp_path / "cut")
    bad_log = tmp_path / "bad.tsv"
    cfg = DataConfig(shards=f"{corrupt_shard},{truncated}", frames=9, height=32, width=32, num_workers=workers,
                     bad_samples_log=str(bad_log))
    logging.getLogger("data_pipelines.loader").disabled = True
    try:
        loader = build_loader(cfg, 2, infinite=False, drop_last=False)
        keys = sorted(keys_of(loader))
    finally:
        logging.getLogger("data_pipelines.loader").disabled = False
    assert keys == ["good0", "good1", "good2", "good3", "t0", "t1"]  # t2 was cut; t3 lies past the cut
    expected = {"decode_error": 1, "no_media": 1, "too_short": 1, "bad_caption": 1, "no_caption": 1, "tar_error": 1}
    assert loader.stats.as_dict() == {"seen": 12, "ok": 6, "bad": expected}
    rows = [line.split("\t") for line in bad_log.read_text().splitlines()]
    assert sorted((r[0], r[1]) for r in rows) == sorted([
        ("garbage", "decode_error"), ("nomedia", "no_media"), ("short", "too_short"), ("badcaption", "bad_caption"),
        ("nocaption", "no_caption"), ("-", "tar_error")])
    assert all(r[2] in (corrupt_shard, truncated) and r[3] for r in rows)  # the shard, and why
    assert next(r for r in rows if r[1] == "tar_error")[2] == truncated


def test_a_training_reader_without_shards_fails_at_start(corrupt_shard, caplog):
    # 1 shard, 2 workers: the second worker would wait for a sample for ever, so training refuses at build time
    cfg = DataConfig(shards=corrupt_shard, frames=9, height=32, width=32, num_workers=2)
    with pytest.raises(ConfigError, match=r"1 shards for 2 readers .*data.num_workers"):
        build_loader(cfg, 3)
    with caplog.at_level(logging.WARNING, logger="data_pipelines.loader"):
        build_loader(cfg, 3, infinite=False)  # one finite pass: the idle reader just ends, with a warning
    assert "1 shards for 2 readers" in caplog.text
