"""A Wan 2.1 I2V transformer (image_dim; model.condition=first_frame, model.image_encoder) trains from raw shards
through the same loop: each row's condition is WanImageToVideoPipeline.prepare_latents's for its first frame and the
CLIP states its encode_image's (zeros where the condition is dropped), and the checkpoint samples from an image."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from runs import MEDIA_FREE
from test_family_training import losses, wan_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_clip import WIDTH, save_tiny_clip  # noqa: E402

from data_pipelines.loader import build_loader  # noqa: E402
from dit.config import ConfigError  # noqa: E402
from dit.encode import encode_shards  # noqa: E402
from dit.export import load_weights  # noqa: E402
from dit.models.image_encoder import ImageEncoder  # noqa: E402
from dit.models.text import NoText  # noqa: E402
from dit.models.vae import load_vae_from_config  # noqa: E402
from dit.training import train  # noqa: E402
from dit.training.batch import RandomStreams, draw_batch  # noqa: E402

SEED = 1  # draw_batch's stream: it keeps some rows' condition and drops others'
pytestmark = pytest.mark.skipif(MEDIA_FREE, reason="Wan 2.1 I2V trains from raw shards (pixels), absent here")
I2V = {"model.condition": "first_frame", "text.max_length": 512, "model.family_config.image_dim": WIDTH,
       "model.family_config.added_kv_proj_dim": 24}  # (beside the tiny WAN sizes of wan_config)


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("wan21_i2v"))


def test_the_drawn_condition_is_the_pipelines(tmp_path: Path, small_shards: str, wan_vae: Path, clip: Path) -> None:
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline

    cfg = wan_config(tmp_path, tmp_path / "run", small_shards, wan_vae, **I2V, **{
        "model.image_encoder": clip, "model.condition_prob": 0.5, "model.condition_noise": 0.0})
    vae = load_vae_from_config(cfg.vae).eval()
    encoder = ImageEncoder(clip)
    video = torch.rand(4, 3, 5, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1  # [B, 3, T, H, W]
    batch = {"video": video, "caption": ["a", "b", "c", "d"]}
    drawn = draw_batch(batch, vae, NoText(16), cfg.diffusion, (1, 2, 2), RandomStreams(SEED),
                       torch.device("cpu"), None, cfg.model, "first", encoder)
    condition, states = drawn[5], drawn[6]
    kept = condition.flatten(1).abs().amax(1) > 0  # [B]
    assert 0 < kept.sum() < 4  # (this seed keeps some rows and drops some)
    ref = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, transformer=None,
                                  vae=AutoencoderKLWan.from_pretrained(wan_vae),
                                  scheduler=FlowMatchEulerDiscreteScheduler(), image_encoder=encoder.model,
                                  image_processor=encoder.processor)
    noise = torch.zeros_like(drawn[0])
    for i in torch.nonzero(kept).flatten().tolist():
        first = video[i:i + 1, :, 0]  # [1, 3, H, W]
        pixels = ((first + 1) * 127.5).round() / 127.5 - 1  # the 8-bit image a user would give
        _, want = ref.prepare_latents(first, 1, 16, 16, 16, 5, torch.float32, "cpu", None, noise[i:i + 1])
        torch.testing.assert_close(condition[i:i + 1], want, atol=1e-5, rtol=1e-5)
        from PIL import Image

        picture = Image.fromarray(((pixels[0] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())
        torch.testing.assert_close(states[i:i + 1], ref.encode_image(picture, "cpu"))
    assert not condition[~kept].any() and not states[~kept].any()


def test_a_wan21_i2v_model_trains_from_raw_and_latent_shards_alike_and_samples(tmp_path: Path, small_shards: str,
                                                                             wan_vae: Path, clip: Path) -> None:
    """From raw shards the image code and CLIP states are made each step; `dit encode` stores them (the latent run
    then loads no CLIP encoder) and the losses are the same."""
    common = {**I2V, "model.image_encoder": clip, "train.steps": 3, "train.checkpoint_every": 3,
              "model.condition_prob": 0.75}
    run = tmp_path / "run"
    ckpt = train.main(wan_config(tmp_path, run, small_shards, wan_vae, **common))
    weights, config = load_weights(ckpt)
    assert config["dit"]["diffusers"]["image_dim"] == WIDTH and config["dit"]["condition_channels"] == 20
    assert config["experiment"]["model"]["image_encoder"] == str(clip)
    assert any("add_k_proj" in k for k in weights) and all(torch.isfinite(w).all() for w in weights.values())
    a = losses(run)
    assert len(a) == 3 and all(torch.isfinite(torch.tensor(a)))

    latents = tmp_path / "latents"
    cfg = wan_config(tmp_path, tmp_path / "enc", small_shards, wan_vae, **common)
    assert encode_shards(small_shards, latents, cfg, batch_size=8)["samples"] == 64
    sample = next(iter(build_loader(replace(cfg.data, shards=str(latents), latents=True, shuffle_buffer=1), 2,
                                    infinite=False)))
    assert sample["image_code"].shape == sample["mean"].shape and sample["image_states"].shape == (2, 17, WIDTH)
    latent_run = tmp_path / "latent"
    from PIL import Image  # (the latent run also logs a sample from an image: it loads CLIP for that alone)

    Image.fromarray(torch.randint(0, 256, (16, 16, 3), dtype=torch.uint8).numpy()).save(tmp_path / "first.png")
    train.main(wan_config(tmp_path, latent_run, str(latents), wan_vae, **common, **{
        "data.latents": "true", "train.sample_prompts": '["a red circle"]', "sample.steps": 2,
        "train.sample_images": f'["{tmp_path / "first.png"}"]'}))
    torch.testing.assert_close(torch.tensor(losses(latent_run)), torch.tensor(a), rtol=1e-5, atol=1e-6)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(latent_run / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert events.Tags()["images"] == ["samples/0"]

    from dit.pipeline import generate, load_pipeline

    pipe = load_pipeline(run)
    assert pipe.image is not None and pipe.model.clip_image
    image = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8)
    video = generate(pipe, ["a red circle"], frames=5, height=16, width=16, steps=2, image=image)
    assert video.shape == (1, 3, 5, 16, 16) and torch.isfinite(video).all()
    with pytest.raises(ValueError, match="--image"):
        generate(pipe, ["a red circle"], frames=5, height=16, width=16, steps=2)

    # latent shards made for a text-to-video Wan hold no image inputs: refused before any work
    plain = tmp_path / "plain"
    encode_shards(small_shards, plain, wan_config(tmp_path, tmp_path / "enc2", small_shards, wan_vae), batch_size=8)
    with pytest.raises(ConfigError, match=r"holds no image-to-video inputs \(KEY.image_code.npy, "
                                          r"KEY.image_states.npy\)"):
        train.main(wan_config(tmp_path, tmp_path / "refused", str(plain), wan_vae, **common,
                              **{"data.latents": "true"}))
    with pytest.raises(ConfigError, match="model.image_encoder is not set"):
        encode_shards(small_shards, tmp_path / "nothing", wan_config(tmp_path, tmp_path / "enc3", small_shards,
                                                                     wan_vae, **I2V))


def test_a_wan21_flf2v_model_draws_the_pipelines_condition_and_trains_from_raw_and_latent_shards_alike(
        tmp_path: Path, small_shards: str, wan_vae: Path, clip: Path) -> None:
    """A Wan 2.1 FLF2V transformer (pos_embed_seq_len): each kept row's condition is prepare_latents's with the
    clip's first and last frames, its CLIP states encode_image's of both; raw and `dit encode` latent shards give
    the same losses, and shards encoded for a first-frame model are refused."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline
    from PIL import Image

    flf = {**I2V, "model.family_config.pos_embed_seq_len": 34, "model.image_encoder": clip}
    cfg = wan_config(tmp_path, tmp_path / "run", small_shards, wan_vae, **flf, **{
        "model.condition_prob": 0.5, "model.condition_noise": 0.0})
    vae, encoder = load_vae_from_config(cfg.vae).eval(), ImageEncoder(clip)
    video = torch.rand(4, 3, 5, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1  # [B, 3, T, H, W]
    drawn = draw_batch({"video": video, "caption": ["a", "b", "c", "d"]}, vae, NoText(16), cfg.diffusion, (1, 2, 2),
                       RandomStreams(SEED), torch.device("cpu"), None, cfg.model, "first_last", encoder)
    condition, states = drawn[5], drawn[6]
    kept = condition.flatten(1).abs().amax(1) > 0  # [B]
    assert 0 < kept.sum() < 4 and states.shape == (4, 34, WIDTH)
    ref = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, transformer=None,
                                  vae=AutoencoderKLWan.from_pretrained(wan_vae),
                                  scheduler=FlowMatchEulerDiscreteScheduler(), image_encoder=encoder.model,
                                  image_processor=encoder.processor)
    for i in torch.nonzero(kept).flatten().tolist():
        first, last = video[i:i + 1, :, 0], video[i:i + 1, :, -1]  # [1, 3, H, W]
        _, want = ref.prepare_latents(first, 1, 16, 16, 16, 5, torch.float32, "cpu", None,
                                      torch.zeros_like(drawn[0][:1]), last_image=last)
        torch.testing.assert_close(condition[i:i + 1], want, atol=1e-5, rtol=1e-5)
        pictures = [Image.fromarray(((x[0] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())
                    for x in (first, last)]
        torch.testing.assert_close(states[i:i + 1], ref.encode_image(pictures, "cpu").reshape(1, 34, -1))
    assert not condition[~kept].any() and not states[~kept].any()

    common = {**flf, "train.steps": 2, "train.checkpoint_every": 2, "model.condition_prob": 0.75}
    train.main(wan_config(tmp_path, tmp_path / "raw", small_shards, wan_vae, **common))
    latents = tmp_path / "latents"
    encode_shards(small_shards, latents, wan_config(tmp_path, tmp_path / "enc", small_shards, wan_vae, **common),
                  batch_size=8)
    train.main(wan_config(tmp_path, tmp_path / "latent", str(latents), wan_vae, **common, **{"data.latents": "true"}))
    a = losses(tmp_path / "raw")
    assert len(set(a)) == 2
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "latent")), torch.tensor(a), rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="FLF2V model takes a clip's first and last frames in different latent "
                                          "frames, so its clips need more than 4 frames .got 1"):
        train.main(wan_config(tmp_path, tmp_path / "images", small_shards, wan_vae, **common, **{"data.frames": 1}))
    # these shards record the first and last frame: a first-frame Wan 2.1 I2V run is refused them before any work
    with pytest.raises(ConfigError, match="holds the image inputs of the first and last frame, this run's model "
                                          "takes the first frame"):
        train.main(wan_config(tmp_path, tmp_path / "refused", str(latents), wan_vae, **I2V, **{
            "model.image_encoder": clip, "data.latents": "true"}))


def test_a_wan21_i2v_run_refuses_what_it_cannot_train(tmp_path: Path, small_shards: str, wan_vae: Path,
                                                      clip: Path) -> None:
    def refused(match: str, **extra: object) -> None:
        with pytest.raises(ConfigError, match=match):
            train.main(wan_config(tmp_path, tmp_path / "run", small_shards, wan_vae, **{**I2V, **extra}))

    refused("model.image_encoder is not set")
    refused("text.max_length=32: .* set text.max_length=512", **{"model.image_encoder": clip,
                                                                "text.max_length": 32})
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_a_lora_run_adapts_the_image_projections_as_diffusers_loads_them(tmp_path: Path, small_shards: str,
                                                                       wan_vae: Path, clip: Path) -> None:
    """LoRA on a Wan 2.1 I2V folder trains the image key / value projections too; diffusers' own transformer with
    the adapter file (load_lora_adapter) gives our output, CLIP states and condition included."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models" / "families"))
    from tiny_families import tiny_transformer

    from dit.export import list_checkpoints
    from dit.models.lora import LORA_FILE
    from dit.pipeline import load_pipeline

    folder = tmp_path / "transformer"
    tiny_transformer("wan", in_channels=36, out_channels=16, text_dim=384, image_dim=WIDTH,
                     added_kv_proj_dim=24).save_pretrained(folder)
    run = tmp_path / "run"
    cfg = wan_config(tmp_path, run, small_shards, wan_vae, **{
        "model.condition": "first_frame", "text.max_length": 512, "model.image_encoder": clip,
        "model.pretrained": folder, "train.steps": 2, "train.checkpoint_every": 2, "train.lr": 3e-2,
        "train.ema_decay": 0.0, "train.lora.rank": 4})
    train.main(cfg)
    ckpt = list_checkpoints(run)[-1]
    from safetensors import safe_open

    with safe_open(ckpt / LORA_FILE, "pt") as f:
        keys = list(f.keys())
    assert any("attn2.add_k_proj.lora_A" in k for k in keys) and any("attn2.add_v_proj.lora_B" in k for k in keys)

    compare_with_diffusers(load_pipeline(run, text=NoText(384)), folder, ckpt)


@torch.no_grad()
def compare_with_diffusers(ours, folder: Path, ckpt: Path) -> None:
    from diffusers import WanTransformer3DModel

    from dit.models.lora import LORA_FILE

    g = torch.Generator().manual_seed(0)
    x, cond = torch.randn(2, 16, 2, 2, 2, generator=g), torch.randn(2, 20, 2, 2, 2, generator=g)
    text, states = torch.randn(2, 512, 384, generator=g), torch.randn(2, 17, WIDTH, generator=g)
    t = torch.tensor([800.0, 250.0])
    adapted = WanTransformer3DModel.from_pretrained(folder).eval()
    adapted.load_lora_adapter(str(ckpt), weight_name=LORA_FILE, prefix="transformer")
    theirs = adapted(torch.cat([x, cond], 1), t, text, encoder_hidden_states_image=states, return_dict=False)[0]
    plain = WanTransformer3DModel.from_pretrained(folder).eval()
    base = plain(torch.cat([x, cond], 1), t, text, encoder_hidden_states_image=states, return_dict=False)[0]
    mine = ours.model(x, t, text, torch.ones(2, 512, dtype=torch.bool), condition=cond, image_states=states)
    assert (theirs - base).abs().max() > 1e-3  # the adapter changes the output
    torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=0)


def test_an_expert_run_draws_its_noise_levels_only(tmp_path: Path, small_shards: str, wan_vae: Path) -> None:
    """Wan 2.2 A14B's experts: diffusion.sigma_min / sigma_max bound the training noise levels (the law restricted:
    tests/diffusion/test_flow.py), and an I2V transformer of the code form without CLIP (Wan 2.2 I2V A14B) draws
    its condition with no seventh tensor."""
    video = torch.rand(4, 3, 5, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    batch = {"video": video, "caption": ["a", "b", "c", "d"]}
    for lo, hi in ((0.9, 1.0), (0.0, 0.9)):
        cfg = wan_config(tmp_path, tmp_path / "run", small_shards, wan_vae, **{
            "model.condition": "first_frame", "model.family_config.in_channels": 36,
            "model.family_config.out_channels": 16, "diffusion.sigma_min": lo, "diffusion.sigma_max": hi})
        vae = load_vae_from_config(cfg.vae).eval()
        drawn = draw_batch(batch, vae, NoText(16), cfg.diffusion, (1, 2, 2), RandomStreams(SEED),
                           torch.device("cpu"), None, cfg.model, code="first")
        t = drawn[3]
        assert len(drawn) == 6 and drawn[5].shape == (4, 20, 2, 2, 2)
        assert ((t >= lo) & (t <= hi)).all() and t.max() - t.min() > 0.01 * (hi - lo)
