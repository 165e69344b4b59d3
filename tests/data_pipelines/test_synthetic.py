import hashlib
import io
import itertools
import json
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipelines.decode import decode_video
from data_pipelines.synthetic import BASE_COLORS, COLORS, DIRECTIONS, SHAPES, make_synthetic, measure_clip

CAPTION = re.compile(r"^a (red|green|blue|yellow|white) (circle|square|triangle) moving (left|right|up|down)$")


def read_shards(paths):
    samples = {}
    for path in paths:
        with tarfile.open(path) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return samples


def test_constants():
    assert COLORS["red"] == (255, 0, 0) and COLORS["yellow"] == (255, 255, 0) and len(COLORS) == 6
    assert set(BASE_COLORS) == set(COLORS) - {"magenta"}  # magenta: only for the fine-tuning demo
    assert SHAPES == ("circle", "square", "triangle") and set(DIRECTIONS) == {"left", "right", "up", "down"}


def test_captions_match_attributes_and_are_balanced(synthetic_shards):
    samples = read_shards(synthetic_shards)
    assert len(samples) == 60 and [Path(p).name for p in synthetic_shards] == [
        f"{i:05d}.tar" for i in range(4)]
    combos = Counter()
    for s in samples.values():
        caption, meta = s["txt"].decode(), json.loads(s["json"])
        assert CAPTION.match(caption), caption
        assert caption == f"a {meta['color']} {meta['shape']} moving {meta['direction']}"
        assert (meta["frames"], meta["height"], meta["width"], meta["fps"], meta["size"]) == (9, 64, 64, 8, 16)
        dx, dy = meta["end"][0] - meta["start"][0], meta["end"][1] - meta["start"][1]
        step = {"left": (-32, 0), "right": (32, 0), "up": (0, -32), "down": (0, 32)}[meta["direction"]]
        assert (dx, dy) == pytest.approx(step, abs=1e-2)  # half the frame along the direction
        for x, y in (meta["start"], meta["end"]):  # fully inside
            assert 8 <= x <= 56 and 8 <= y <= 56
        combos[meta["color"], meta["shape"], meta["direction"]] += 1
    assert set(combos) == set(itertools.product(BASE_COLORS, SHAPES, DIRECTIONS)) and set(combos.values()) == {1}


def test_measure_clip_recovers_color_and_direction_of_every_clip(synthetic_shards):
    for key, s in read_shards(synthetic_shards).items():
        meta = json.loads(s["json"])
        video, info = decode_video(s["mp4"])
        assert video.shape == (9, 64, 64, 3) and info.fps == 8
        m = measure_clip(video)
        assert (m["color"], m["direction"]) == (meta["color"], meta["direction"]), (key, meta, m)
        # the same clip as the loader gives it: float [3, T, H, W] in [-1, 1]
        as_tensor = np.moveaxis(video, -1, 0).astype(np.float32) / 127.5 - 1
        m2 = measure_clip(as_tensor)
        assert (m2["color"], m2["direction"]) == (meta["color"], meta["direction"])


def test_measure_clip_edge_cases():
    black = np.zeros((5, 16, 16, 3), np.uint8)
    m = measure_clip(black)
    assert m["color"] is None and m["direction"] is None and m["bright_fraction"] == 0
    still = black.copy()
    still[:, 4:8, 4:8] = (255, 255, 0)
    m = measure_clip(still)
    assert m["color"] == "yellow" and m["direction"] is None and m["displacement"] == (0, 0)


def test_deterministic_for_a_seed(tmp_path):
    kw = dict(num_clips=6, frames=5, height=32, width=48, clips_per_shard=4)
    a = make_synthetic(tmp_path / "a", seed=3, **kw)
    b = make_synthetic(tmp_path / "b", seed=3, **kw)
    c = make_synthetic(tmp_path / "c", seed=4, **kw)
    digest = lambda paths: [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths]
    assert len(a) == 2 and digest(a) == digest(b) and digest(a) != digest(c)
    for s in read_shards(a).values():
        meta = json.loads(s["json"])
        m = measure_clip(decode_video(s["mp4"])[0])
        assert meta["size"] == 8 and (m["color"], m["direction"]) == (meta["color"], meta["direction"])


def test_frames_1_writes_images(tmp_path):
    paths = make_synthetic(tmp_path, num_clips=5, frames=1, height=32, width=32, clips_per_shard=8)
    for s in read_shards(paths).values():
        assert set(s) == {"png", "txt", "json"}
        meta = json.loads(s["json"])
        image = np.asarray(Image.open(io.BytesIO(s["png"])))
        assert image.shape == (32, 32, 3) and CAPTION.match(s["txt"].decode()) and meta["start"] == meta["end"]
        assert measure_clip(image)["color"] == meta["color"]


def test_magenta_clips_are_measured_as_magenta(tmp_path):
    shards = make_synthetic(tmp_path, num_clips=12, frames=9, height=32, width=32, seed=1, colors=("magenta",))
    for s in read_shards(shards).values():
        meta = json.loads(s["json"])
        video, _ = decode_video(s["mp4"])
        m = measure_clip(video)
        assert meta["color"] == "magenta" and (m["color"], m["direction"]) == ("magenta", meta["direction"])
