"""End-to-end agreement with diffusers' own pipelines. A tiny random transformer and VAE of each family are saved
into local folders, a checkpoint of ours is exported from them (the family's diffusion settings in its config), and
`load_pipeline` + `sample_latents` + `decode_latents` (what `dit sample` runs, given starting latents and prompt
embeddings) give the same frames as WanPipeline, LTXPipeline and CogVideoXPipeline (output_type="pt") from the same
latents, embeddings, steps and guidance."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from einops import rearrange
from tiny_vaes import save_tiny_vae

from dit.config import load_config
from dit.export import write_export
from dit.models.families import build_denoiser
from dit.models.text import NoText
from dit.pipeline import Pipeline, decode_latents, generate, load_pipeline, sample_latents

STEPS, CFG = 5, 4.0
# LTX-Video's scheduler (Lightricks/LTX-Video scheduler_config.json), and the same as diffusion.* settings of ours
LTX_SCHEDULER = dict(use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05, base_image_seq_len=1024,
                     max_image_seq_len=4096, shift_terminal=0.1)
LTX_SETTINGS = ["diffusion.objective=flow", "diffusion.dynamic_shift=true", "diffusion.base_shift=0.95",
                "diffusion.max_shift=2.05", "diffusion.base_seq_len=1024", "diffusion.max_seq_len=4096",
                "diffusion.shift_terminal=0.1", "diffusion.flow_grid=steps"]


def prompts(length: int = 6, seed: int = 3) -> tuple[dict, dict]:
    """cond / uncond text as a T5 path gives them: states, zeros after each prompt, and the mask; the empty
    prompt keeps one token."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(length)[None] < torch.tensor([[length], [length // 2]]).T.reshape(2, 1)  # [2, L]
    neg_mask = torch.arange(length)[None].expand(2, -1) < 1
    text = torch.randn(2, length, 16, generator=g) * mask[..., None]
    neg = torch.randn(2, length, 16, generator=g) * neg_mask[..., None]
    return dict(text=text, text_mask=mask), dict(text=neg, text_mask=neg_mask)


def latents(shape=(2, 4, 3, 4, 6), seed: int = 4) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))  # [B, C, t, h, w]


def exported(tmp_path: Path, family: str, transformer: Path, settings: list[str], size: tuple[int, int, int],
             **vae_overrides) -> tuple[Pipeline, Path]:
    """A checkpoint of ours made from the family's folders (a tiny 4-channel VAE saved beside), loaded back as
    `dit sample` loads it; returns the pipeline and the VAE folder (for diffusers' pipeline)."""
    vae_folder = tmp_path / "vae"
    save_tiny_vae(family, vae_folder, seed=1, **vae_overrides)
    frames, height, width = size
    cfg = load_config(None, [f"model.family={family}", f"model.pretrained={transformer}", f"vae.family={family}",
                             f"vae.pretrained={vae_folder}", "text.encoder=none", f"data.frames={frames}",
                             f"data.height={height}", f"data.width={width}", *settings])
    model = build_denoiser(cfg.model, in_channels=4, text_dim=16)
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000001"
    ckpt.mkdir(parents=True)
    write_export(ckpt, weights=model.state_dict(), config={"dit": model.config, "experiment": cfg.to_dict()},
                 vae=cfg.vae)
    return load_pipeline(ckpt, text=NoText(16)), vae_folder


def ours(pipe: Pipeline, noise: torch.Tensor) -> torch.Tensor:
    """Our frames [B, T, 3, H, W] in [0, 1] (diffusers' "pt" layout and range)."""
    cond, uncond = prompts()
    z = sample_latents(pipe, noise, cond, uncond, steps=STEPS, cfg=CFG)
    assert (z - noise).abs().mean() > 0.1  # the sampler moved
    return rearrange((decode_latents(pipe, z) + 1) / 2, "b c t h w -> b t c h w")


def embeds(**names: str) -> dict[str, torch.Tensor]:
    cond, uncond = prompts()
    parts = dict(prompt_embeds=cond["text"], negative_prompt_embeds=uncond["text"],
                 prompt_attention_mask=cond["text_mask"], negative_prompt_attention_mask=uncond["text_mask"])
    return {k: parts[k] for k in names}


@torch.no_grad()
def test_wan_matches_wanpipeline(tiny_folder, tmp_path):
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    g = torch.Generator().manual_seed(5)  # the VAE's latent statistics, drawn so the normalization is tested
    stats = dict(latents_mean=torch.randn(4, generator=g).tolist(), latents_std=(torch.rand(4, generator=g) + 0.5
                                                                                  ).tolist())
    pipe, vae_folder = exported(tmp_path, "wan", tiny_folder("wan"), ["diffusion.objective=flow",
                                                                      "diffusion.shift=3.0"], (9, 32, 48),
                                z_dim=4, **stats)
    noise = latents()
    ref = WanPipeline(tokenizer=None, text_encoder=None, vae=AutoencoderKLWan.from_pretrained(vae_folder),
                      transformer=WanTransformer3DModel.from_pretrained(tiny_folder("wan")),
                      scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    ref.set_progress_bar_config(disable=True)
    frames = ref(**embeds(prompt_embeds=1, negative_prompt_embeds=1), latents=noise.clone(),
                 num_inference_steps=STEPS, guidance_scale=CFG, height=32, width=48, num_frames=9,
                 output_type="pt").frames  # [B, T, 3, H, W] in [0, 1]
    assert frames.shape == (2, 9, 3, 32, 48)
    torch.testing.assert_close(ours(pipe, noise), frames, atol=1e-4, rtol=0)


@torch.no_grad()
def test_ltx_matches_ltxpipeline(tiny_folder, tmp_path):
    """LTX-Video's scheduler settings (Lightricks/LTX-Video scheduler_config.json: dynamic shift by token count,
    shift_terminal 0.1) and LTXPipeline's σ grid linspace(1, 1/N, N), as diffusion.* settings of the checkpoint."""
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXPipeline,
        LTXVideoTransformer3DModel,
    )

    pipe, vae_folder = exported(tmp_path, "ltx", tiny_folder("ltx"), LTX_SETTINGS, (17, 128, 192), latent_channels=4)
    noise = latents()
    ref = LTXPipeline(tokenizer=None, text_encoder=None, vae=AutoencoderKLLTXVideo.from_pretrained(vae_folder),
                      scheduler=FlowMatchEulerDiscreteScheduler(**LTX_SCHEDULER),
                      transformer=LTXVideoTransformer3DModel.from_pretrained(tiny_folder("ltx")))
    ref.set_progress_bar_config(disable=True)
    frames = ref(**embeds(prompt_embeds=1, prompt_attention_mask=1, negative_prompt_embeds=1,
                          negative_prompt_attention_mask=1),
                 latents=LTXPipeline._pack_latents(noise), num_inference_steps=STEPS, guidance_scale=CFG,
                 height=128, width=192, num_frames=17, output_type="pt").frames
    assert frames.shape == (2, 17, 3, 128, 192)
    torch.testing.assert_close(ours(pipe, noise), frames, atol=1e-4, rtol=0)


@torch.no_grad()
def test_cogvideox_matches_cogvideoxpipeline(tiny_folder, tmp_path):
    """CogVideoX-2B's schedule (scaled-linear, SNR shifted by 3, zero terminal SNR, trailing timesteps),
    v-prediction DDIM; the pipeline builds rotary embeddings per call."""
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXDPMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )

    settings = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction",
                    rescale_betas_zero_snr=True, set_alpha_to_one=True, timestep_spacing="trailing",
                    snr_shift_scale=3.0)
    pipe, vae_folder = exported(tmp_path, "cogvideox", tiny_folder("cogvideox"), [
        "diffusion.schedule=scaled_linear", "diffusion.beta_start=0.00085", "diffusion.beta_end=0.012",
        "diffusion.zero_terminal_snr=true", "diffusion.snr_shift_scale=3.0", "diffusion.prediction=v",
        "diffusion.timestep_spacing=trailing"], (9, 32, 48))
    noise = latents()
    ref = CogVideoXPipeline(tokenizer=None, text_encoder=None, scheduler=CogVideoXDDIMScheduler(**settings),
                            vae=AutoencoderKLCogVideoX.from_pretrained(vae_folder),
                            transformer=CogVideoXTransformer3DModel.from_pretrained(tiny_folder("cogvideox")))
    ref.set_progress_bar_config(disable=True)
    frames = ref(**embeds(prompt_embeds=1, negative_prompt_embeds=1),
                 latents=rearrange(noise, "b c f h w -> b f c h w"), num_inference_steps=STEPS, guidance_scale=CFG,
                 height=32, width=48, num_frames=9, output_type="pt").frames
    assert frames.shape == (2, 9, 3, 32, 48)
    torch.testing.assert_close(ours(pipe, noise), frames, atol=1e-4, rtol=0)
    # and CogVideoX-5B / 1.5's sampling: the scheduler they ship (the stochastic DPM-Solver, drawing from the same
    # seeded generator), with and without the dynamic guidance scale of their official inference
    ref.scheduler = CogVideoXDPMScheduler(**settings)
    cond, uncond = prompts()
    for dynamic in (False, True):
        frames = ref(**embeds(prompt_embeds=1, negative_prompt_embeds=1), generator=torch.Generator().manual_seed(9),
                     latents=rearrange(noise, "b c f h w -> b f c h w"), num_inference_steps=STEPS,
                     guidance_scale=CFG, use_dynamic_cfg=dynamic, height=32, width=48, num_frames=9,
                     output_type="pt").frames
        z = sample_latents(pipe, noise, cond, uncond, steps=STEPS, cfg=CFG, sampler="cogvideox_dpm",
                           generator=torch.Generator().manual_seed(9), dynamic_cfg=dynamic)
        got = rearrange((decode_latents(pipe, z) + 1) / 2, "b c t h w -> b t c h w")
        torch.testing.assert_close(got, frames, atol=1e-4, rtol=0)
        if not dynamic:
            plain = got
    assert (got - plain).abs().max() > 1e-3  # (the dynamic scale changed the samples)
    # `dit sample --seed S` (generate) draws its starting noise as the pipeline does from the same seed, so from the
    # same prompt states the two give the same video
    from dit.models.text import TextEncoder

    class Fixed(TextEncoder):  # prompts()'s states: the prompts, then as many empty ones
        dim, name = 16, "fixed"

        def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.cat([cond["text"], uncond["text"]]), torch.cat([cond["text_mask"], uncond["text_mask"]])

    pipe.text = Fixed()
    video = generate(pipe, ["a", "b"], frames=9, height=32, width=48, steps=STEPS, sampler="cogvideox_dpm", cfg=CFG,
                     seed=5, dynamic_cfg=True)
    frames = ref(**embeds(prompt_embeds=1, negative_prompt_embeds=1), generator=torch.Generator().manual_seed(5),
                 num_inference_steps=STEPS, guidance_scale=CFG, use_dynamic_cfg=True, height=32, width=48,
                 num_frames=9, output_type="pt").frames
    torch.testing.assert_close(rearrange((video + 1) / 2, "b c t h w -> b t c h w"), frames, atol=1e-4, rtol=0)


@pytest.mark.parametrize("version", ["1.0", "1.5"])
@torch.no_grad()
def test_cogvideox_i2v_matches_cogvideoximagetovideopipeline(tmp_path, version, monkeypatch):
    """An image-to-video CogVideoX transformer (in_channels 2C: the first frame's latents beside the noisy ones,
    model.condition=first_frame) samples from an image as CogVideoXImageToVideoPipeline does. 1.5: temporal patch 2,
    the offset embedding (ofs 2.0) and a VAE with invert_scale_latents (the image latents divided by the scaling
    factor). Both take the image's posterior mean (the pipeline samples it: patched to its mode here)."""
    import diffusers.pipelines.cogvideo.pipeline_cogvideox_image2video as i2v
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXImageToVideoPipeline,
        CogVideoXTransformer3DModel,
    )
    from tiny_families import tiny_transformer

    from dit.pipeline import image_condition

    v15 = version == "1.5"
    extra = dict(patch_size_t=2, ofs_embed_dim=2, sample_frames=13) if v15 else {}  # (ofs width = time_embed_dim)
    frames_in = 13 if v15 else 9  # latent frames 4 (even, for the temporal patch 2) or 3
    tiny_transformer("cogvideox", in_channels=8, out_channels=4, **extra).save_pretrained(tmp_path / "tr")
    settings = dict(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing",
                    beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, set_alpha_to_one=True,
                    snr_shift_scale=3.0)
    pipe, vae_folder = exported(tmp_path, "cogvideox", tmp_path / "tr", [
        "diffusion.schedule=scaled_linear", "diffusion.beta_start=0.00085", "diffusion.beta_end=0.012",
        "diffusion.zero_terminal_snr=true", "diffusion.snr_shift_scale=3.0", "diffusion.prediction=v",
        "diffusion.timestep_spacing=trailing", "model.condition=first_frame"], (frames_in, 32, 48),
        invert_scale_latents=v15)
    assert pipe.model.condition_channels == 4 and pipe.model.in_channels == 4
    image = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(6)) * 2 - 1  # [B, 3, H, W] in [-1, 1]
    noise = latents((2, 4, 4 if v15 else 3, 4, 6))
    cond, uncond = prompts()
    z = sample_latents(pipe, noise, cond, uncond, steps=STEPS, cfg=CFG, image=image)
    got = rearrange((decode_latents(pipe, z) + 1) / 2, "b c t h w -> b t c h w")
    # the condition itself: the image's latents at frame 0, scaled as the pipeline scales them, zeros after
    vae = AutoencoderKLCogVideoX.from_pretrained(vae_folder)
    z0 = vae.encode(image[:, :, None]).latent_dist.mode()  # [B, 4, 1, h, w]
    sf = vae.config.scaling_factor
    condition = image_condition(pipe, image, noise.shape)
    torch.testing.assert_close(condition[:, :, :1], z0 / sf if v15 else z0 * sf, atol=1e-5, rtol=1e-5)
    assert condition.shape == noise.shape and not condition[:, :, 1:].any()

    monkeypatch.setattr(i2v, "retrieve_latents", lambda out, generator=None: out.latent_dist.mode())
    ref = CogVideoXImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae,
                                        scheduler=CogVideoXDDIMScheduler(**settings),
                                        transformer=CogVideoXTransformer3DModel.from_pretrained(tmp_path / "tr"))
    ref.set_progress_bar_config(disable=True)
    frames = ref(image=(image + 1) / 2, **embeds(prompt_embeds=1, negative_prompt_embeds=1),
                 latents=rearrange(noise, "b c f h w -> b f c h w"), num_inference_steps=STEPS, guidance_scale=CFG,
                 height=32, width=48, num_frames=frames_in, output_type="pt").frames
    # (CogVideoX's VAE decodes an even number of latent frames to 4k frames: 16 for 1.5's 4, as the pipeline does)
    assert frames.shape == (2, 16 if v15 else 9, 3, 32, 48)
    torch.testing.assert_close(got, frames, atol=1e-4, rtol=0)
    # and the image matters: without it (zeros) the same noise gives other frames
    assert (sample_latents(pipe, noise, cond, uncond, steps=STEPS, cfg=CFG) - z).abs().mean() > 1e-2


@torch.no_grad()
def test_wan_first_frame_matches_wan22_ti2v_pipelines(tiny_folder, tmp_path, monkeypatch):
    """model.condition=first_frame on a Wan transformer is Wan 2.2 TI2V's image-to-video: WanImageToVideoPipeline
    with expand_timesteps (the image's latent in place of the first latent frame, its tokens at timestep 0, pasted
    back before decoding); without an image it is WanPipeline with expand_timesteps (per-token timesteps, all t)."""
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanImageToVideoPipeline,
        WanPipeline,
        WanTransformer3DModel,
    )

    from dit.pipeline import image_condition

    g = torch.Generator().manual_seed(5)
    stats = dict(latents_mean=torch.randn(4, generator=g).tolist(), latents_std=(torch.rand(4, generator=g) + 0.5
                                                                                  ).tolist())
    pipe, vae_folder = exported(tmp_path, "wan", tiny_folder("wan"), ["diffusion.objective=flow",
                                                                      "diffusion.shift=3.0",
                                                                      "model.condition=first_frame"], (9, 32, 48),
                                z_dim=4, **stats)
    assert pipe.model.first_frame and pipe.model.condition_channels == 5
    image = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(6))  # [1, 3, H, W] in [0, 1]
    noise = latents()
    cond, uncond = prompts()
    z = sample_latents(pipe, noise, cond, uncond, steps=STEPS, cfg=CFG, image=image * 2 - 1)
    got = rearrange((decode_latents(pipe, z) + 1) / 2, "b c t h w -> b t c h w")
    condition = image_condition(pipe, image * 2 - 1, noise.shape)
    assert torch.equal(z[:, :, :1], condition[:, :4, :1])  # the image's latent is frame 0 of what is decoded
    parts = dict(tokenizer=None, text_encoder=None, vae=AutoencoderKLWan.from_pretrained(vae_folder),
                 transformer=WanTransformer3DModel.from_pretrained(tiny_folder("wan")),
                 scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    ref = WanImageToVideoPipeline(**parts, expand_timesteps=True)
    ref.set_progress_bar_config(disable=True)
    frames = ref(image=image, **embeds(prompt_embeds=1, negative_prompt_embeds=1), latents=noise.clone(),
                 num_inference_steps=STEPS, guidance_scale=CFG, height=32, width=48, num_frames=9,
                 output_type="pt").frames  # [B, T, 3, H, W] in [0, 1]
    assert frames.shape == (2, 9, 3, 32, 48)
    torch.testing.assert_close(got, frames, atol=1e-4, rtol=0)
    plain = WanPipeline(**parts, expand_timesteps=True)
    plain.set_progress_bar_config(disable=True)
    frames = plain(**embeds(prompt_embeds=1, negative_prompt_embeds=1), latents=noise.clone(),
                   num_inference_steps=STEPS, guidance_scale=CFG, height=32, width=48, num_frames=9,
                   output_type="pt").frames
    torch.testing.assert_close(ours(pipe, noise), frames, atol=1e-4, rtol=0)


@torch.no_grad()
def test_ltx_first_frame_matches_ltximagetovideopipeline(tiny_folder, tmp_path):
    """model.condition=first_frame on an LTX transformer is LTXImageToVideoPipeline: the image's latent as frame 0
    with the conditioning mask (its tokens at timestep 0, only the other frames stepped). Given latents, the
    pipeline takes them as they are, so its latents hold our condition at frame 0; that condition is checked
    against the pipeline's own normalization of the image's latent (posterior mode) beside. The VAE's scaling factor
    is LTX-Video's 1.0: the pipeline normalizes the image's latent without it, and decodes with it."""
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXImageToVideoPipeline,
        LTXPipeline,
        LTXVideoTransformer3DModel,
    )

    from dit.pipeline import image_condition

    pipe, vae_folder = exported(tmp_path, "ltx", tiny_folder("ltx"), [*LTX_SETTINGS, "model.condition=first_frame"],
                                (17, 128, 192), latent_channels=4, scaling_factor=1.0)
    assert pipe.model.first_frame and pipe.model.condition_channels == 5
    image = torch.rand(2, 3, 128, 192, generator=torch.Generator().manual_seed(6))  # [B, 3, H, W] in [0, 1]
    noise = latents()
    cond, uncond = prompts()
    z = sample_latents(pipe, noise, cond, uncond, steps=STEPS, cfg=CFG, image=image * 2 - 1)
    got = rearrange((decode_latents(pipe, z) + 1) / 2, "b c t h w -> b t c h w")
    vae = AutoencoderKLLTXVideo.from_pretrained(vae_folder)
    first = LTXImageToVideoPipeline._normalize_latents(vae.encode(image[:, :, None] * 2 - 1).latent_dist.mode(),
                                                       vae.latents_mean, vae.latents_std)  # [B, 4, 1, h, w]
    condition = image_condition(pipe, image * 2 - 1, noise.shape)
    torch.testing.assert_close(condition[:, :4, :1], first, atol=1e-5, rtol=1e-5)
    assert torch.equal(z[:, :, :1], condition[:, :4, :1])
    start = noise.clone()
    start[:, :, :1] = first  # what the pipeline's prepare_latents puts there when it draws the noise itself
    ref = LTXImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae,
                                  scheduler=FlowMatchEulerDiscreteScheduler(**LTX_SCHEDULER),
                                  transformer=LTXVideoTransformer3DModel.from_pretrained(tiny_folder("ltx")))
    ref.set_progress_bar_config(disable=True)
    frames = ref(image=image, **embeds(prompt_embeds=1, prompt_attention_mask=1, negative_prompt_embeds=1,
                                       negative_prompt_attention_mask=1),
                 latents=LTXPipeline._pack_latents(start), num_inference_steps=STEPS, guidance_scale=CFG,
                 height=128, width=192, num_frames=17, output_type="pt").frames
    assert frames.shape == (2, 17, 3, 128, 192)
    torch.testing.assert_close(got, frames, atol=1e-4, rtol=0)
