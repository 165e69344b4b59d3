"""End-to-end agreement with diffusers' own pipelines: the same starting latents, prompt embeddings, steps and
guidance give the same denoised latents through the adapter + our guidance + a sampler loop as through WanPipeline,
LTXPipeline and CogVideoXPipeline with output_type="latent"."""

from __future__ import annotations

import numpy as np
import torch
from einops import rearrange

from dit.config import ModelConfig
from dit.diffusion.guidance import cfg_denoiser
from dit.diffusion.samplers import ddim, flow_euler
from dit.diffusion.schedules import make_schedule
from dit.models.families import build_denoiser

STEPS, CFG = 5, 4.0


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


def adapter(family: str, folder) -> torch.nn.Module:
    return build_denoiser(ModelConfig(family=family, pretrained=str(folder)), in_channels=4, text_dim=16).eval()


@torch.no_grad()
def test_wan_matches_wanpipeline(tiny_folder):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    cond, uncond = prompts()
    noise = latents()
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=WanTransformer3DModel.from_pretrained(
        tiny_folder("wan")), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt_embeds=cond["text"], negative_prompt_embeds=uncond["text"], latents=noise.clone(),
               num_inference_steps=STEPS, guidance_scale=CFG, height=32, width=48, num_frames=9,
               output_type="latent").frames  # [B, C, t, h, w]
    ours = flow_euler(cfg_denoiser(adapter("wan", tiny_folder("wan")), cond, uncond, CFG), noise, steps=STEPS,
                      shift=3.0)
    assert (ours - noise).abs().mean() > 0.1  # the sampler moved
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


@torch.no_grad()
def test_ltx_matches_ltxpipeline(tiny_folder):
    """LTXPipeline's own sigma grid (linspace(1, 1/N, N), dynamic shift by token count, LTX's scheduler settings);
    each step x += (sigma' - sigma) v at timestep sigma * 1000."""
    from diffusers import FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel
    from diffusers.pipelines.ltx.pipeline_ltx import calculate_shift

    settings = dict(use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05, base_image_seq_len=1024,
                    max_image_seq_len=4096, shift_terminal=0.1)  # Lightricks/LTX-Video scheduler_config.json
    cond, uncond = prompts()
    noise = latents()
    pipe = LTXPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(
        **settings), transformer=LTXVideoTransformer3DModel.from_pretrained(tiny_folder("ltx")))
    pipe.set_progress_bar_config(disable=True)
    packed = pipe(prompt_embeds=cond["text"], prompt_attention_mask=cond["text_mask"],
                  negative_prompt_embeds=uncond["text"], negative_prompt_attention_mask=uncond["text_mask"],
                  latents=LTXPipeline._pack_latents(noise), num_inference_steps=STEPS, guidance_scale=CFG,
                  height=4 * 32, width=6 * 32, num_frames=(3 - 1) * 8 + 1, output_type="latent").frames
    ref = LTXPipeline._unpack_latents(packed, 3, 4, 6)  # [B, C, t, h, w]

    sched = FlowMatchEulerDiscreteScheduler(**settings)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / STEPS, STEPS), mu=calculate_shift(3 * 4 * 6, 1024, 4096, 0.95,
                                                                                       2.05))
    denoise = cfg_denoiser(adapter("ltx", tiny_folder("ltx")), cond, uncond, CFG)
    x = noise.clone()
    for i in range(STEPS):
        sigma = sched.sigmas[i]
        x = x + (sched.sigmas[i + 1] - sigma) * denoise(x, (sigma * 1000).expand(2))
    assert (x - noise).abs().mean() > 0.1
    torch.testing.assert_close(x, ref, atol=1e-4, rtol=0)


@torch.no_grad()
def test_cogvideox_matches_cogvideoxpipeline(tiny_folder):
    """v-prediction DDIM on CogVideoX's schedule (scaled-linear, zero terminal SNR, trailing timesteps) with
    snr_shift_scale 1 (our schedules have no SNR shift yet), integer timesteps, rotary embeddings per call."""
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    settings = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction",
                    rescale_betas_zero_snr=True, set_alpha_to_one=True, timestep_spacing="trailing",
                    snr_shift_scale=1.0)
    cond, uncond = prompts()
    noise = latents()
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=CogVideoXDDIMScheduler(
        **settings), transformer=CogVideoXTransformer3DModel.from_pretrained(tiny_folder("cogvideox")))
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt_embeds=cond["text"], negative_prompt_embeds=uncond["text"],
               latents=rearrange(noise, "b c f h w -> b f c h w"), num_inference_steps=STEPS, guidance_scale=CFG,
               height=32, width=48, num_frames=9, output_type="latent").frames
    schedule = make_schedule("scaled_linear", 1000, beta_start=0.00085, beta_end=0.012, zero_terminal_snr=True)
    ours = ddim(cfg_denoiser(adapter("cogvideox", tiny_folder("cogvideox")), cond, uncond, CFG), noise, schedule,
                steps=STEPS, prediction="v", timestep_spacing="trailing")
    assert (ours - noise).abs().mean() > 0.1
    torch.testing.assert_close(ours, rearrange(ref, "b f c h w -> b c f h w"), atol=1e-4, rtol=0)
