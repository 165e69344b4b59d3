"""Z-Image (model.family=zimage, text.encoder=zimage, vae.family=flux): the text encoder gives ZImagePipeline's
prompt embeddings (each prompt's real tokens), and `load_pipeline` + `generate` (what `dit sample` runs) give its
images from the same prompts, noise, steps and guidance (its guidance_scale g is our cfg g + 1: it adds g times
cond - uncond to cond). Tiny random Qwen3, transformer and VAE folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_families import export_checkpoint
from tiny_zimage import WIDTH, save_tiny_zimage

from dit.config import ConfigError, load_config
from dit.models.text import build_text_encoder
from dit.pipeline import generate, load_pipeline

PROMPTS = ["a red circle on grey", "a blue &amp; white square in the corner " * 3]
LENGTH = 48  # Qwen3 tokens with the chat template (text.max_length; the pipeline's max_sequence_length)
STEPS, SHIFT = 3, 3.0  # Z-Image-Turbo's scheduler shift


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return save_tiny_zimage(tmp_path_factory.mktemp("zimage"))


def settings(f: dict, *more: str) -> list[str]:
    return ["model.family=zimage", f"model.pretrained={f['transformer']}", "vae.family=flux",
            f"vae.pretrained={f['vae']}", "text.encoder=zimage", f"text.path={f['qwen']}", f"text.max_length={LENGTH}",
            "diffusion.objective=flow", f"diffusion.shift={SHIFT}", "diffusion.flow_grid=steps", "data.frames=1",
            "data.height=64", "data.width=48", *more]


def reference_pipeline(f: dict):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import AutoTokenizer, Qwen3Model

    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT),
                          vae=AutoencoderKL.from_pretrained(f["vae"]),
                          text_encoder=Qwen3Model.from_pretrained(f["qwen"]),
                          tokenizer=AutoTokenizer.from_pretrained(f["root"] / "tokenizer"),
                          transformer=ZImageTransformer2DModel.from_pretrained(f["transformer"]))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def test_text_is_the_pipelines_prompt_embeddings(folders):
    enc = build_text_encoder(load_config(None, settings(folders)).text)
    states, mask = enc.encode(PROMPTS + [""])
    assert states.shape == (3, LENGTH, WIDTH)
    theirs = reference_pipeline(folders)._encode_prompt(list(PROMPTS + [""]), max_sequence_length=LENGTH)
    for s, m, want in zip(states, mask, theirs):  # each prompt's real tokens
        torch.testing.assert_close(s[m], want, atol=0, rtol=0)
    assert mask.sum(1).tolist()[2] < mask.sum(1).tolist()[0] < LENGTH == mask.sum(1).tolist()[1]  # (one truncated)


def export(tmp_path: Path, f: dict, *more: str) -> Path:
    return export_checkpoint(tmp_path, settings(f, *more), text_dim=WIDTH)


@pytest.mark.parametrize("guidance", [0.0, 3.0], ids=["turbo-no-cfg", "cfg"])
@torch.no_grad()
def test_generate_matches_zimagepipeline(folders, tmp_path, guidance):
    pipe = load_pipeline(export(tmp_path, folders))
    seed, shape = 3, (2, 4, 1, 8, 6)  # 64 x 48 images -> 8 x 6 latents -> 4 x 3 patches
    ours = generate(pipe, PROMPTS, frames=1, height=64, width=48, steps=STEPS, cfg=guidance + 1, seed=seed)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))  # generate's draw
    images = reference_pipeline(folders)(
        prompt=PROMPTS, latents=noise[:, :, 0], num_inference_steps=STEPS, guidance_scale=guidance, height=64,
        width=48, max_sequence_length=LENGTH, output_type="pt").images  # [B, 3, H, W] in [0, 1]
    assert images.shape == (2, 3, 64, 48) and images.std() > 0.01
    torch.testing.assert_close((ours[:, :, 0] + 1) / 2, images, atol=1e-4, rtol=0)


def test_config_errors_name_the_fix(folders, tmp_path):
    base = settings(folders)
    with pytest.raises(ConfigError, match="model.family=zimage takes text.encoder=zimage"):
        load_config(None, [s for s in base if not s.startswith("text.")])
    with pytest.raises(ConfigError, match="set vae.family=flux"):
        load_config(None, [*base, "vae.family=sd3"])
    with pytest.raises(ConfigError, match="Z-Image is an image model"):
        load_config(None, [*base, "data.frames=5"])
    with pytest.raises(ConfigError, match="zimage is Z-Image's text encoders: set model.family=zimage"):
        load_config(None, ["text.encoder=zimage", f"text.path={folders['qwen']}"])
    from dit.models.text import HFTextEncoder
    from dit.models.text_zimage import ZImageTextEncoder

    (tmp_path / "plain").mkdir()
    HFTextEncoder(folders["qwen"]).model.save_pretrained(tmp_path / "plain" / "text_encoder")
    import shutil

    shutil.copytree(folders["root"] / "tokenizer", tmp_path / "plain" / "tokenizer")
    config = tmp_path / "plain" / "tokenizer" / "tokenizer_config.json"
    config.write_text(config.read_text().replace('"chat_template"', '"no_template"'))
    with pytest.raises(ValueError, match="has no chat template"):
        ZImageTextEncoder(tmp_path / "plain" / "text_encoder")
