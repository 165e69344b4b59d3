"""The data.max_bad_fraction stop counts each sample once per epoch (issue 13, defect 12: "20 of 20" for a set of 16
samples, its first epoch counted with part of the second), and is a user error (``TooManyBadSamples``, a
``ConfigError``) that `dit` prints as one line, also when a loader worker raised it."""

from __future__ import annotations

import logging
import random

import pytest

from data_pipelines.config import ConfigError, DataConfig
from data_pipelines.loader import TooManyBadSamples, build_loader
from data_pipelines.synthetic import render_clip
from data_pipelines.writer import encode_mp4, write_shards
from dit.cli import error_line


def junk_shard(tmp_path, n_bad: int, n_good: int = 0) -> str:
    video, _ = render_clip("red", "circle", "left", frames=5, height=32, width=32, rng=random.Random(0))
    good = encode_mp4(video, 8)
    samples = [{"__key__": f"good{i}", "mp4": good, "txt": "a red circle"} for i in range(n_good)]
    samples += [{"__key__": f"junk{i}", "mp4": b"junk" * 10, "txt": "x"} for i in range(n_bad)]
    return write_shards(samples, str(tmp_path / "%05d.tar"), maxcount=100)[0]


@pytest.fixture(autouse=True)
def quiet_loader():
    logging.getLogger("data_pipelines.loader").disabled = True
    yield
    logging.getLogger("data_pipelines.loader").disabled = False


def test_a_bad_set_smaller_than_20_stops_after_its_first_epoch_counted_once(tmp_path) -> None:
    cfg = DataConfig(shards=junk_shard(tmp_path, 16), frames=5, height=32, width=32, shuffle_buffer=1)
    with pytest.raises(TooManyBadSamples) as err:
        next(iter(build_loader(cfg, 4, infinite=True)))
    assert str(err.value).startswith("16 of 16 samples (100%) in epoch 0")
    assert "{'decode_error': 16}" in str(err.value)
    assert isinstance(err.value, ConfigError) and isinstance(err.value, RuntimeError)


def test_a_mostly_good_small_set_trains_on_across_epochs(tmp_path) -> None:
    cfg = DataConfig(shards=junk_shard(tmp_path, 3, n_good=9), frames=5, height=32, width=32, shuffle_buffer=1)
    it = iter(build_loader(cfg, 3, infinite=True))
    batches = [next(it) for _ in range(9)]  # three epochs of 12 samples, 25% bad each: under 0.5, no stop
    assert sum(len(b["key"]) for b in batches) == 27


def test_a_worker_raised_stop_is_one_line(tmp_path) -> None:
    cfg = DataConfig(shards=junk_shard(tmp_path, 25), frames=5, height=32, width=32, num_workers=1)
    with pytest.raises(TooManyBadSamples) as err:
        next(iter(build_loader(cfg, 2, infinite=False)))
    assert "Original Traceback" in str(err.value)  # what torch's DataLoader makes of a worker's exception
    line = error_line(err.value)
    assert line.startswith("20 of 20 samples (100%) read in the current epoch") and "\n" not in line
