"""`dit sample` as a user runs it, on a checkpoint made without training (random weights, tiny sizes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dit.config import load_config
from dit.export import write_export
from dit.models.dit import build_dit
from dit.models.vae import CausalVAE, save_vae

DIT = str(Path(sys.executable).parent / "dit")
SIZE = (5, 16, 32)  # frames, height, width: not the old CLI defaults (17 x 64 x 64)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A checkpoint directory as the trainer writes it: weights, config.json, vae/."""
    root = tmp_path_factory.mktemp("sample")
    frames, height, width = SIZE
    cfg = load_config(None, [f"data.frames={frames}", f"data.height={height}", f"data.width={width}",
                             "text.encoder=none", "model.preset=dit-tiny"])
    torch.manual_seed(0)
    vae = CausalVAE(latent_channels=4, base_channels=8, channel_mults=(1, 1, 1, 1))
    save_vae(vae, root / "vae")
    model = build_dit(cfg.model, in_channels=vae.latent_channels, text_dim=8)
    ckpt = root / "run" / "checkpoints" / "step-00000001"
    ckpt.mkdir(parents=True)
    write_export(ckpt, weights=model.state_dict(), config={"dit": model.config, "experiment": cfg.to_dict()},
                 vae_dir=root / "vae")
    return root / "run"


def test_sample_without_size_flags_writes_the_trained_size(checkpoint: Path, tmp_path: Path) -> None:
    from PIL import Image

    out = tmp_path / "clip.gif"
    proc = subprocess.run([DIT, "sample", "--checkpoint", str(checkpoint), "--prompt", "a red circle",
                           "--steps", "2", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"{out}\ta red circle"]  # where it wrote the file, and for which prompt
    gif = Image.open(out)
    frames, height, width = SIZE
    assert gif.n_frames == frames and gif.size == (width, height)


def test_a_size_flag_overrides_only_its_own_dimension(checkpoint: Path, tmp_path: Path) -> None:
    from PIL import Image

    out = tmp_path / "clip.gif"
    proc = subprocess.run([DIT, "sample", "--checkpoint", str(checkpoint), "--prompt", "x", "--frames", "9",
                           "--steps", "2", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    gif = Image.open(out)
    assert gif.n_frames == 9 and gif.size == (SIZE[2], SIZE[1])
