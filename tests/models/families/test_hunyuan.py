"""HunyuanVideo (model.family=hunyuan, text.encoder=hunyuan): the text encoders give HunyuanVideoPipeline's
encode_prompt, and `load_pipeline` + `generate` (what `dit sample` runs) give HunyuanVideoPipeline's frames from the
same prompts, latents, steps and guidance: the embedded guidance alone as the pipeline's default, and with true CFG
beside it. Tiny random Llama, CLIP, transformer and VAE folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_families import export_checkpoint
from tiny_hunyuan import POOLED, WIDTH, crop_start, save_tiny_text
from tiny_vaes import save_tiny_vae

from dit.config import ConfigError, load_config
from dit.models.families import build_denoiser
from dit.models.text import build_text_encoder
from dit.models.text_hunyuan import prompt_template, split_pooled
from dit.pipeline import generate, load_pipeline

PROMPTS = ["a red circle moving left", "a blue &amp; white square moving up " * 6]
LENGTH = 24  # Llama tokens after the template (text.max_length; the pipeline's max_sequence_length)
STEPS, SHIFT = 4, 7.0  # HunyuanVideo's scheduler shift


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_folder):
    """The tiny download: transformer/, vae/, text_encoder/ + tokenizer/, text_encoder_2/ + tokenizer_2/."""
    root = tmp_path_factory.mktemp("hunyuan")
    llama, clip = save_tiny_text(root)
    save_tiny_vae("hunyuan", root / "vae", seed=1)
    return dict(transformer=tiny_folder("hunyuan"), vae=root / "vae", llama=llama, clip=clip, root=root)


def settings(f: dict, *more: str) -> list[str]:
    from transformers import AutoTokenizer

    crop = crop_start(AutoTokenizer.from_pretrained(f["root"] / "tokenizer"))
    return ["model.family=hunyuan", f"model.pretrained={f['transformer']}", "vae.family=hunyuan",
            f"vae.pretrained={f['vae']}", "text.encoder=hunyuan", f"text.path={f['llama']}",
            f"text.path_2={f['clip']}", f"text.max_length={LENGTH}", f"text.crop_start={crop}",
            "diffusion.objective=flow", f"diffusion.shift={SHIFT}", "diffusion.flow_grid=steps", "data.frames=9",
            "data.height=32", "data.width=48", *more]


def reference_pipeline(f: dict):
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from transformers import AutoTokenizer, CLIPTextModel, LlamaModel

    pipe = HunyuanVideoPipeline(
        text_encoder=LlamaModel.from_pretrained(f["llama"]), tokenizer=AutoTokenizer.from_pretrained(
            f["root"] / "tokenizer"), text_encoder_2=CLIPTextModel.from_pretrained(f["clip"]),
        tokenizer_2=AutoTokenizer.from_pretrained(f["root"] / "tokenizer_2"),
        transformer=HunyuanVideoTransformer3DModel.from_pretrained(f["transformer"]),
        vae=AutoencoderKLHunyuanVideo.from_pretrained(f["vae"]), scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def template(f: dict) -> dict:
    from transformers import AutoTokenizer

    return {"template": prompt_template(), "crop_start": crop_start(AutoTokenizer.from_pretrained(
        f["root"] / "tokenizer"))}


@torch.no_grad()
def test_text_is_the_pipelines_encode_prompt(folders):
    cfg = load_config(None, settings(folders))
    enc = build_text_encoder(cfg.text)
    assert enc.dim == WIDTH and enc.pooled_dim == POOLED
    states, mask = enc.encode(PROMPTS + [""])  # [3, 25, 16]: the pooled row, then the Llama states
    assert states.shape == (3, 1 + LENGTH, WIDTH) and mask[:, 0].all()
    embeds, pooled, attention = reference_pipeline(folders).encode_prompt(
        PROMPTS + [""], prompt_template=template(folders), device=torch.device("cpu"), max_sequence_length=LENGTH)
    text, text_mask, ours_pooled = split_pooled(states, mask, POOLED)
    torch.testing.assert_close(text, embeds, atol=0, rtol=0)
    assert torch.equal(text_mask, attention.bool())
    torch.testing.assert_close(ours_pooled, pooled, atol=0, rtol=0)
    assert torch.count_nonzero(states[:, 0, POOLED:]) == 0  # the row's rest is zeros
    assert text_mask.sum(1).tolist()[2] < text_mask.sum(1).tolist()[0] < LENGTH == text_mask.sum(1).tolist()[1]


def export(tmp_path: Path, f: dict, *more: str) -> Path:
    return export_checkpoint(tmp_path, settings(f, *more), text_dim=WIDTH)


@pytest.mark.parametrize("true_cfg", [1.0, 3.0], ids=["embedded-guidance", "and-true-cfg"])
@torch.no_grad()
def test_generate_matches_hunyuanvideopipeline(folders, tmp_path, true_cfg):
    pipe = load_pipeline(export(tmp_path, folders))
    assert pipe.model.distilled and pipe.model.guidance == 1.0  # trained at 1.0; sampled at the pipeline's 6.0
    seed, shape = 3, (2, 4, 3, 4, 6)  # 9 x 32 x 48 frames -> 3 x 4 x 6 latents
    ours = generate(pipe, PROMPTS, frames=9, height=32, width=48, steps=STEPS, cfg=true_cfg, seed=seed)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))  # generate's draw
    negative = {"negative_prompt": "", "true_cfg_scale": true_cfg} if true_cfg > 1 else {}
    frames = reference_pipeline(folders)(
        prompt=PROMPTS, prompt_template=template(folders), latents=noise, num_inference_steps=STEPS,
        guidance_scale=6.0, height=32, width=48, num_frames=9, max_sequence_length=LENGTH, output_type="pt",
        **negative).frames  # [B, T, 3, H, W] in [0, 1]
    assert frames.shape == (2, 9, 3, 32, 48) and frames.std() > 0.01
    torch.testing.assert_close((ours.permute(0, 2, 1, 3, 4) + 1) / 2, frames, atol=1e-4, rtol=0)
    other = generate(pipe, PROMPTS, frames=9, height=32, width=48, steps=STEPS, cfg=true_cfg, seed=seed,
                     guidance=1.0)
    assert (other - ours).abs().max() > 1e-3  # the embedded scale reaches the transformer


def test_config_errors_name_the_fix(folders, tmp_path):
    base = settings(folders)
    no_pair = [s for s in base if not s.startswith("text.")]
    with pytest.raises(ConfigError, match="model.family=hunyuan takes text.encoder=hunyuan"):
        load_config(None, no_pair)
    with pytest.raises(ConfigError, match="text.path_2"):
        load_config(None, [s for s in base if not s.startswith("text.path_2")])
    from dit.models.text import text_width

    missing = load_config(None, [*base, f"text.path_2={tmp_path / 'text_encoder_2'}"])
    with pytest.raises(FileNotFoundError, match="text.path_2 .* has no config.json"):  # (dit train: before any work)
        text_width(missing.text)
    with pytest.raises(ConfigError, match="set model.family=hunyuan"):
        load_config(None, ["text.encoder=hunyuan", "text.path=/x", "text.path_2=/y"])
    with pytest.raises(ConfigError, match="sample.guidance.*HunyuanVideo"):
        load_config(None, ["sample.guidance=6"])
    with pytest.raises(ConfigError, match="objective=flow"):
        load_config(None, [s for s in base if "objective" not in s])
    from tiny_families import tiny_transformer

    i2v = tmp_path / "i2v"
    tiny_transformer("hunyuan", in_channels=9, image_condition_type="latent_concat").save_pretrained(i2v)
    cfg = load_config(None, [f"model.pretrained={i2v}" if s.startswith("model.pretrained") else s for s in base])
    with pytest.raises(ConfigError, match="HunyuanVideo image-to-video transformer .*not supported"):
        build_denoiser(cfg.model, in_channels=4, text_dim=WIDTH, load_weights=False)


@torch.no_grad()
def test_guidance_of_a_model_without_it_is_refused(folders, tmp_path):
    """A HunyuanVideo transformer without guidance_embeds takes no embedded scale; other families take none."""
    from tiny_families import tiny_transformer

    plain = tmp_path / "plain"
    tiny_transformer("hunyuan", guidance_embeds=False).save_pretrained(plain)
    cfg = load_config(None, [f"model.pretrained={plain}" if s.startswith("model.pretrained") else s
                             for s in settings(folders)])
    model = build_denoiser(cfg.model, in_channels=4, text_dim=WIDTH)
    assert not model.distilled
    x, text = torch.randn(1, 4, 3, 4, 6), torch.randn(1, LENGTH + 1, WIDTH)
    mask = torch.ones(1, LENGTH + 1, dtype=torch.bool)
    assert model(x, torch.tensor([500.0]), text, mask).shape == x.shape
    with pytest.raises(ValueError, match="no embedded guidance"):
        model(x, torch.tensor([500.0]), text, mask, guidance=6.0)


@torch.no_grad()
def test_skyreels_image_to_video_matches_its_pipeline(folders, tmp_path, monkeypatch):
    """A SkyReels V1 transformer (HunyuanVideo's with in_channels 2C: the first frame's latents beside the noisy
    ones) under model.condition=first_frame gives HunyuanSkyreelsImageToVideoPipeline's frames with its defaults:
    true CFG 6 with "" (sample.cfg) and embedded guidance 1 (sample.guidance). The pipeline samples the image's
    posterior; it is given the mode here, as ours takes it."""
    import diffusers.pipelines.hunyuan_video.pipeline_hunyuan_skyreels_image2video as skyreels
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanSkyreelsImageToVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from tiny_families import tiny_transformer

    i2v = tmp_path / "skyreels"
    tiny_transformer("hunyuan", in_channels=8, out_channels=4).save_pretrained(i2v)
    ckpt = export(tmp_path, {**folders, "transformer": i2v}, "model.condition=first_frame")
    pipe = load_pipeline(ckpt)
    assert pipe.model.condition_channels == 4 and pipe.model.in_channels == 4
    image = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(6)) * 2 - 1  # [-1, 1]
    seed = 3
    ours = generate(pipe, PROMPTS, frames=9, height=32, width=48, steps=STEPS, cfg=6.0, guidance=1.0, seed=seed,
                    image=image)
    noise = torch.randn((2, 4, 3, 4, 6), generator=torch.Generator().manual_seed(seed))

    monkeypatch.setattr(skyreels, "retrieve_latents", lambda out, generator=None: out.latent_dist.mode())
    parts = reference_pipeline(folders).components
    ref = HunyuanSkyreelsImageToVideoPipeline(
        **{k: parts[k] for k in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")},
        transformer=HunyuanVideoTransformer3DModel.from_pretrained(i2v),
        vae=AutoencoderKLHunyuanVideo.from_pretrained(folders["vae"]),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT))
    ref.set_progress_bar_config(disable=True)
    frames = ref(image=((image + 1) / 2).expand(2, -1, -1, -1), prompt=PROMPTS, negative_prompt="",
                 prompt_template=template(folders),
                 latents=noise, num_inference_steps=STEPS, height=32, width=48, num_frames=9,
                 max_sequence_length=LENGTH, output_type="pt").frames  # true_cfg_scale 6, guidance_scale 1
    assert frames.shape == (2, 9, 3, 32, 48)
    torch.testing.assert_close((ours.permute(0, 2, 1, 3, 4) + 1) / 2, frames, atol=1e-4, rtol=0)
    text_only = generate(pipe, PROMPTS, frames=9, height=32, width=48, steps=STEPS, cfg=6.0, guidance=1.0, seed=seed)
    assert (text_only - ours).abs().mean() > 1e-2  # the image matters
