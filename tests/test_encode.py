"""`dit encode`: raw shards -> latent shards that hold exactly what the VAE and text encoder give for each clip."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from data_pipelines.loader import build_loader
from dit.config import ConfigError, load_config
from dit.encode import encode_shards
from dit.models.text import build_text_encoder
from dit.models.vae import CausalVAE, encoder_digest, load_vae, save_vae


def _load(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False))


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("vae") / "vae"
    save_vae(CausalVAE(latent_channels=4, base_channels=8), out)
    return out


def test_latent_shards_match_the_encoders_and_reruns_skip(synthetic_shards, vae_dir, tmp_path) -> None:
    shards = ",".join(synthetic_shards[:2])  # 16 + 16 clips, 9 frames of 64x64
    cfg = load_config(None, [f"vae.checkpoint={vae_dir}", "data.frames=9", "data.height=32", "data.width=32",
                             "text.encoder=minilm", "text.max_length=16"])
    out = tmp_path / "latents"
    counts = encode_shards(shards, out, cfg, batch_size=8)
    assert counts == {"encoded": 2, "skipped": 0, "samples": 32}
    assert sorted(p.name for p in out.iterdir()) == [Path(s).name for s in synthetic_shards[:2]]  # no temp files

    # An independent pass: the same clips through the loader, the VAE and the text encoder.
    vae = load_vae(vae_dir).eval()
    text = build_text_encoder(cfg.text)
    data = replace(cfg.data, shards=synthetic_shards[0], shuffle_buffer=1)
    (batch, *_) = list(build_loader(data, 16, epoch_seed=False, infinite=False, drop_last=False))
    with torch.no_grad():
        posterior = vae.encode(batch["video"])
        states, mask = text.encode(batch["caption"])
    samples = list(wds.WebDataset(str(out / Path(synthetic_shards[0]).name), shardshuffle=False))
    assert [s["__key__"] for s in samples] == batch["key"]
    for i, s in enumerate(samples):
        assert s["txt"].decode() == batch["caption"][i]
        torch.testing.assert_close(_load(s["mean.npy"]), posterior.mean[i])
        torch.testing.assert_close(_load(s["logvar.npy"]), posterior.logvar[i])
        assert _load(s["mean.npy"]).shape == (4, 3, 4, 4)  # 9 frames -> 3 latent frames, 32 / 8 = 4
        torch.testing.assert_close(_load(s["text.npy"]), states[i][mask[i]])
        meta = json.loads(s["json"])
        assert (meta["frames"], meta["height"], meta["width"], meta["latent_channels"]) == (9, 32, 32, 4)
        assert meta["vae_encoder"] == encoder_digest(vae) and meta["text"] == "minilm"
        assert (meta["text_dim"], meta["text_max_length"]) == (text.dim, 16)

    again = encode_shards(",".join(synthetic_shards[:3]), out, cfg, batch_size=8)  # a rerun adds only the new one
    assert again == {"encoded": 1, "skipped": 2, "samples": 16}


def test_encode_needs_a_vae(synthetic_shards, tmp_path) -> None:
    with pytest.raises(ValueError, match="vae.checkpoint is not set"):
        encode_shards(synthetic_shards[0], tmp_path, load_config(None, []))


@pytest.mark.parametrize("family", ["wan", "ltx"])
def test_a_pretrained_family_encodes_real_shards_at_its_compression(real_media_shards, family, tmp_path) -> None:
    """`dit encode` of real clips with a tiny random Wan (4x / 8x) or LTX (8x / 32x) VAE: latent shards whose
    grid follows the VAE's compression, holding its posterior, that the loader reads back at the right pixel size."""
    from tiny_vaes import save_tiny_vae

    from dit.models.vae_families import load_family_vae

    folder = tmp_path / "vae"
    save_tiny_vae(family, folder)
    size = {"wan": (9, 32, 48), "ltx": (9, 64, 64)}[family]
    grid = {"wan": (16, 3, 4, 6), "ltx": (8, 2, 2, 2)}[family]  # C, 1 + (9-1)/4 | 1 + (9-1)/8, H/8 | H/32, ...
    items = [f"data.frames={size[0]}", f"data.height={size[1]}", f"data.width={size[2]}", "text.encoder=none"]
    cfg = load_config(None, [f"vae.family={family}", f"vae.pretrained={folder}", *items])
    (shard,) = real_media_shards["video"]
    out = tmp_path / "latents"
    assert encode_shards(shard, out, cfg, batch_size=4) == {"encoded": 1, "skipped": 0, "samples": 6}

    vae = load_family_vae(family, folder)
    (batch, *_) = list(build_loader(replace(cfg.data, shards=shard, shuffle_buffer=1), 6, epoch_seed=False,
                                    infinite=False, drop_last=False))
    with torch.no_grad():
        posterior = vae.encode(batch["video"])  # an independent pass over the same clips
    samples = list(wds.WebDataset(str(out / Path(shard).name), shardshuffle=False))
    assert [s["__key__"] for s in samples] == batch["key"] == real_media_shards["video_keys"]
    for i, s in enumerate(samples):
        assert _load(s["mean.npy"]).shape == grid
        torch.testing.assert_close(_load(s["mean.npy"]), posterior.mean[i])
        torch.testing.assert_close(_load(s["logvar.npy"]), posterior.logvar[i])
        meta = json.loads(s["json"])
        assert (meta["vae_family"], meta["latent_channels"]) == (family, grid[0])
        assert (meta["temporal_compression"], meta["spatial_compression"]) == (vae.temporal_compression,
                                                                               vae.spatial_compression)
        assert meta["vae"] == str(folder) and meta["vae_encoder"] == encoder_digest(vae)

    latents = replace(cfg.data, shards=str(out / Path(shard).name), latents=True, shuffle_buffer=1)
    loader = build_loader(latents, 6, epoch_seed=False, infinite=False, drop_last=False)
    (read, *_) = list(loader)  # pixel size from the recorded compression: every sample fits data.frames x H x W
    assert read["key"] == batch["key"] and not dict(loader.stats.bad)
    torch.testing.assert_close(read["mean"], posterior.mean)


def test_encode_device_is_checked_before_any_work(synthetic_shards, vae_dir, tmp_path, capsys) -> None:
    """auto picks the first CUDA GPU or the CPU; a device that is not here stops the command in one line, before a
    shard is read or an output folder made (the CUDA path itself runs only where a GPU is: not on CI)."""
    from dit.cli import main as dit
    from dit.encode import encode_device

    assert encode_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert encode_device("cpu") == torch.device("cpu")
    cfg = load_config(None, [f"vae.checkpoint={vae_dir}", "data.frames=9", "data.height=32", "data.width=32"])
    for device, problem in (("mps", "'mps': use auto, cpu, cuda or cuda:N"), ("gpu0", "is not a device"),
                            (f"cuda:{torch.cuda.device_count()}", "no such CUDA GPU is visible here")):
        with pytest.raises(ConfigError, match=problem):
            encode_shards(synthetic_shards[0], tmp_path / "out", cfg, device=device)
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as stop:
        dit(["encode", synthetic_shards[0], str(tmp_path / "out"), "--device", "tpu", f"vae.checkpoint={vae_dir}",
             "data.frames=9", "data.height=32", "data.width=32"])
    assert stop.value.code == 2 and capsys.readouterr().err.strip() == (
        "error: --device 'tpu' is not a device; use auto, cpu, cuda or cuda:N")
    counts = encode_shards(synthetic_shards[0], tmp_path / "cpu", cfg, device="cpu")
    assert counts == {"encoded": 1, "skipped": 0, "samples": 16}
