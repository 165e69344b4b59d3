"""decord is only given bytes it can open: it leaks its reader (and a copy of the bytes) on every input FFmpeg
cannot open, so cut-off downloads in a long run grew host memory without bound."""

import sys

import numpy as np
import pytest

import data_pipelines.decode as decode
from data_pipelines.decode import DecodeError, decode_video
from data_pipelines.writer import encode_mp4


@pytest.fixture(scope="module")
def noisy_mp4() -> bytes:
    """A lossless h264 mp4 of noise, about 1.4 MB, with its moov box at the end (as PyAV and ffmpeg write it)."""
    frames = np.random.default_rng(0).integers(0, 256, (12, 240, 256, 3), dtype=np.uint8)
    return encode_mp4(frames, fps=10, crf=0, preset="ultrafast")


def test_decord_refuses_what_it_cannot_open(noisy_mp4):
    assert decode._decord_refuses(noisy_mp4) is None
    assert "moov" in decode._decord_refuses(noisy_mp4[: len(noisy_mp4) // 2])  # mdat runs past the end
    assert "moov" in decode._decord_refuses(noisy_mp4[:40])
    assert "malformed" in decode._decord_refuses(b"\x00\x00\x00\x04ftypisom" + bytes(100))
    assert "not an mp4" in decode._decord_refuses(b"\x00not a video" * 50)
    assert "not an mp4" in decode._decord_refuses(b"")
    assert decode._decord_refuses(b"\x1a\x45\xdf\xa3" + bytes(60)) is None  # Matroska / WebM: decord decides
    assert decode._decord_refuses(b"RIFF\x00\x00\x00\x00AVI LIST") is None
    # moov first (faststart), then a 64-bit mdat: complete moov, so decord is tried
    moov = (16).to_bytes(4, "big") + b"moov" + bytes(8)
    mdat = (1).to_bytes(4, "big") + b"mdat" + (10**9).to_bytes(8, "big")
    assert decode._decord_refuses(moov + mdat) is None
    assert "moov" in decode._decord_refuses(moov[:12])


def test_cut_off_mp4_goes_to_pyav_only(noisy_mp4, monkeypatch):
    calls = []
    real = decode.decord

    class Spy:
        def VideoReader(self, *a, **k):  # noqa: N802
            calls.append(1)
            return real.VideoReader(*a, **k)

        def cpu(self, i):
            return real.cpu(i)

    monkeypatch.setattr(decode, "decord", Spy())
    with pytest.raises(DecodeError, match=r"decord: not tried \(an mp4 without a moov box.*pyav"):
        decode_video(noisy_mp4[: len(noisy_mp4) // 2], [0, 1])
    assert calls == []
    frames, info = decode_video(noisy_mp4, [0, 11])
    assert calls == [1] and info.backend == "decord" and frames.shape == (2, 240, 256, 3)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_failed_decodes_do_not_grow_rss(noisy_mp4):
    """100 cut-off files of 0.7 MB: decord's leak was about 1.2 MiB each (124 MiB measured); PyAV frees its own."""
    def rss_mib() -> float:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024

    cut = noisy_mp4[: len(noisy_mp4) // 2]
    assert len(cut) > 500_000
    for _ in range(5):  # warm-up
        with pytest.raises(DecodeError):
            decode_video(cut, [0])
    before = rss_mib()
    for _ in range(100):
        with pytest.raises(DecodeError):
            decode_video(cut, [0])
    assert rss_mib() - before < 40
