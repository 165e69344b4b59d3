"""HunyuanVideo 1.5 (model.family=hunyuan15, text.encoder=hunyuan15, vae.family=hunyuan15): the text encoder gives
HunyuanVideo15Pipeline's prompt embeddings (Qwen2.5-VL's and ByT5's of the quoted text), and `load_pipeline` +
`generate` (what `dit sample` runs) give its videos from the same prompts, noise, steps and CFG. Tiny random
Qwen2.5-VL, ByT5, transformer and VAE folders."""

from __future__ import annotations

import pytest
import torch
from tiny_families import export_checkpoint
from tiny_hunyuan15 import GLYPH_WIDTH, WIDTH, crop_start, save_tiny_hunyuan15

from dit.config import ConfigError, load_config
from dit.models.text import build_text_encoder
from dit.models.text_hunyuan15 import split_glyph
from dit.models.vae import load_vae_from_config
from dit.pipeline import generate, load_pipeline

# the second prompt names two texts (one twice, in both kinds of quotes), the third none
PROMPTS = ['a sign that reads "OPEN" on a door', 'a neon “Café” over a shop, then "Bar" and "Café" again ' * 2,
           "a red circle on grey"]
LENGTH = 40  # Qwen2.5-VL tokens after the chat's opening (text.max_length; the pipeline's tokenizer_max_length)
STEPS, SHIFT = 3, 5.0


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from transformers import AutoTokenizer

    f = save_tiny_hunyuan15(tmp_path_factory.mktemp("hunyuan15"))
    f["crop"] = crop_start(AutoTokenizer.from_pretrained(f["root"] / "tokenizer"))
    return f


def settings(f: dict, *more: str) -> list[str]:
    return ["model.family=hunyuan15", f"model.pretrained={f['transformer']}", "vae.family=hunyuan15",
            f"vae.pretrained={f['vae']}", "text.encoder=hunyuan15", f"text.path={f['qwen']}",
            f"text.path_2={f['byt5']}", f"text.max_length={LENGTH}", f"text.crop_start={f['crop']}",
            "diffusion.objective=flow", f"diffusion.shift={SHIFT}", "diffusion.flow_grid=steps", "data.frames=5",
            "data.height=32", "data.width=48", *more]


def reference_pipeline(f: dict, cfg: float):
    from diffusers import (
        AutoencoderKLHunyuanVideo15,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideo15Pipeline,
        HunyuanVideo15Transformer3DModel,
    )
    from diffusers.guiders import ClassifierFreeGuidance
    from transformers import AutoTokenizer, ByT5Tokenizer, Qwen2_5_VLTextModel, T5EncoderModel

    pipe = HunyuanVideo15Pipeline(
        text_encoder=Qwen2_5_VLTextModel.from_pretrained(f["qwen"]),
        tokenizer=AutoTokenizer.from_pretrained(f["root"] / "tokenizer"),
        transformer=HunyuanVideo15Transformer3DModel.from_pretrained(f["transformer"]),
        vae=AutoencoderKLHunyuanVideo15.from_pretrained(f["vae"]),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT),
        text_encoder_2=T5EncoderModel.from_pretrained(f["byt5"]),
        tokenizer_2=ByT5Tokenizer.from_pretrained(f["root"] / "tokenizer_2"),
        guider=ClassifierFreeGuidance(guidance_scale=cfg))
    pipe.prompt_template_encode_start_idx = f["crop"]  # (108 is the released tokenizer's count)
    pipe.tokenizer_max_length = LENGTH
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def test_text_is_the_pipelines_prompt_embeddings(folders):
    enc = build_text_encoder(load_config(None, settings(folders)).text)
    states, mask = enc.encode(PROMPTS + [""])
    assert states.shape == (4, 1 + 256 + LENGTH, WIDTH)
    qwen, qwen_mask, glyph, glyph_mask = split_glyph(states, mask, GLYPH_WIDTH)
    embeds, embeds_mask, embeds_2, embeds_mask_2 = reference_pipeline(folders, 1.0).encode_prompt(
        PROMPTS + [""], batch_size=4)
    m, g = embeds_mask.bool(), embeds_mask_2.bool()  # [4, LENGTH], [4, 256]
    assert m.sum(1).tolist()[1] == LENGTH > m.sum(1).tolist()[0]  # the long prompt is cut, as the pipeline's
    assert g.sum(1).tolist()[2:] == [0, 0] and 0 < g.sum(1).tolist()[0] < g.sum(1).tolist()[1]  # quoted text only
    for i in range(4):  # each row's real tokens, in order, the same states
        n, k = int(m[i].sum()), int(g[i].sum())
        assert qwen_mask[i].sum() == n and glyph_mask[i].sum() == k
        torch.testing.assert_close(qwen[i, :n], embeds[i][m[i]], atol=1e-6, rtol=0)
        torch.testing.assert_close(glyph[i, :k], embeds_2[i][g[i]], atol=1e-6, rtol=0)
    assert qwen.shape[1] == LENGTH and glyph.shape[1] == int(g.sum(1).max())  # the padding cut after the longest
    # what a latent shard keeps (each row's real tokens) and training pads back splits as the encoder's rows did
    kept = [states[i][mask[i]] for i in range(4)]
    padded = torch.nn.utils.rnn.pad_sequence(kept, batch_first=True)
    lengths = torch.tensor([len(k) for k in kept])
    again = split_glyph(padded, torch.arange(padded.shape[1]) < lengths[:, None], GLYPH_WIDTH)
    for a, b in zip(again, (qwen, qwen_mask, glyph, glyph_mask)):
        assert torch.equal(a, b)


@torch.no_grad()
def test_vae_normalises_as_the_pipeline_and_codes_a_batch(folders):
    from diffusers import AutoencoderKLHunyuanVideo15

    vae = load_vae_from_config(load_config(None, settings(folders)).vae)
    assert (vae.latent_channels, vae.temporal_compression, vae.spatial_compression) == (4, 4, 16)
    z = torch.randn(2, 4, 2, 2, 3)
    torch.testing.assert_close(vae.denormalize(z), z / 1.2, atol=1e-6, rtol=0)  # (the pipeline's latents / scale)
    # a batch of two clips (diffusers' VAE alone fails on it) codes as each clip alone
    ref = AutoencoderKLHunyuanVideo15.from_pretrained(folders["vae"]).requires_grad_(False)
    x = torch.rand(2, 3, 5, 32, 48) * 2 - 1
    with pytest.raises(RuntimeError, match="broadcast"):  # (when diffusers mends it, this goes)
        ref.encode(x)
    mean = torch.cat([ref.encode(x[i:i + 1]).latent_dist.mean for i in range(2)])
    torch.testing.assert_close(vae.encode(x).mean, mean, atol=1e-6, rtol=0)
    video = torch.cat([ref.decode(z[i:i + 1]).sample for i in range(2)])
    torch.testing.assert_close(vae.decode(z), video, atol=1e-6, rtol=0)


@pytest.mark.parametrize("cfg", [1.0, 6.0], ids=["no-cfg", "cfg"])
@torch.no_grad()
def test_generate_matches_hunyuanvideo15pipeline(folders, tmp_path, cfg):
    pipe = load_pipeline(export_checkpoint(tmp_path, settings(folders), text_dim=WIDTH))
    seed, shape = 3, (3, 4, 2, 2, 3)  # 5 x 32 x 48 frames -> 2 x 2 x 3 latents
    ours = generate(pipe, PROMPTS, frames=5, height=32, width=48, steps=STEPS, cfg=cfg, seed=seed)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))  # generate's draw
    ref = reference_pipeline(folders, cfg)
    latents = ref(prompt=PROMPTS, latents=noise, num_inference_steps=STEPS, height=32, width=48, num_frames=5,
                  output_type="latent").frames
    # decoded as the pipeline decodes, one clip at a time: diffusers' VAE fails on a batch of more than one
    frames = torch.cat([ref.video_processor.postprocess_video(
        ref.vae.decode(z[None] / ref.vae.config.scaling_factor).sample, output_type="pt") for z in latents])
    assert frames.shape == (3, 5, 3, 32, 48) and frames.std() > 0.01  # [B, T, 3, H, W] in [0, 1]
    torch.testing.assert_close((ours.permute(0, 2, 1, 3, 4) + 1) / 2, frames, atol=1e-4, rtol=0)


@pytest.mark.parametrize("cfg", [1.0, 6.0], ids=["no-cfg", "cfg"])
@torch.no_grad()
def test_image_to_video_matches_hunyuanvideo15imagetovideopipeline(folders, tmp_path, cfg):
    """model.condition=first_frame with its SigLIP (model.image_encoder): the image's latent and the mask beside the
    noisy latents, its SigLIP states among the text tokens, as HunyuanVideo15ImageToVideoPipeline gives them."""
    from diffusers import HunyuanVideo15ImageToVideoPipeline
    from PIL import Image
    from transformers import SiglipImageProcessor, SiglipVisionModel

    i2v = settings(folders, "model.condition=first_frame", f"model.image_encoder={folders['siglip']}",
                   "model.condition_prob=1.0", "data.width=32")
    pipe = load_pipeline(export_checkpoint(tmp_path, i2v, text_dim=WIDTH))
    assert pipe.model.condition_channels == 5 and pipe.model.clip_image
    g = torch.Generator().manual_seed(5)  # a smooth image: a 4 x 4 random one, upsampled
    small = torch.randint(0, 256, (1, 3, 4, 4), generator=g).float()
    pixels = torch.nn.functional.interpolate(small, size=(32, 32), mode="bilinear").round().to(torch.uint8)
    seed, shape = 3, (3, 4, 2, 2, 2)  # 5 x 32 x 32 frames -> 2 x 2 x 2 latents
    ours = generate(pipe, PROMPTS, frames=5, height=32, width=32, steps=STEPS, cfg=cfg, seed=seed, image=pixels)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))  # generate's draw
    t2v = reference_pipeline(folders, cfg)
    ref = HunyuanVideo15ImageToVideoPipeline(
        **{k: getattr(t2v, k) for k in ("text_encoder", "tokenizer", "transformer", "vae", "scheduler",
                                        "text_encoder_2", "tokenizer_2", "guider")},
        image_encoder=SiglipVisionModel.from_pretrained(folders["siglip"]),
        feature_extractor=SiglipImageProcessor.from_pretrained(folders["root"] / "feature_extractor"))
    ref.prompt_template_encode_start_idx, ref.tokenizer_max_length = folders["crop"], LENGTH
    ref.target_size = 32  # (its size buckets: a 32 x 32 image stays 32 x 32)
    ref.set_progress_bar_config(disable=True)
    image = Image.fromarray(pixels[0].permute(1, 2, 0).numpy())
    latents = ref(image=image, prompt=PROMPTS, latents=noise, num_inference_steps=STEPS, num_frames=5,
                  output_type="latent").frames
    frames = torch.cat([ref.video_processor.postprocess_video(
        ref.vae.decode(z[None] / ref.vae.config.scaling_factor).sample, output_type="pt") for z in latents])
    assert frames.shape == (3, 5, 3, 32, 32) and frames.std() > 0.01
    torch.testing.assert_close((ours.permute(0, 2, 1, 3, 4) + 1) / 2, frames, atol=1e-4, rtol=0)
    other = generate(pipe, PROMPTS, frames=5, height=32, width=32, steps=STEPS, cfg=cfg, seed=seed,
                     image=pixels.flip(-1))
    assert (other - ours).abs().max() > 1e-3  # the image reaches the model


def test_config_errors_name_the_fix(folders, tmp_path):
    base = settings(folders)
    with pytest.raises(ConfigError, match="model.family=hunyuan15 takes text.encoder=hunyuan15"):
        load_config(None, [s for s in base if not s.startswith("text.")])
    with pytest.raises(ConfigError, match="text.path_2=.*ByT5"):
        load_config(None, [s for s in base if not s.startswith("text.path_2")])
    with pytest.raises(ConfigError, match="set vae.family=hunyuan15"):
        load_config(None, [*[s for s in base if not s.startswith("vae.")], "vae.family=hunyuan"])
    with pytest.raises(ConfigError, match="HunyuanVideo 1.5's text encoders: set model.family=hunyuan15"):
        load_config(None, ["text.encoder=hunyuan15", "text.path=/x", "text.path_2=/y"])
    i2v = [*base, "model.condition=first_frame", "model.condition_prob=1.0"]
    from dit.training.train import check_inputs

    with pytest.raises(ConfigError, match="model.image_encoder is not set: a HunyuanVideo 1.5 image-to-video "
                       "transformer takes the first frame's SigLIP states; pass model.image_encoder=/local/"):
        check_inputs(load_config(None, i2v))  # (dit train's check; `dit plan` runs without it)
    with pytest.raises(ConfigError, match="model.image_encoder: is for a Wan 2.1 or HunyuanVideo 1.5 image-to-video "
                       "transformer .model.family=wan or hunyuan15.; remove it"):
        load_config(None, [f"model.image_encoder={folders['siglip']}"])  # (our DiT takes none)
    with pytest.raises(ConfigError, match="model.condition_prob: must be 1 for HunyuanVideo 1.5"):
        load_config(None, [*i2v, f"model.image_encoder={folders['siglip']}", "model.condition_prob=0.9"])
    from dit.models.text import text_width

    missing = load_config(None, [*base, f"text.path_2={tmp_path / 'text_encoder_2'}"])
    with pytest.raises(FileNotFoundError, match="text.path_2 .* has no config.json.*ByT5"):
        text_width(missing.text)
    from dit.models.text_hunyuan15 import HunyuanVideo15TextEncoder

    with pytest.raises(ValueError, match="text.crop_start=500 cuts the whole chat"):
        HunyuanVideo15TextEncoder(folders["qwen"], folders["byt5"], crop_start=500)
    from dit.models.families import build_denoiser

    t2v = build_denoiser(load_config(None, base).model, 4, WIDTH)
    text, mask = build_text_encoder(load_config(None, base).text).encode(["a red circle"])
    x = torch.randn(1, 4, 2, 2, 3)
    with pytest.raises(ValueError, match="takes no image .trained with model.condition=none"):
        t2v(x, torch.tensor([500.0]), text, mask, condition=torch.zeros(1, 5, 2, 2, 3),
            image_states=torch.zeros(1, 16, 8))
    with pytest.raises(ValueError, match="latent condition and its SigLIP states together"):
        t2v(x, torch.tensor([500.0]), text, mask, condition=torch.zeros(1, 5, 2, 2, 3))
    with pytest.raises(ValueError, match="ByT5 states of the text are \\[8\\] wide .* takes 12"):
        split_glyph(torch.tensor([[[0.0, 8.0], [1.0, 1.0]]]), torch.ones(1, 2, dtype=torch.bool), 12)
    with pytest.raises(ValueError, match="header counts \\[3\\] ByT5 tokens but a row holds 1 tokens"):
        split_glyph(torch.tensor([[[3.0, 12.0], [1.0, 1.0]]]), torch.ones(1, 2, dtype=torch.bool), 12)


def test_a_step_distilled_transformer_is_refused_by_name(folders, tmp_path):
    """A MeanFlow (use_meanflow) transformer takes the next step's timestep too: refused, not run without it."""
    from tiny_families import tiny_transformer

    from dit.models.families import build_denoiser

    distilled = tmp_path / "distilled"
    tiny_transformer("hunyuan15", use_meanflow=True).save_pretrained(distilled)
    cfg = load_config(None, [f"model.pretrained={distilled}" if s.startswith("model.pretrained") else s
                             for s in settings(folders)])
    with pytest.raises(ConfigError, match="step-distilled .MeanFlow: use_meanflow. HunyuanVideo 1.5 transformer"):
        build_denoiser(cfg.model, in_channels=4, text_dim=WIDTH, load_weights=False)
