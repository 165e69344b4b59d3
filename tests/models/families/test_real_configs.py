"""configs/ for the released models: they load on a machine without the weights, and `dit plan` sizes them from
the recorded sizes (transformer on the meta device, the VAE's compression from its family's defaults)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dit.config import VAEConfig, load_config
from dit.plan import estimate, model_size

CONFIGS = Path(__file__).resolve().parents[3] / "configs"
# name -> (published parameter count in billions, hidden, depth, latent tokens per sample of the config's clip)
RELEASED = {
    "wan2.1-t2v-1.3b": (1.42, 1536, 30, 21 * 30 * 52),  # 81 x 480 x 832: 21 latent frames, 60 x 104 / patch 2
    "cogvideox-2b": (1.69, 1920, 30, 13 * 30 * 45),  # 49 x 480 x 720: 13 latent frames, 60 x 90 / patch 2
    "ltx-video": (1.92, 2048, 28, 16 * 15 * 22),  # 121 x 480 x 704: 16 latent frames, 15 x 22 (32x, patch 1)
    # published as "5B"; 121 x 704 x 1280 through Wan 2.2's 16x VAE: 31 latent frames, 44 x 80 / patch 2
    "wan2.2-ti2v-5b": (5.00, 3072, 30, 31 * 22 * 40),
    # LoRA fine-tunes of 14B models at 81 x 480 x 832: Wan 2.1 I2V (its image projections make 16.4B) and one
    # expert of Wan 2.2 A14B (T2V; I2V's wider patch embedding adds 0.4M)
    "wan2.1-i2v-14b-480p": (16.39, 5120, 40, 21 * 30 * 52),
    "wan2.2-t2v-a14b": (14.29, 5120, 40, 21 * 30 * 52),
    "wan2.2-i2v-a14b": (14.29, 5120, 40, 21 * 30 * 52),
    # Wan 2.1 FLF2V (the CLIP position table of two frames: +0.66M) at 81 x 720 x 1280, 4-way sequence parallel
    "wan2.1-flf2v-14b-720p": (16.40, 5120, 40, 21 * 45 * 80),
    # LoRA at its native 81 x 768 x 1360: 21 latent frames padded to 22 for the temporal patch 2, 96 x 170 / patch 2
    "cogvideox1.5-5b": (5.57, 3072, 42, 11 * 48 * 85),
    # HunyuanVideo ("13B": 20 dual- + 40 single-stream blocks) LoRA at 49 x 512 x 768: 13 latent frames, 64 x 96 / 2;
    # SkyReels V1 I2V (its wider patch embedding: +0.2M) at 49 x 544 x 960: 68 x 120 / 2
    "hunyuanvideo": (12.82, 3072, 60, 13 * 32 * 48),
    "skyreels-v1-hunyuan-i2v": (12.82, 3072, 60, 13 * 34 * 60),
    # HunyuanVideo 1.5 480p T2V (8.3B: 54 dual-stream blocks) LoRA at 61 x 480 x 848: 16 latent frames, 30 x 53 (16x)
    "hunyuanvideo1.5-480p-t2v": (8.33, 2048, 54, 16 * 30 * 53),
    "hunyuanvideo1.5-480p-i2v": (8.33, 2048, 54, 16 * 30 * 53),
    # FLUX.1-dev ("12B": 19 dual- + 38 single-stream blocks) LoRA on 1024 x 1024 images: 128 x 128 latents / 2
    "flux.1-dev": (11.90, 3072, 57, 1 * 64 * 64),
    # Stable Diffusion 3.5 Large (8.1B) LoRA and Medium (2.2B parameters; "2.5B" with its 226M-value position table)
    # on 1024 x 1024 images: 128 x 128 latents / patch 2
    "sd3.5-large": (8.06, 2432, 38, 1 * 64 * 64),
    "sd3.5-medium": (2.24, 1536, 24, 1 * 64 * 64),
    # Z-Image-Turbo (6B: 30 layers and 2 + 2 refiner layers) LoRA on 1024 x 1024 images
    "z-image-turbo": (6.15, 3840, 30, 1 * 64 * 64),
    # Qwen-Image (20B: 60 MMDiT blocks) LoRA on 1024 x 1024 images
    "qwen-image": (20.43, 3072, 60, 1 * 64 * 64),
}


def test_family_vae_defaults_are_the_released_geometry():
    """(latent channels, temporal, spatial) without a folder: the diffusers constructor defaults, or another
    release's sizes in vae.family_config (Wan 2.2's VAE)."""
    assert VAEConfig(family="wan").geometry() == (16, 4, 8)
    assert VAEConfig(family="cogvideox").geometry() == (16, 4, 8)
    assert VAEConfig(family="ltx").geometry() == (128, 8, 32)
    assert load_config(CONFIGS / "wan2.2-ti2v-5b.yaml", []).vae.geometry() == (48, 4, 16)
    assert VAEConfig(family="flux").geometry() == (16, 1, 8)  # FLUX.1's, not AutoencoderKL's own defaults
    assert VAEConfig(family="sd3").geometry() == (16, 1, 8)


def test_vae_family_config_is_checked_before_any_work(tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tiny_vaes import save_tiny_vae

    from dit.config import ConfigError

    with pytest.raises(ConfigError, match=r"vae.family_config: \['z_dims'\] are not AutoencoderKLWan arguments"):
        VAEConfig(family="wan", family_config={"z_dims": 48})
    with pytest.raises(ConfigError, match=r"vae.family_config: is for vae.family=wan"):
        VAEConfig(family_config={"z_dim": 48})
    save_tiny_vae("wan", tmp_path / "vae")  # z_dim 16
    with pytest.raises(ConfigError, match=r"vae.family_config: z_dim=48 but the folder has 16 .*: that folder holds "
                                          r"another VAE than the config describes"):
        VAEConfig(family="wan", pretrained=str(tmp_path / "vae"), family_config={"z_dim": 48})
    assert VAEConfig(family="wan", pretrained=str(tmp_path / "vae"), family_config={"z_dim": 16}).geometry()[0] == 16


@pytest.mark.parametrize("name", RELEASED)
def test_released_model_configs_plan(name):
    billions, hidden, depth, tokens = RELEASED[name]
    cfg = load_config(CONFIGS / f"{name}.yaml", [])
    size = model_size(cfg)
    assert (size.base or size.params) / 1e9 == pytest.approx(billions, abs=0.01)  # (LoRA: the base's count)
    assert (size.hidden, size.depth, size.tokens) == (hidden, depth, tokens)
    sp = cfg.train.sequence_parallel  # (the fewest GPUs a config can run on: one sequence-parallel group)
    one, many = (estimate(cfg, gpus=g, gpu_memory_gb=80, size=size) for g in (sp, 64))
    fsdp_one, fsdp_many = (next(e for e in es if e.strategy == "fsdp") for es in (one, many))
    assert fsdp_many.weights == pytest.approx(fsdp_one.weights * sp / 64)  # FSDP shards the weights over 64 ranks
    assert fsdp_one.total > 16 * size.params  # fp32 weights, grads, AdamW moments and EMA: 20 bytes a parameter
    if cfg.train.lora.rank:  # the adapter trains on a frozen base, which one GPU holds in bf16 under DDP
        assert size.params < 0.06 * size.base and next(e for e in one if e.strategy == "ddp").fits  # (rank 128: 5.3%)


def test_dit_plan_command_on_the_wan_config():
    out = subprocess.run([sys.executable, "-m", "dit.cli", "plan", "--config", str(CONFIGS / "wan2.1-t2v-1.3b.yaml"),
                          "--gpus", "8", "--gpu-memory", "80"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "1419.0M trainable parameters (hidden 1536, depth 30)" in out.stdout
    assert "32760 tokens/sample" in out.stdout and "fits: ddp, zero1, zero2, zero3, fsdp" in out.stdout
    assert "text encoder not counted" in out.stdout  # no UMT5 folder on this machine: said, not guessed


def test_training_a_released_config_without_its_folders_stops_before_any_work(tmp_path):
    from dit.config import ConfigError
    from dit.training import train

    cfg = load_config(CONFIGS / "wan2.1-t2v-1.3b.yaml", [f"data.shards={tmp_path}", f"train.output_dir={tmp_path}/r"])
    with pytest.raises(ConfigError, match=r"vae.pretrained is not set: vae.family=wan trains on a local diffusers"):
        train.main(cfg)
    assert not (tmp_path / "r").exists()
