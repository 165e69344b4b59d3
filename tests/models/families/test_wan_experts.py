"""Wan 2.2 A14B's two experts: a checkpoint trained as one (diffusion.sigma_min / sigma_max) samples with the other
(`load_pipeline(..., expert=)`, `dit sample --expert`) as WanPipeline and WanImageToVideoPipeline run transformer and
transformer_2 with boundary_ratio and guidance_scale_2: the same frames from the same latents and embeddings."""

from __future__ import annotations

import re

import pytest
import torch
from einops import rearrange
from test_pipelines import CFG, STEPS, exported, latents, prompts
from tiny_families import tiny_transformer

from dit.config import ConfigError
from dit.experts import check_expert, load_expert
from dit.models.families import held_weights
from dit.models.text import NoText
from dit.pipeline import decode_latents, load_pipeline, sample_latents

LOW_CFG = 2.5  # guidance_scale_2: the low-noise expert's
SETTINGS = ["diffusion.objective=flow", "diffusion.shift=3.0"]


def frames_of(pipe, z):
    return rearrange((decode_latents(pipe, z) + 1) / 2, "b c t h w -> b t c h w")


@pytest.fixture
def stats():
    g = torch.Generator().manual_seed(5)
    return dict(latents_mean=torch.randn(4, generator=g).tolist(),
                latents_std=(torch.rand(4, generator=g) + 0.5).tolist())


@torch.no_grad()
def test_t2v_experts_match_wanpipeline_with_transformer_2(tmp_path, stats):
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    for name, seed in (("high", 0), ("low", 1)):
        tiny_transformer("wan", seed=seed).save_pretrained(tmp_path / name)
    # this checkpoint is the high-noise expert: [0.875, 1]; the low-noise one is the diffusers folder
    pipe, vae_folder = exported(tmp_path, "wan", tmp_path / "high", [*SETTINGS, "diffusion.sigma_min=0.875"],
                                (9, 32, 48), z_dim=4, **stats)
    both = load_pipeline(tmp_path / "run", text=NoText(16), expert=tmp_path / "low")
    assert both.experts.boundary == 0.875 and not both.experts.other_high
    noise = latents()
    cond, uncond = prompts()
    z = sample_latents(both, noise, cond, uncond, steps=STEPS, cfg=CFG, cfg_low=LOW_CFG)
    ref = WanPipeline(tokenizer=None, text_encoder=None, vae=AutoencoderKLWan.from_pretrained(vae_folder),
                      transformer=WanTransformer3DModel.from_pretrained(tmp_path / "high"),
                      transformer_2=WanTransformer3DModel.from_pretrained(tmp_path / "low"),
                      scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), boundary_ratio=0.875)
    ref.set_progress_bar_config(disable=True)
    frames = ref(prompt_embeds=cond["text"], negative_prompt_embeds=uncond["text"], latents=noise.clone(),
                 num_inference_steps=STEPS, guidance_scale=CFG, guidance_scale_2=LOW_CFG, height=32, width=48,
                 num_frames=9, output_type="pt").frames
    torch.testing.assert_close(frames_of(both, z), frames, atol=1e-4, rtol=0)
    # both experts take steps (5 steps at shift 3: sigma 1, 0.92 high; 0.82, 0.67, 0.43 low)
    alone = sample_latents(pipe, noise, cond, uncond, steps=STEPS, cfg=CFG)
    assert (alone - z).abs().mean() > 1e-2
    assert (sample_latents(both, noise, cond, uncond, steps=STEPS, cfg=CFG) - z).abs().mean() > 1e-3  # cfg_low
    # a training run's samples (train.sample_expert) hold the other expert in bf16 when they are drawn under bf16
    # autocast; it then runs as a bf16 Wan does in WanPipeline (inputs and residual stream in bf16), which is as far
    # from the fp32 latents as autocast over its fp32 weights is (measured: mean 0.0141 against 0.0138, max 0.074
    # against 0.091)
    z16 = sample_latents(both, noise, cond, uncond, steps=STEPS, cfg=CFG, cfg_low=LOW_CFG, dtype="bf16")
    both.experts = load_expert(both.config, tmp_path / "low", "cpu", dtype=torch.bfloat16)
    block = both.experts.other.transformer.blocks[0]  # (diffusers keeps Wan's norms and modulation table in fp32)
    assert block.attn1.to_q.weight.dtype == torch.bfloat16 and block.scale_shift_table.dtype == torch.float32
    # our checkpoints' weights held the same way (held_weights: dit sample --dtype bf16, a run's sample_expert)
    held = held_weights(dict(both.model.state_dict()), "wan", torch.bfloat16)
    loaded = WanTransformer3DModel.from_pretrained(tmp_path / "low", torch_dtype=torch.bfloat16).state_dict()
    assert {k: v.dtype for k, v in held.items()} == {f"transformer.{k}": v.dtype for k, v in loaded.items()}
    assert {v.dtype for v in held.values()} == {torch.bfloat16, torch.float32}
    held16 = sample_latents(both, noise, cond, uncond, steps=STEPS, cfg=CFG, cfg_low=LOW_CFG, dtype="bf16")
    assert (held16 - z16).abs().max() > 0  # (it did run in bf16)
    assert (held16 - z).abs().mean() < 1.5 * (z16 - z).abs().mean()
    assert (held16 - z).abs().max() < 1.5 * (z16 - z).abs().max()


@torch.no_grad()
def test_i2v_experts_match_wanimagetovideopipeline(tmp_path, stats):
    """Wan 2.2 I2V A14B: the code form without CLIP (in_channels 2C + 4, no image_dim); this checkpoint is the
    low-noise expert ([0, 0.9]) and the high-noise one a checkpoint of ours too."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline
    from diffusers import WanTransformer3DModel as Wan
    from PIL import Image

    for name, seed in (("high", 0), ("low", 1)):
        tiny_transformer("wan", seed=seed, in_channels=12, out_channels=4).save_pretrained(tmp_path / name)
    image_settings = [*SETTINGS, "model.condition=first_frame"]
    exported(tmp_path / "h", "wan", tmp_path / "high", [*image_settings, "diffusion.sigma_min=0.9"], (9, 32, 48),
             z_dim=4, **stats)
    pipe, vae_folder = exported(tmp_path, "wan", tmp_path / "low", [*image_settings, "diffusion.sigma_max=0.9"],
                                (9, 32, 48), z_dim=4, **stats)
    assert pipe.model.code_condition and not pipe.model.clip_image
    both = load_pipeline(tmp_path / "run", text=NoText(16), expert=tmp_path / "h" / "run")
    assert both.experts.boundary == 0.9 and both.experts.other_high
    pixels = torch.randint(0, 256, (1, 3, 32, 48), generator=torch.Generator().manual_seed(6), dtype=torch.uint8)
    noise = latents()
    cond, uncond = prompts()
    z = sample_latents(both, noise, cond, uncond, steps=STEPS, cfg=CFG, cfg_low=LOW_CFG, image=pixels)
    ref = WanImageToVideoPipeline(tokenizer=None, text_encoder=None,
                                  vae=AutoencoderKLWan.from_pretrained(vae_folder),
                                  transformer=Wan.from_pretrained(tmp_path / "high"),
                                  transformer_2=Wan.from_pretrained(tmp_path / "low"),
                                  scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), boundary_ratio=0.9)
    ref.set_progress_bar_config(disable=True)
    frames = ref(image=Image.fromarray(pixels[0].permute(1, 2, 0).numpy()), prompt_embeds=cond["text"],
                 negative_prompt_embeds=uncond["text"], latents=noise.clone(), num_inference_steps=STEPS,
                 guidance_scale=CFG, guidance_scale_2=LOW_CFG, height=32, width=48, num_frames=9,
                 output_type="pt").frames
    torch.testing.assert_close(frames_of(both, z), frames, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="no text-to-video mode"):
        sample_latents(both, noise, cond, uncond, steps=1, cfg=CFG)


def test_an_expert_that_does_not_fit_is_refused(tmp_path, stats):
    tiny_transformer("wan").save_pretrained(tmp_path / "t2v")
    tiny_transformer("wan", in_channels=12, out_channels=4).save_pretrained(tmp_path / "i2v")
    exported(tmp_path / "full", "wan", tmp_path / "t2v", SETTINGS, (9, 32, 48), z_dim=4, **stats)
    with pytest.raises(ConfigError, match="trained on every noise level, not as one expert"):
        load_pipeline(tmp_path / "full" / "run", text=NoText(16), expert=tmp_path / "t2v")
    exported(tmp_path / "mid", "wan", tmp_path / "t2v", [*SETTINGS, "diffusion.sigma_min=0.2",
                                                         "diffusion.sigma_max=0.8"], (9, 32, 48), z_dim=4, **stats)
    with pytest.raises(ConfigError, match=r"trained on noise levels \[0.2, 0.8\]; two experts split"):
        load_pipeline(tmp_path / "mid" / "run", text=NoText(16), expert=tmp_path / "t2v")
    high, _ = exported(tmp_path / "high", "wan", tmp_path / "t2v", [*SETTINGS, "diffusion.sigma_min=0.875"],
                       (9, 32, 48), z_dim=4, **stats)
    with pytest.raises(ConfigError, match="condition_channels 8 .expert. vs 0 .checkpoint."):
        load_pipeline(tmp_path / "high" / "run", text=NoText(16), expert=tmp_path / "i2v")
    # the same checks from the config files alone (train.sample_expert, before a run's first step)
    check_expert(high.config, tmp_path / "t2v")
    with pytest.raises(ConfigError, match="condition_channels 8 .expert. vs 0 .checkpoint."):
        check_expert(high.config, tmp_path / "i2v")
    with pytest.raises(ConfigError, match=r"\[0.875, 1.0\], but the other expert of this checkpoint serves"):
        check_expert(high.config, tmp_path / "high" / "run")
    with pytest.raises(ConfigError, match=r"trained on noise levels \[0.875, 1.0\], but the other expert of this "
                                          r"checkpoint serves \[0.0, 0.875\]"):
        load_pipeline(tmp_path / "high" / "run", text=NoText(16), expert=tmp_path / "high" / "run")
    with pytest.raises(ConfigError, match="--expert: .* holds a LTXVideoTransformer3DModel"):
        tiny_transformer("ltx").save_pretrained(tmp_path / "ltx")
        load_pipeline(tmp_path / "high" / "run", text=NoText(16), expert=tmp_path / "ltx")


def test_dit_sample_takes_the_expert(tmp_path, stats):
    """`dit sample --expert` as a user runs it: the low-noise expert's diffusers folder beside the high-noise run,
    --cfg-low for it; and the flags' mistakes in one line before anything loads."""
    import subprocess
    import sys

    from tiny_vaes import save_tiny_vae

    from dit.config import load_config
    from dit.export import write_export
    from dit.models.families import build_denoiser

    for name, seed in (("high", 0), ("low", 1)):  # text width 8: what text.encoder=none gives
        tiny_transformer("wan", seed=seed, text_dim=8).save_pretrained(tmp_path / name)
    save_tiny_vae("wan", tmp_path / "vae", seed=1, z_dim=4, **stats)
    cfg = load_config(None, ["model.family=wan", f"model.pretrained={tmp_path / 'high'}", "vae.family=wan",
                             f"vae.pretrained={tmp_path / 'vae'}", "text.encoder=none", "data.frames=9",
                             "data.height=32", "data.width=48", *SETTINGS, "diffusion.sigma_min=0.875"])
    model = build_denoiser(cfg.model, in_channels=4, text_dim=8)
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000001"
    ckpt.mkdir(parents=True)
    write_export(ckpt, weights=model.state_dict(), config={"dit": model.config, "experiment": cfg.to_dict()},
                 vae=cfg.vae)

    def dit_sample(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dit.cli", "sample", "--checkpoint", str(tmp_path / "run"),
                               "--prompt", "x", "--steps", "3", *flags], capture_output=True, text=True, timeout=300)

    out = tmp_path / "clip.mp4"
    proc = dit_sample("--expert", str(tmp_path / "low"), "--cfg-low", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.stat().st_size > 0
    for flags, message in ((["--cfg-low", "2"], "--cfg-low guides the low-noise expert of --expert"),
                           (["--expert", str(tmp_path / "nowhere")], "--expert .* does not exist")):
        proc = dit_sample(*flags, "--out", str(tmp_path / "x.mp4"))
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert re.search(message, proc.stderr), proc.stderr[-500:]
