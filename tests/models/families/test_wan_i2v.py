"""Wan 2.1 image-to-video (a WanTransformer3DModel with image_dim; model.condition=first_frame and
model.image_encoder): `load_pipeline` + `sample_latents` + `decode_latents` give WanImageToVideoPipeline's frames
(without expand_timesteps) from the same image, latents and prompt embeddings; the condition and the CLIP states
are the pipeline's own."""

from __future__ import annotations

import argparse

import pytest
import torch
from einops import rearrange
from test_pipelines import CFG, STEPS, exported, latents, prompts
from tiny_clip import WIDTH, save_tiny_clip
from tiny_families import tiny_transformer

from dit.config import ConfigError, load_config
from dit.models.families import build_denoiser, check_fit
from dit.pipeline import decode_latents, image_condition, image_states, sample_latents
from dit.sample import first_frame

TEXT = 512  # Wan 2.1 I2V's attention counts this many text tokens


def i2v_transformer(folder, **overrides) -> None:
    """A tiny Wan 2.1 I2V transformer: 4 latent channels + a 4-channel mask + 4 of the image code; CLIP width 8."""
    tiny_transformer("wan", in_channels=12, out_channels=4, image_dim=WIDTH, added_kv_proj_dim=24,
                     **overrides).save_pretrained(folder)


def reference_pipeline(root, vae_folder):
    """WanImageToVideoPipeline of the tiny folders under ``root`` (shift 3)."""
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanImageToVideoPipeline,
        WanTransformer3DModel,
    )
    from transformers import CLIPImageProcessor, CLIPVisionModel

    ref = WanImageToVideoPipeline(
        tokenizer=None, text_encoder=None, vae=AutoencoderKLWan.from_pretrained(vae_folder),
        transformer=WanTransformer3DModel.from_pretrained(root / "transformer"),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        image_encoder=CLIPVisionModel.from_pretrained(root / "image_encoder"),
        image_processor=CLIPImageProcessor.from_pretrained(root / "image_processor"))
    ref.set_progress_bar_config(disable=True)
    return ref


@pytest.fixture
def wan_i2v(tmp_path):
    g = torch.Generator().manual_seed(5)
    stats = dict(latents_mean=torch.randn(4, generator=g).tolist(),
                 latents_std=(torch.rand(4, generator=g) + 0.5).tolist())
    i2v_transformer(tmp_path / "transformer")
    clip = save_tiny_clip(tmp_path)
    pipe, vae_folder = exported(tmp_path, "wan", tmp_path / "transformer",
                                ["diffusion.objective=flow", "diffusion.shift=3.0", "model.condition=first_frame",
                                 f"model.image_encoder={clip}"], (9, 32, 48), z_dim=4, **stats)
    return pipe, vae_folder, tmp_path


@torch.no_grad()
def test_wan21_i2v_matches_wanimagetovideopipeline(wan_i2v):
    from PIL import Image

    pipe, vae_folder, root = wan_i2v
    assert pipe.model.clip_image and not pipe.model.first_frame
    assert pipe.model.in_channels == 4 and pipe.model.condition_channels == 8
    pixels = torch.randint(0, 256, (1, 3, 32, 48), generator=torch.Generator().manual_seed(6), dtype=torch.uint8)
    noise = latents()
    cond, uncond = prompts(TEXT)
    z = sample_latents(pipe, noise, cond, uncond, steps=STEPS, cfg=CFG, image=pixels)
    assert (z - noise).abs().mean() > 0.1
    got = rearrange((decode_latents(pipe, z) + 1) / 2, "b c t h w -> b t c h w")

    ref = reference_pipeline(root, vae_folder)
    picture = Image.fromarray(pixels[0].permute(1, 2, 0).numpy())  # what a user gives the pipeline
    # the parts: the CLIP states and the condition (the mask, then the code of [image, zeros...])
    torch.testing.assert_close(image_states(pipe, pixels, 2), ref.encode_image(picture, "cpu").expand(2, -1, -1))
    processed = ref.video_processor.preprocess(picture, height=32, width=48)
    _, condition = ref.prepare_latents(processed, 2, 4, 32, 48, 9, torch.float32, "cpu", None, noise.clone())
    ours_condition = image_condition(pipe, pixels, noise.shape)
    assert condition.shape == ours_condition.shape == (2, 8, 3, 4, 6)
    torch.testing.assert_close(ours_condition, condition, atol=1e-5, rtol=1e-5)
    assert ours_condition[:, 4:, 1:].abs().mean() > 0.01  # the code of the grey frames is not zero

    frames = ref(image=picture, prompt_embeds=cond["text"], negative_prompt_embeds=uncond["text"],
                 latents=noise.clone(), num_inference_steps=STEPS, guidance_scale=CFG, height=32, width=48,
                 num_frames=9, output_type="pt").frames  # [B, T, 3, H, W] in [0, 1]
    assert frames.shape == (2, 9, 3, 32, 48)
    torch.testing.assert_close(got, frames, atol=1e-4, rtol=0)
    # the image matters: another one gives other latents
    other = sample_latents(pipe, noise, cond, uncond, steps=STEPS, cfg=CFG, image=255 - pixels)
    assert (other - z).abs().mean() > 1e-2


@torch.no_grad()
def test_clip_sees_the_image_as_given_as_in_the_pipeline(wan_i2v, tmp_path):
    """An image of another size than the sampling one: the VAE's condition takes it resized and cropped, and CLIP
    takes it as given (`dit sample --image` reads both), as WanImageToVideoPipeline gives CLIP the user's image."""
    from diffusers import WanImageToVideoPipeline
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionModel

    from dit.pipeline import read_image, read_pixels

    pipe, _, root = wan_i2v
    array = torch.randint(0, 256, (40, 70, 3), generator=torch.Generator().manual_seed(7), dtype=torch.uint8)
    Image.fromarray(array.numpy()).save(tmp_path / "first.png")
    given, resized = read_pixels(tmp_path / "first.png"), read_image(tmp_path / "first.png", 32, 48)
    assert given.shape == (1, 3, 40, 70) and resized.shape == (1, 3, 32, 48)
    fed = []
    hook = pipe.model.register_forward_pre_hook(lambda m, a, k: fed.append(k["image_states"]), with_kwargs=True)
    try:
        sample_latents(pipe, latents(), *prompts(TEXT), steps=1, cfg=CFG, image=resized, clip_image=given)
    finally:
        hook.remove()
    ref = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=None, scheduler=None,
                                  image_encoder=CLIPVisionModel.from_pretrained(root / "image_encoder"),
                                  image_processor=CLIPImageProcessor.from_pretrained(root / "image_processor"))
    want = ref.encode_image(Image.open(tmp_path / "first.png"), "cpu")  # [1, tokens, D]
    assert fed and fed[0].shape[0] == 2 * 2  # the batch [cond; uncond]
    torch.testing.assert_close(fed[0], want.expand(4, -1, -1), atol=1e-6, rtol=1e-5)
    assert (image_states(pipe, resized, 1) - want).abs().max() > 1e-3  # the resized image would differ


@torch.no_grad()
def test_wan21_i2v_needs_an_image_and_512_text_tokens(wan_i2v):
    pipe, _, _ = wan_i2v
    noise = latents()
    with pytest.raises(ValueError, match="--image"):
        sample_latents(pipe, noise, *prompts(TEXT), steps=1, cfg=CFG)
    with pytest.raises(ConfigError, match="no text-to-video mode: give the first frame with --image"):
        first_frame(argparse.Namespace(image=None), pipe.config, 32, 48)  # `dit sample` without --image
    pixels = torch.zeros(1, 3, 32, 48, dtype=torch.uint8)
    with pytest.raises(ValueError, match="text.max_length=512"):
        sample_latents(pipe, noise, *prompts(6), steps=1, cfg=CFG, image=pixels)


def test_wan21_i2v_config_errors(tmp_path):
    i2v_transformer(tmp_path / "transformer")
    clip = save_tiny_clip(tmp_path)
    base = ["model.family=wan", f"model.pretrained={tmp_path / 'transformer'}", "model.condition=first_frame",
            "diffusion.objective=flow"]
    cfg = load_config(None, [*base, f"model.image_encoder={clip}"])
    check_fit(cfg.model, 4, 16)  # fits: 4 latent channels, CLIP width 8
    with pytest.raises(ConfigError, match="set model.condition=first_frame"):
        check_fit(load_config(None, [*base[:2], base[3]]).model, 4, 16)
    # a CLIP of another width
    (tmp_path / "wide").mkdir()
    wide = save_tiny_clip(tmp_path / "wide")
    cfg_json = (wide / "config.json").read_text().replace(f'"hidden_size": {WIDTH}', '"hidden_size": 16')
    (wide / "config.json").write_text(cfg_json)
    with pytest.raises(ConfigError, match="width 8 .image_dim. but model.image_encoder"):
        build_denoiser(load_config(None, [*base, f"model.image_encoder={wide}"]).model, 4, 16)
    with pytest.raises(ConfigError, match="not a vision model folder.*point at its image_encoder"):
        load_config(None, [*base, f"model.image_encoder={tmp_path}"])
    with pytest.raises(ConfigError, match="model.image_encoder: is for a Wan 2.1"):
        load_config(None, [f"model.image_encoder={clip}"])
    (tmp_path / "t2v").mkdir()
    tiny_transformer("wan").save_pretrained(tmp_path / "t2v")
    with pytest.raises(ConfigError, match="not a Wan 2.1 or HunyuanVideo 1.5 image-to-video transformer"):
        check_fit(load_config(None, ["model.family=wan", f"model.pretrained={tmp_path / 't2v'}",
                                     "diffusion.objective=flow", f"model.image_encoder={clip}"]).model, 4, 16)



@torch.no_grad()
def test_wan21_flf2v_matches_wanimagetovideopipeline_with_a_last_image(tmp_path):
    """A Wan 2.1 FLF2V transformer (pos_embed_seq_len: the CLIP states of two frames) under model.condition=
    first_frame: the condition (the mask on the first and the last frame, the code of [first, grey..., last]), the
    CLIP states of both frames and the sampled frames equal WanImageToVideoPipeline's with last_image (1e-4)."""
    from PIL import Image

    g = torch.Generator().manual_seed(5)
    stats = dict(latents_mean=torch.randn(4, generator=g).tolist(),
                 latents_std=(torch.rand(4, generator=g) + 0.5).tolist())
    i2v_transformer(tmp_path / "transformer", pos_embed_seq_len=2 * 17)  # the tiny CLIP's 17 tokens, twice
    clip = save_tiny_clip(tmp_path)
    pipe, vae_folder = exported(tmp_path, "wan", tmp_path / "transformer",
                                ["diffusion.objective=flow", "diffusion.shift=3.0", "model.condition=first_frame",
                                 f"model.image_encoder={clip}"], (9, 32, 48), z_dim=4, **stats)
    assert pipe.model.last_frame and pipe.model.clip_image
    gen = torch.Generator().manual_seed(6)
    first, last = (torch.randint(0, 256, (1, 3, 32, 48), generator=gen, dtype=torch.uint8) for _ in range(2))
    noise = latents()
    cond, uncond = prompts(TEXT)
    z = sample_latents(pipe, noise, cond, uncond, steps=STEPS, cfg=CFG, image=first, last_image=last)
    got = rearrange((decode_latents(pipe, z) + 1) / 2, "b c t h w -> b t c h w")

    ref = reference_pipeline(tmp_path, vae_folder)
    pictures = [Image.fromarray(x[0].permute(1, 2, 0).numpy()) for x in (first, last)]
    states = ref.encode_image(pictures, "cpu")  # [2, 17, D]: first, last
    torch.testing.assert_close(image_states(pipe, first, 2, last=last), states.reshape(1, 34, -1).expand(2, -1, -1))
    processed = [ref.video_processor.preprocess(x, height=32, width=48) for x in pictures]
    _, condition = ref.prepare_latents(processed[0], 2, 4, 32, 48, 9, torch.float32, "cpu", None, noise.clone(),
                                       last_image=processed[1])
    ours_condition = image_condition(pipe, first, noise.shape, last=last)
    torch.testing.assert_close(ours_condition, condition, atol=1e-5, rtol=1e-5)
    assert ours_condition[:, 3, -1].eq(1).all() and not ours_condition[:, :3, -1].any()  # the last frame's mask

    frames = ref(image=pictures[0], last_image=pictures[1], prompt_embeds=cond["text"],
                 negative_prompt_embeds=uncond["text"], latents=noise.clone(), num_inference_steps=STEPS,
                 guidance_scale=CFG, height=32, width=48, num_frames=9, output_type="pt").frames
    torch.testing.assert_close(got, frames, atol=1e-4, rtol=0)
    other = sample_latents(pipe, noise, cond, uncond, steps=STEPS, cfg=CFG, image=first, last_image=255 - last)
    # the last frame matters (sampling is deterministic, so any change is its effect: 2.1e-3 mean here, where the
    # tiny random model's response to a whole other first image is ~1e-2)
    assert (other - z).abs().mean() > 1e-3
    with pytest.raises(ValueError, match="FLF2V checkpoint samples from a first and a last frame"):
        sample_latents(pipe, noise, cond, uncond, steps=1, cfg=CFG, image=first)
    # `dit sample`: both frames needed, and --last-image refused for any other model
    from dit.sample import last_frame

    with pytest.raises(ConfigError, match="FLF2V model: give the first frame with --image FILE and the last"):
        last_frame(argparse.Namespace(image="a.png", last_image=None), pipe.config, 32, 48)
    Image.fromarray(last[0].permute(1, 2, 0).numpy()).save(tmp_path / "last.png")
    read = last_frame(argparse.Namespace(image="a.png", last_image=str(tmp_path / "last.png")), pipe.config, 32, 48)
    torch.testing.assert_close(read, last.float() / 127.5 - 1, atol=1e-6, rtol=0)  # (the sampling size: as given)
    plain = {"dit": {"family": "wan", "diffusers": {"image_dim": WIDTH}}}
    with pytest.raises(ConfigError, match="--last-image: this checkpoint is not a Wan 2.1 FLF2V model"):
        last_frame(argparse.Namespace(image="a.png", last_image=str(tmp_path / "last.png")), plain, 32, 48)
