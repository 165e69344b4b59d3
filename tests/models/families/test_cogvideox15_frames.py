"""CogVideoX 1.5 (temporal patch 2) at an odd latent frame count (its native 81 frames: 21 latent frames): the
latents are padded by one frame at the front, as CogVideoXPipeline / CogVideoXImageToVideoPipeline draw one more
frame of noise and drop it before decoding, and as CogVideo's fine-tuning repeats latent frame 0. Tiny models at
9 frames (3 latent frames, 4 with the pad) stand in for 81."""

from __future__ import annotations

import pytest
import torch
from einops import rearrange
from test_pipelines import CFG, STEPS, exported, latents, prompts
from tiny_families import tiny_transformer

from dit.config import ConfigError, load_config
from dit.pipeline import decode_latents, generate, sample_latents

V15 = dict(patch_size_t=2, sample_frames=13)
SCHEDULE = ["diffusion.schedule=scaled_linear", "diffusion.beta_start=0.00085", "diffusion.beta_end=0.012",
            "diffusion.zero_terminal_snr=true", "diffusion.snr_shift_scale=3.0", "diffusion.prediction=v",
            "diffusion.timestep_spacing=trailing"]
SCHEDULER = dict(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing",
                 beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, set_alpha_to_one=True,
                 snr_shift_scale=3.0)


def frames_of(pipe, z):
    """Our frames [B, T, 3, H, W] in [0, 1] of padded latents: the pad dropped before decoding."""
    return rearrange((decode_latents(pipe, z[:, :, 1:]) + 1) / 2, "b c t h w -> b t c h w")


@torch.no_grad()
def test_t2v_at_an_odd_latent_count_matches_cogvideoxpipeline(tmp_path):
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline
    from diffusers import CogVideoXTransformer3DModel as CogVideoX

    tiny_transformer("cogvideox", **V15).save_pretrained(tmp_path / "tr")
    pipe, vae_folder = exported(tmp_path, "cogvideox", tmp_path / "tr", SCHEDULE, (9, 32, 48))
    assert pipe.model.pads_frames and pipe.model.patch[0] == 2
    noise = latents((2, 4, 4, 4, 6))  # 3 latent frames + the pad
    cond, uncond = prompts()
    z = sample_latents(pipe, noise, cond, uncond, steps=STEPS, cfg=CFG)
    ref = CogVideoXPipeline(tokenizer=None, text_encoder=None, scheduler=CogVideoXDDIMScheduler(**SCHEDULER),
                            vae=AutoencoderKLCogVideoX.from_pretrained(vae_folder),
                            transformer=CogVideoX.from_pretrained(tmp_path / "tr"))
    ref.set_progress_bar_config(disable=True)
    frames = ref(prompt_embeds=cond["text"], negative_prompt_embeds=uncond["text"],
                 latents=rearrange(noise, "b c f h w -> b f c h w"), num_inference_steps=STEPS, guidance_scale=CFG,
                 height=32, width=48, num_frames=9, output_type="pt").frames
    assert frames.shape == (2, 9, 3, 32, 48)  # the pipeline's own frame count back
    torch.testing.assert_close(frames_of(pipe, z), frames, atol=1e-4, rtol=0)
    # generate draws the padded noise itself and returns the asked-for frames
    from dit.models.text import NoText

    pipe.text = NoText(16)
    assert generate(pipe, ["x"], frames=9, height=32, width=48, steps=2).shape == (1, 3, 9, 32, 48)


@torch.no_grad()
def test_i2v_at_an_odd_latent_count_matches_cogvideoximagetovideopipeline(tmp_path, monkeypatch):
    import diffusers.pipelines.cogvideo.pipeline_cogvideox_image2video as i2v
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXImageToVideoPipeline
    from diffusers import CogVideoXTransformer3DModel as CogVideoX

    tiny_transformer("cogvideox", in_channels=8, out_channels=4, ofs_embed_dim=2, **V15).save_pretrained(
        tmp_path / "tr")
    pipe, vae_folder = exported(tmp_path, "cogvideox", tmp_path / "tr", [*SCHEDULE, "model.condition=first_frame"],
                                (9, 32, 48), invert_scale_latents=True)
    image = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(6)) * 2 - 1
    noise = latents((2, 4, 4, 4, 6))
    cond, uncond = prompts()
    z = sample_latents(pipe, noise, cond, uncond, steps=STEPS, cfg=CFG, image=image)
    monkeypatch.setattr(i2v, "retrieve_latents", lambda out, generator=None: out.latent_dist.mode())
    ref = CogVideoXImageToVideoPipeline(tokenizer=None, text_encoder=None,
                                        vae=AutoencoderKLCogVideoX.from_pretrained(vae_folder),
                                        scheduler=CogVideoXDDIMScheduler(**SCHEDULER),
                                        transformer=CogVideoX.from_pretrained(tmp_path / "tr"))
    ref.set_progress_bar_config(disable=True)
    frames = ref(image=(image + 1) / 2, prompt_embeds=cond["text"], negative_prompt_embeds=uncond["text"],
                 latents=rearrange(noise, "b c f h w -> b f c h w"), num_inference_steps=STEPS, guidance_scale=CFG,
                 height=32, width=48, num_frames=9, output_type="pt").frames
    assert frames.shape == (2, 9, 3, 32, 48)
    torch.testing.assert_close(frames_of(pipe, z), frames, atol=1e-4, rtol=0)


def test_the_frame_rule_pads_for_cogvideox15_only(tmp_path):
    """81 frames (21 latent frames) are a CogVideoX 1.5 size; our DiT with a temporal patch 2 still refuses them,
    naming the nearest counts; `dit plan` counts the padded tokens."""
    from dit.plan import model_size

    sizes = dict(num_attention_heads=2, attention_head_dim=16, num_layers=1, sample_width=8, sample_height=8,
                 patch_size=2, **V15)
    cfg = load_config(None, ["model.family=cogvideox", "vae.family=cogvideox", *SCHEDULE, "data.frames=81",
                             "data.height=32", "data.width=48", "text.encoder=none",
                             *[f"model.family_config.{k}={v}" for k, v in sizes.items()]])
    assert cfg.frame_patch() == 1 and cfg.patch_size()[0] == 2
    assert model_size(cfg).tokens == 11 * 2 * 3  # 22 latent frames / 2, (32 / 8) / 2, (48 / 8) / 2
    with pytest.raises(ConfigError, match=r"frames=81 gives 21 latent frames, not divisible by the temporal patch 2 "
                                          r"\(nearest valid: \[77, 85\]\)"):
        load_config(None, ["model.patch_size=[2,2,2]", "data.frames=81", "data.height=32", "data.width=32"])


def test_training_repeats_latent_frame_0_in_front(tmp_path):
    """draw_batch pads a CogVideoX 1.5 clip's latents by its frame 0 (CogVideo's fine-tuning), and draws noise and
    the image condition over the padded frames; an even count is not padded."""
    from tiny_vaes import save_tiny_vae

    from dit.models.text import NoText
    from dit.models.vae import load_vae_from_config
    from dit.training.batch import RandomStreams, draw_batch

    save_tiny_vae("cogvideox", tmp_path / "vae")
    for frames, padded in ((9, 4), (13, 4)):
        cfg = load_config(None, ["model.family=cogvideox", "vae.family=cogvideox", f"vae.pretrained={tmp_path / 'vae'}",
                                 *SCHEDULE, f"data.frames={frames}", "data.height=16", "data.width=16",
                                 "text.encoder=none", "model.condition=first_frame",
                                 *[f"model.family_config.{k}={v}" for k, v in {**V15, "in_channels": 8,
                                                                                "out_channels": 4}.items()]])
        vae = load_vae_from_config(cfg.vae).eval()
        video = torch.rand(2, 3, frames, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
        drawn = draw_batch({"video": video, "caption": ["a", "b"]}, vae, NoText(8), cfg.diffusion,
                           (2, 2, 2), RandomStreams(0), torch.device("cpu"), None, cfg.model)
        lat, noise, condition = drawn[0], drawn[4], drawn[5]
        assert lat.shape[2] == noise.shape[2] == condition.shape[2] == padded
        if frames == 9:
            assert torch.equal(lat[:, :, 0], lat[:, :, 1])  # latent frame 0 repeated in front
        else:
            assert not torch.equal(lat[:, :, 0], lat[:, :, 1])


def test_a_run_at_an_odd_latent_count_trains_and_samples(tmp_path):
    """`dit train` end to end on 9-frame clips (the 81-frame case in small): the padded clip through the loop, its
    checkpoint samples 9 frames."""
    from tiny_vaes import save_tiny_vae

    from data_pipelines.synthetic import make_synthetic
    from dit.pipeline import load_pipeline
    from dit.training import train

    save_tiny_vae("cogvideox", tmp_path / "vae")
    make_synthetic(tmp_path / "data", num_clips=8, frames=9, height=16, width=16, clips_per_shard=8, seed=0)
    sizes = {**V15, "num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 1, "sample_width": 2,
             "sample_height": 2, "patch_size": 2, "time_embed_dim": 8, "max_text_seq_length": 1,
             "use_rotary_positional_embeddings": True}
    cfg = load_config(None, ["model.family=cogvideox", "vae.family=cogvideox", f"vae.pretrained={tmp_path / 'vae'}",
                             *SCHEDULE, "data.frames=9", "data.height=16", "data.width=16", "text.encoder=none",
                             f"data.shards={tmp_path / 'data'}", f"train.output_dir={tmp_path / 'run'}",
                             "train.steps=2", "train.batch_size=2", "train.log_every=1", "train.sample_prompts=[]",
                             *[f"model.family_config.{k}={v}" for k, v in sizes.items()]])
    train.main(cfg)
    pipe = load_pipeline(tmp_path / "run")
    video = generate(pipe, ["a red circle"], frames=9, height=16, width=16, steps=2)
    assert video.shape == (1, 3, 9, 16, 16) and torch.isfinite(video).all()
