"""FLUX.1 (model.family=flux, text.encoder=flux, vae.family=flux): the text encoders give FluxPipeline's
encode_prompt, the image VAE codes as diffusers' AutoencoderKL, and `load_pipeline` + `generate` (what `dit sample`
runs) give FluxPipeline's images from the same prompts, noise, steps and guidance: the embedded guidance alone, as the
pipeline's default, and with true CFG beside it. Tiny random CLIP, T5, transformer and VAE folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_families import export_checkpoint
from tiny_flux import POOLED, WIDTH, save_tiny_flux

from dit.config import ConfigError, load_config
from dit.models.families import build_denoiser
from dit.models.text import build_text_encoder
from dit.models.text_pooled import split_pooled
from dit.models.vae import load_vae_from_config
from dit.pipeline import generate, load_pipeline

PROMPTS = ["a red circle on grey", "a blue &amp; white square in the corner " * 6]
LENGTH = 24  # T5 tokens (text.max_length; the pipeline's max_sequence_length)
STEPS = 3


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return save_tiny_flux(tmp_path_factory.mktemp("flux"))


def settings(f: dict, *more: str) -> list[str]:
    return ["model.family=flux", f"model.pretrained={f['transformer']}", "vae.family=flux",
            f"vae.pretrained={f['vae']}", "text.encoder=flux", f"text.path={f['t5']}", f"text.path_2={f['clip']}",
            f"text.max_length={LENGTH}", "text.padding=unmasked", "diffusion.objective=flow",
            "diffusion.dynamic_shift=true", "diffusion.flow_grid=steps", "data.frames=1", "data.height=64",
            "data.width=48", *more]


def reference_pipeline(f: dict):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096, shift=3.0)
    pipe = FluxPipeline(scheduler=scheduler, vae=AutoencoderKL.from_pretrained(f["vae"]),
                        text_encoder=CLIPTextModel.from_pretrained(f["clip"]),
                        tokenizer=AutoTokenizer.from_pretrained(f["root"] / "tokenizer"),
                        text_encoder_2=T5EncoderModel.from_pretrained(f["t5"]),
                        tokenizer_2=AutoTokenizer.from_pretrained(f["root"] / "tokenizer_2"),
                        transformer=FluxTransformer2DModel.from_pretrained(f["transformer"]))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def test_text_is_the_pipelines_encode_prompt(folders):
    enc = build_text_encoder(load_config(None, settings(folders)).text)
    assert enc.dim == WIDTH and enc.pooled_dim == POOLED
    states, mask = enc.encode(PROMPTS + [""])  # [3, 25, 16]: the pooled row, then the T5 states
    assert states.shape == (3, 1 + LENGTH, WIDTH) and mask[:, 0].all()
    embeds, pooled, _ = reference_pipeline(folders).encode_prompt(PROMPTS + [""], prompt_2=None,
                                                                  max_sequence_length=LENGTH)
    text, text_mask, ours_pooled = split_pooled(states, mask, POOLED)
    torch.testing.assert_close(text, embeds, atol=0, rtol=0)  # T5 over the padding too, as the pipeline
    torch.testing.assert_close(ours_pooled, pooled, atol=0, rtol=0)
    assert torch.count_nonzero(states[:, 0, POOLED:]) == 0  # the row's rest is zeros
    assert text_mask.sum(1).tolist()[2] < text_mask.sum(1).tolist()[0] < LENGTH == text_mask.sum(1).tolist()[1]
    assert text[2, -1].abs().sum() > 0  # the padding's states are T5's, not zeros


@torch.no_grad()
def test_image_vae_codes_as_autoencoderkl(folders):
    """vae.family=flux: each frame through diffusers' AutoencoderKL; normalize is FluxPipeline's (z - shift) x scale."""
    from diffusers import AutoencoderKL

    cfg = load_config(None, settings(folders))
    vae, ref = load_vae_from_config(cfg.vae), AutoencoderKL.from_pretrained(folders["vae"]).requires_grad_(False)
    assert (vae.latent_channels, vae.temporal_compression, vae.spatial_compression) == (4, 1, 8)
    x = torch.rand(2, 3, 2, 64, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1  # two frames each
    post = vae.encode(x)
    assert post.mean.shape == (2, 4, 2, 8, 6)
    for f in range(2):
        dist = ref.encode(x[:, :, f]).latent_dist
        torch.testing.assert_close(post.mean[:, :, f], dist.mean, atol=1e-6, rtol=0)
        torch.testing.assert_close(post.logvar[:, :, f], dist.logvar, atol=1e-6, rtol=0)
    z = post.mean
    torch.testing.assert_close(vae.normalize(z), (z - 0.12) * 0.4, atol=1e-6, rtol=0)
    torch.testing.assert_close(vae.denormalize(vae.normalize(z)), z, atol=1e-6, rtol=0)
    decoded = vae.decode(z)
    assert decoded.shape == x.shape
    torch.testing.assert_close(decoded[:, :, 1], ref.decode(z[:, :, 1]).sample, atol=1e-5, rtol=0)
    torch.testing.assert_close(vae.decode(z, chunk_size=1), decoded, atol=1e-5, rtol=0)


def export(tmp_path: Path, f: dict, *more: str) -> Path:
    return export_checkpoint(tmp_path, settings(f, *more), text_dim=WIDTH)


@pytest.mark.parametrize("true_cfg", [1.0, 3.0], ids=["embedded-guidance", "and-true-cfg"])
@torch.no_grad()
def test_generate_matches_fluxpipeline(folders, tmp_path, true_cfg):
    from diffusers import FluxPipeline

    pipe = load_pipeline(export(tmp_path, folders))
    assert pipe.model.distilled and pipe.model.guidance == 1.0  # trained at 1.0; sampled at the pipeline's 3.5
    seed, shape = 3, (2, 4, 1, 8, 6)  # 64 x 48 images -> 8 x 6 latents -> 4 x 3 packed tokens
    ours = generate(pipe, PROMPTS, frames=1, height=64, width=48, steps=STEPS, cfg=true_cfg, seed=seed)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))  # generate's draw
    negative = {"negative_prompt": "", "true_cfg_scale": true_cfg} if true_cfg > 1 else {}
    images = reference_pipeline(folders)(
        prompt=PROMPTS, latents=FluxPipeline._pack_latents(noise[:, :, 0], 2, 4, 8, 6), num_inference_steps=STEPS,
        guidance_scale=3.5, height=64, width=48, max_sequence_length=LENGTH, output_type="pt",
        **negative).images  # [B, 3, H, W] in [0, 1]
    assert images.shape == (2, 3, 64, 48) and images.std() > 0.01
    assert ours.shape == (2, 3, 1, 64, 48)
    torch.testing.assert_close((ours[:, :, 0] + 1) / 2, images, atol=1e-4, rtol=0)
    other = generate(pipe, PROMPTS, frames=1, height=64, width=48, steps=STEPS, cfg=true_cfg, seed=seed,
                     guidance=1.0)
    assert (other - ours).abs().max() > 1e-3  # the embedded scale reaches the transformer


def test_config_errors_name_the_fix(folders, tmp_path):
    base = settings(folders)
    with pytest.raises(ConfigError, match="model.family=flux takes text.encoder=flux"):
        load_config(None, [s for s in base if not s.startswith("text.")])
    with pytest.raises(ConfigError, match="set model.family=flux"):
        load_config(None, ["text.encoder=flux", "text.path=/x", "text.path_2=/y", "text.padding=unmasked"])
    with pytest.raises(ConfigError, match="text.padding=unmasked"):
        load_config(None, [s for s in base if s != "text.padding=unmasked"])
    with pytest.raises(ConfigError, match="data.frames.*image model"):
        load_config(None, [*base, "data.frames=9"])
    with pytest.raises(ConfigError, match="vae.family=flux"):
        load_config(None, [*base, "vae.family=ours", "vae.pretrained=null"])
    with pytest.raises(ConfigError, match="objective=flow"):
        load_config(None, [s for s in base if "objective" not in s and "shift" not in s and "grid" not in s])
    with pytest.raises(ConfigError, match="model.condition"):
        load_config(None, [*base, "model.condition=first_frame"])
    from dit.models.text import text_width

    missing = load_config(None, [*base, f"text.path_2={tmp_path / 'text_encoder'}"])
    with pytest.raises(FileNotFoundError, match="text.path_2 .* has no config.json.*FLUX.1"):
        text_width(missing.text)
    model = build_denoiser(load_config(None, base).model, in_channels=4, text_dim=WIDTH)
    x = torch.randn(1, 4, 3, 8, 6)
    with pytest.raises(ValueError, match="image model: latents of one frame, got 3"):
        model(x, torch.tensor([500.0]), torch.randn(1, 5, WIDTH), torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ConfigError, match="takes 4 latent channels .*in_channels 16: 4 positions per token.* 16"):
        build_denoiser(load_config(None, base).model, in_channels=16, text_dim=WIDTH, load_weights=False)
