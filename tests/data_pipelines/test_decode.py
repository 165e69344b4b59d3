import numpy as np
import pytest
import torch

import data_pipelines.decode as decode
from data_pipelines.decode import DecodeError, decode_image, decode_video, resize_crop
from data_pipelines.sampling import TooShort, frame_indices
from data_pipelines.writer import encode_image, encode_mp4


def _numbered_clip(t=12, h=32, w=64):
    """Frame i is a flat grey of level 20 * i, so decoded frames identify their index."""
    return np.stack([np.full((h, w, 3), 20 * i, np.uint8) for i in range(t)])


@pytest.fixture(scope="module")
def clip_bytes():
    return encode_mp4(_numbered_clip(), fps=10, crf=0)


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_decode_reads_requested_frames(clip_bytes, backend, monkeypatch):
    if backend == "pyav":
        monkeypatch.setattr(decode, "decord", None)
    frames, info = decode_video(clip_bytes, [1, 4, 11])
    assert frames.shape == (3, 32, 64, 3) and frames.dtype == np.uint8
    assert (info.num_frames, info.fps, info.height, info.width, info.backend) == (12, 10.0, 32, 64, backend)
    np.testing.assert_allclose(frames.reshape(3, -1).mean(1), [20, 80, 220], atol=2)
    frames, _ = decode_video(clip_bytes, lambda n: frame_indices(n, 3, 5))  # 0, 5, 10
    np.testing.assert_allclose(frames.reshape(3, -1).mean(1), [0, 100, 200], atol=2)
    with pytest.raises(TooShort):
        decode_video(clip_bytes, lambda n: frame_indices(n, 5, 3))  # needs 13


def test_pyav_fallback_when_decord_fails(clip_bytes, monkeypatch):
    class Broken:
        def VideoReader(self, *a, **k):  # noqa: N802
            raise RuntimeError("decord cannot")

        def cpu(self, i):
            return None

    monkeypatch.setattr(decode, "decord", Broken())
    frames, info = decode_video(clip_bytes)
    assert frames.shape == (12, 32, 64, 3) and info.backend == "pyav"


@pytest.mark.parametrize("width", [48, 72])
def test_widths_decord_rejects_still_decode(width):
    """decord 0.6.0 fails ("DECORDArrayCopyFromTo: The size must exactly match") on some widths, e.g. 16, 24,
    48 and 72; the PyAV fallback reads them."""
    frames, info = decode_video(encode_mp4(_numbered_clip(w=width), fps=10, crf=0), [2, 7])
    assert frames.shape == (2, 32, width, 3)
    np.testing.assert_allclose(frames.reshape(2, -1).mean(1), [40, 140], atol=2)


def test_undecodable_bytes():
    with pytest.raises(DecodeError, match="cannot decode video .*decord.*pyav"):
        decode_video(b"\x00not a video" * 50)
    with pytest.raises(DecodeError, match="cannot decode image"):
        decode_image(b"\x89PNG garbage")


def test_decode_image_modes():
    rgb = np.zeros((6, 8, 3), np.uint8)
    rgb[:, :4] = (255, 0, 0)
    np.testing.assert_array_equal(decode_image(encode_image(rgb, "png")), rgb)
    grey = decode_image(encode_image(np.full((5, 7), 90, np.uint8), "png"))
    assert grey.shape == (5, 7, 3) and (grey == 90).all()
    rgba = np.zeros((4, 4, 4), np.uint8)  # fully transparent black → white
    rgba[:2, :, :] = (0, 0, 255, 255)  # top half opaque blue
    out = decode_image(encode_image(rgba, "png"))
    assert (out[:2] == (0, 0, 255)).all() and (out[2:] == 255).all()
    jpg = decode_image(encode_image(rgb, "jpg"))
    assert jpg.shape == (6, 8, 3)


def test_resize_crop_covers_then_crops_center():
    img = np.zeros((1, 40, 80, 3), np.uint8)  # red | green | blue | white quarters along the width
    for q, c in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]):
        img[:, :, 20 * q : 20 * (q + 1)] = c
    out = resize_crop(img, 16, 16)  # shorter side 40 → 16, width 80 → 32, crop columns 8..24
    assert out.shape == (3, 1, 16, 16) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    # the center crop holds the green and blue quarters only
    np.testing.assert_allclose(out[:, 0, :, 1], torch.tensor([[-1.0] * 16, [1.0] * 16, [-1.0] * 16]), atol=1e-6)
    np.testing.assert_allclose(out[:, 0, :, 14], torch.tensor([[-1.0] * 16, [-1.0] * 16, [1.0] * 16]), atol=1e-6)
    up = resize_crop(np.full((2, 4, 6, 3), 255, np.uint8), 8, 8)  # upscale: 4x6 → 8x12 → crop 8x8
    assert up.shape == (3, 2, 8, 8) and torch.allclose(up, torch.ones_like(up))
