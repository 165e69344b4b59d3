"""Qwen-Image (model.family=qwenimage, text.encoder=qwenimage, vae.family=qwenimage): the text encoder gives
QwenImagePipeline's prompt embeddings, its VAE normalises as the pipeline, and `load_pipeline` + `generate` (what
`dit sample` runs) give its images from the same prompts, noise, steps and true CFG (with its per-token rescaling,
against ""). Tiny random Qwen2.5-VL, transformer and VAE folders."""

from __future__ import annotations

import pytest
import torch
from tiny_families import export_checkpoint
from tiny_qwenimage import WIDTH, crop_start, save_tiny_qwenimage

from dit.config import ConfigError, load_config
from dit.models.text import build_text_encoder
from dit.models.vae import load_vae_from_config
from dit.pipeline import generate, load_pipeline

PROMPTS = ["a red circle on grey", "a blue &amp; white square in the corner " * 4]
LENGTH = 24  # Qwen2.5-VL tokens after the template (text.max_length; the pipeline's max_sequence_length)
STEPS = 3


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from transformers import AutoTokenizer

    f = save_tiny_qwenimage(tmp_path_factory.mktemp("qwenimage"))
    f["crop"] = crop_start(AutoTokenizer.from_pretrained(f["root"] / "tokenizer"))
    return f


def settings(f: dict, *more: str) -> list[str]:
    return ["model.family=qwenimage", f"model.pretrained={f['transformer']}", "vae.family=qwenimage",
            f"vae.pretrained={f['vae']}", "text.encoder=qwenimage", f"text.path={f['qwen']}",
            f"text.max_length={LENGTH}", f"text.crop_start={f['crop']}", "diffusion.objective=flow",
            "diffusion.dynamic_shift=true", "diffusion.flow_grid=steps", "data.frames=1", "data.height=64",
            "data.width=48", *more]


def reference_pipeline(f: dict):
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = QwenImagePipeline(scheduler=scheduler, vae=AutoencoderKLQwenImage.from_pretrained(f["vae"]),
                             text_encoder=Qwen2_5_VLForConditionalGeneration.from_pretrained(f["qwen"]),
                             tokenizer=AutoTokenizer.from_pretrained(f["root"] / "tokenizer"),
                             transformer=QwenImageTransformer2DModel.from_pretrained(f["transformer"]))
    pipe.prompt_template_encode_start_idx = f["crop"]  # (34 is the released tokenizer's count)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def test_text_is_the_pipelines_prompt_embeddings(folders):
    enc = build_text_encoder(load_config(None, settings(folders)).text)
    states, mask = enc.encode(PROMPTS + [""])
    assert states.shape == (3, LENGTH, WIDTH)
    embeds, embeds_mask = reference_pipeline(folders).encode_prompt(PROMPTS + [""], max_sequence_length=LENGTH)
    n = embeds.shape[1]  # (the pipeline pads to the longest prompt; ours to text.max_length)
    torch.testing.assert_close(states[:, :n], embeds, atol=1e-6, rtol=0)
    assert torch.equal(mask[:, :n], embeds_mask.bool()) and not mask[:, n:].any()
    assert mask.sum(1).tolist()[2] < mask.sum(1).tolist()[0] < LENGTH == mask.sum(1).tolist()[1]


@torch.no_grad()
def test_vae_normalises_as_the_pipeline(folders):
    vae = load_vae_from_config(load_config(None, settings(folders)).vae)
    assert (vae.latent_channels, vae.temporal_compression, vae.spatial_compression) == (4, 4, 8)
    z = torch.randn(1, 4, 1, 8, 6)
    mean, std = torch.tensor([0.1, -0.2, 0.3, 0.0]).view(1, 4, 1, 1, 1), torch.tensor([1.5, 0.8, 2.0, 1.1])
    torch.testing.assert_close(vae.denormalize(z), z * std.view(1, 4, 1, 1, 1) + mean, atol=1e-6, rtol=0)


@pytest.mark.parametrize("cfg", [1.0, 4.0], ids=["no-cfg", "true-cfg"])
@torch.no_grad()
def test_generate_matches_qwenimagepipeline(folders, tmp_path, cfg):
    from diffusers import QwenImagePipeline

    pipe = load_pipeline(export_checkpoint(tmp_path, settings(folders), text_dim=WIDTH))
    seed, shape = 3, (2, 4, 1, 8, 6)  # 64 x 48 images -> 8 x 6 latents -> 4 x 3 packed tokens
    ours = generate(pipe, PROMPTS, frames=1, height=64, width=48, steps=STEPS, cfg=cfg, seed=seed)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))  # generate's draw
    negative = {"negative_prompt": ""} if cfg > 1 else {}
    images = reference_pipeline(folders)(
        prompt=PROMPTS, latents=QwenImagePipeline._pack_latents(noise[:, :, 0], 2, 4, 8, 6),
        num_inference_steps=STEPS, true_cfg_scale=cfg, height=64, width=48, max_sequence_length=LENGTH,
        output_type="pt", **negative).images  # [B, 3, H, W] in [0, 1]
    assert images.shape == (2, 3, 64, 48) and images.std() > 0.01
    torch.testing.assert_close((ours[:, :, 0] + 1) / 2, images, atol=1e-4, rtol=0)


def test_config_errors_name_the_fix(folders):
    base = settings(folders)
    with pytest.raises(ConfigError, match="model.family=qwenimage takes text.encoder=qwenimage"):
        load_config(None, [s for s in base if not s.startswith("text.")])
    with pytest.raises(ConfigError, match="set vae.family=qwenimage"):
        load_config(None, [*base, "vae.family=flux"])
    with pytest.raises(ConfigError, match="Qwen-Image is an image model"):
        load_config(None, [*base, "data.frames=5"])
    from dit.models.text_qwenimage import QwenImageTextEncoder

    with pytest.raises(ValueError, match="text.crop_start=500 cuts the whole template"):
        QwenImageTextEncoder(folders["qwen"], crop_start=500)
