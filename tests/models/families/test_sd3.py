"""Stable Diffusion 3 / 3.5 (model.family=sd3, text.encoder=sd3, vae.family=sd3): the three text encoders give
StableDiffusion3Pipeline's encode_prompt, and `load_pipeline` + `generate` (what `dit sample` runs) give its images
from the same prompts, noise, steps and guidance (CFG against "", as the pipeline's negative prompt). Tiny random
CLIP-L, CLIP-G, T5, transformer (SD3.5's form: dual attention, QK norm) and VAE folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_families import export_checkpoint
from tiny_sd3 import POOLED, WIDTH, save_tiny_sd3

from dit.config import ConfigError, load_config
from dit.models.families import build_denoiser
from dit.models.text import build_text_encoder
from dit.models.text_pooled import split_pooled
from dit.models.vae import load_vae_from_config
from dit.pipeline import generate, load_pipeline

PROMPTS = ["a red circle on grey", "a blue &amp; white square in the corner " * 6]
LENGTH = 24  # T5 tokens (text.max_length; the pipeline's max_sequence_length)
STEPS, SHIFT = 3, 3.0  # SD3's scheduler shift


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return save_tiny_sd3(tmp_path_factory.mktemp("sd3"))


def settings(f: dict, *more: str) -> list[str]:
    return ["model.family=sd3", f"model.pretrained={f['transformer']}", "vae.family=sd3",
            f"vae.pretrained={f['vae']}", "text.encoder=sd3", f"text.path={f['t5']}", f"text.path_2={f['clip_l']}",
            f"text.path_3={f['clip_g']}", f"text.max_length={LENGTH}", "text.padding=unmasked",
            "diffusion.objective=flow", f"diffusion.shift={SHIFT}", "data.frames=1", "data.height=64",
            "data.width=48", *more]


def reference_pipeline(f: dict):
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT), vae=AutoencoderKL.from_pretrained(f["vae"]),
        text_encoder=CLIPTextModelWithProjection.from_pretrained(f["clip_l"]),
        tokenizer=AutoTokenizer.from_pretrained(f["root"] / "tokenizer"),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(f["clip_g"]),
        tokenizer_2=AutoTokenizer.from_pretrained(f["root"] / "tokenizer_2"),
        text_encoder_3=T5EncoderModel.from_pretrained(f["t5"]),
        tokenizer_3=AutoTokenizer.from_pretrained(f["root"] / "tokenizer_3"),
        transformer=SD3Transformer2DModel.from_pretrained(f["transformer"]))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def test_text_is_the_pipelines_encode_prompt(folders):
    enc = build_text_encoder(load_config(None, settings(folders)).text)
    assert enc.dim == WIDTH and enc.pooled_dim == POOLED
    states, mask = enc.encode(PROMPTS + [""])  # [3, 1 + 77 + 24, 16]: the pooled row, CLIP-L | CLIP-G, T5
    assert states.shape == (3, 1 + 77 + LENGTH, WIDTH) and mask[:, 0].all()
    embeds, _, pooled, _ = reference_pipeline(folders).encode_prompt(
        PROMPTS + [""], prompt_2=None, prompt_3=None, do_classifier_free_guidance=False, max_sequence_length=LENGTH)
    text, text_mask, ours_pooled = split_pooled(states, mask, POOLED)
    torch.testing.assert_close(text, embeds, atol=0, rtol=0)  # every state, the padding's too, as the pipeline
    torch.testing.assert_close(ours_pooled, pooled, atol=0, rtol=0)
    assert text_mask[:, :77].sum(1).tolist()[2] < text_mask[:, :77].sum(1).tolist()[0] < 77  # CLIP's real tokens
    assert text[2, 76].abs().sum() > 0 and text[2, -1].abs().sum() > 0  # padding states are the encoders', not 0


@torch.no_grad()
def test_image_vae_normalises_as_the_pipeline(folders):
    cfg = load_config(None, settings(folders))
    vae = load_vae_from_config(cfg.vae)
    assert (vae.latent_channels, vae.temporal_compression, vae.spatial_compression) == (4, 1, 8)
    z = torch.randn(1, 4, 1, 8, 6)
    torch.testing.assert_close(vae.normalize(z), (z - 0.06) * 1.5, atol=1e-6, rtol=0)


def export(tmp_path: Path, f: dict, *more: str) -> Path:
    return export_checkpoint(tmp_path, settings(f, *more), text_dim=WIDTH)


@torch.no_grad()
def test_generate_matches_stablediffusion3pipeline(folders, tmp_path):
    pipe = load_pipeline(export(tmp_path, folders))
    seed, shape = 3, (2, 4, 1, 8, 6)  # 64 x 48 images -> 8 x 6 latents -> 4 x 3 patches
    ours = generate(pipe, PROMPTS, frames=1, height=64, width=48, steps=STEPS, cfg=5.0, seed=seed)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))  # generate's draw
    images = reference_pipeline(folders)(
        prompt=PROMPTS, negative_prompt="", latents=noise[:, :, 0], num_inference_steps=STEPS, guidance_scale=5.0,
        height=64, width=48, max_sequence_length=LENGTH, output_type="pt").images  # [B, 3, H, W] in [0, 1]
    assert images.shape == (2, 3, 64, 48) and images.std() > 0.01
    assert ours.shape == (2, 3, 1, 64, 48)
    torch.testing.assert_close((ours[:, :, 0] + 1) / 2, images, atol=1e-4, rtol=0)


def test_config_errors_name_the_fix(folders, tmp_path):
    base = settings(folders)
    with pytest.raises(ConfigError, match="model.family=sd3 takes text.encoder=sd3"):
        load_config(None, [s for s in base if not s.startswith("text.")])
    with pytest.raises(ConfigError, match="text.path_3.*CLIP-G"):
        load_config(None, [s for s in base if not s.startswith("text.path_3")])
    with pytest.raises(ConfigError, match="text.path_3: is for text.encoder=sd3"):
        load_config(None, ["text.path_3=/x"])
    with pytest.raises(ConfigError, match="vae.family=sd3"):
        load_config(None, [*base, "vae.family=flux"])
    with pytest.raises(ConfigError, match="data.frames.*Stable Diffusion 3 is an image model"):
        load_config(None, [*base, "data.frames=5"])
    with pytest.raises(ConfigError, match="sample.guidance"):
        load_config(None, [*base, "sample.guidance=3"])
    from dit.models.text import text_width

    missing = load_config(None, [*base, f"text.path_3={tmp_path / 'text_encoder_2'}"])
    with pytest.raises(FileNotFoundError, match="text.path_3 .* has no config.json.*CLIP-G"):
        text_width(missing.text)
    model = build_denoiser(load_config(None, base).model, in_channels=4, text_dim=WIDTH)
    text, mask = torch.randn(1, 5, WIDTH), torch.ones(1, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="larger than this SD3 transformer's position table"):
        model(torch.randn(1, 4, 1, 40, 8), torch.tensor([500.0]), text, mask)  # 20 patches > pos_embed_max_size 16
