"""Image-to-video (model.condition=first_frame): the conditioning's construction, the DiT's extra input channels,
the checks before any work, and a tiny training run whose samples continue the given first frame."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
from runs import small_config

from dit.config import ConfigError, ModelConfig
from dit.models.condition import condition_channels, draw_first_frame_condition, first_frame_condition
from dit.models.dit import DiT, build_dit
from dit.models.vae import CausalVAE

C, T, H, W = 4, 3, 2, 5  # latent channels and grid of the unit tests


# ----------------------------------------------------------------------------- the conditioning


def test_first_frame_condition_puts_the_latent_at_t0_zeros_after_and_a_mask() -> None:
    first = torch.randn(2, C, 1, H, W)
    cond = first_frame_condition(first, T)
    assert cond.shape == (2, C + 1, T, H, W)
    assert torch.equal(cond[:, :C, 0], first[:, :, 0])  # the latent at t = 0
    assert not cond[:, :C, 1:].any()  # zeros at every later latent frame
    assert (cond[:, C, 0] == 1).all() and not cond[:, C, 1:].any()  # the mask: 1 at t = 0 only
    dropped = first_frame_condition(first, T, keep=torch.tensor([True, False]))
    assert torch.equal(dropped[0], cond[0]) and not dropped[1].any()  # a dropped row: all zeros, the mask too
    assert condition_channels("none", C) == 0 and condition_channels("first_frame", C) == C + 1
    with pytest.raises(ValueError, match="first-frame latent"):
        first_frame_condition(torch.randn(2, C, 2, H, W), T)


def test_condition_prob_0_gives_zeros_and_1_always_the_first_frame() -> None:
    first = torch.randn(64, C, 1, H, W)
    never = draw_first_frame_condition(first, T, prob=0.0, noise_std=0.1, generator=torch.Generator().manual_seed(0))
    assert never.shape == (64, C + 1, T, H, W) and not never.any()
    always = draw_first_frame_condition(first, T, prob=1.0, noise_std=0.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(always, first_frame_condition(first, T))  # every row, and no noise at std 0
    some = draw_first_frame_condition(first, T, prob=0.5, noise_std=0.0, generator=torch.Generator().manual_seed(0))
    kept = some[:, C, 0].flatten(1).amax(dim=1) == 1  # [B]
    assert 10 < int(kept.sum()) < 54  # about half
    assert torch.equal(some[kept], always[kept]) and not some[~kept].any()


def test_condition_noise_is_small_per_row_and_the_draws_do_not_depend_on_prob() -> None:
    first = torch.randn(256, C, 1, H, W)
    gens = [torch.Generator().manual_seed(1) for _ in range(2)]
    noisy = draw_first_frame_condition(first, T, prob=1.0, noise_std=0.05, generator=gens[0])
    draw_first_frame_condition(first, T, prob=0.3, noise_std=0.05, generator=gens[1])
    assert torch.equal(gens[0].get_state(), gens[1].get_state())  # the same draws whatever prob is
    diff = noisy[:, :C, 0] - first[:, :, 0]
    per_row = diff.flatten(1).std(dim=1)  # each row's std, uniform in [0, 0.05]
    assert 0 < float(per_row.max()) < 0.065 and float(per_row.min()) < 0.01
    assert 0.02 < float(per_row.mean()) < 0.03
    assert not noisy[:, :, 1:].any()  # the later frames stay zero


def test_the_causal_vae_codes_frame_0_alone_so_latent_frame_0_is_the_image_latent() -> None:
    torch.manual_seed(0)
    vae = CausalVAE(latent_channels=4, base_channels=8, channel_mults=(1, 1, 1, 1)).eval()
    clip = torch.rand(2, 3, 9, 16, 16) * 2 - 1
    with torch.no_grad():
        whole, alone = vae.encode(clip).mean, vae.encode(clip[:, :, :1]).mean  # [B, C, 3, 2, 2], [B, C, 1, 2, 2]
    torch.testing.assert_close(whole[:, :, :1], alone, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- the DiT and the config


def test_a_first_frame_dit_takes_2c_plus_1_input_channels_and_keeps_c_out() -> None:
    cfg = ModelConfig(preset="dit-tiny", depth=1, hidden_size=32, num_heads=2, patch_size=[1, 1, 1],
                      condition="first_frame")
    model = build_dit(cfg, in_channels=C, text_dim=8)
    assert model.x_embed.in_features == 2 * C + 1 and model.config["condition_channels"] == C + 1
    torch.nn.init.normal_(model.final.linear.weight)  # (zero at init: make the output depend on the input)
    x, t = torch.randn(2, C, T, H, W), torch.tensor([10, 500])
    text, mask = torch.randn(2, 3, 8), torch.ones(2, 3, dtype=torch.bool)
    cond = first_frame_condition(torch.randn(2, C, 1, H, W), T)
    out = model(x, t, text, mask, condition=cond)
    assert out.shape == (2, C, T, H, W)
    assert torch.equal(model(x, t, text, mask), model(x, t, text, mask, condition=torch.zeros_like(cond)))  # None
    assert not torch.equal(out, model(x, t, text, mask))  # the condition is seen
    rebuilt = DiT(**{**model.config, "patch_size": tuple(model.config["patch_size"])})  # as a checkpoint reloads it
    assert rebuilt.x_embed.in_features == 2 * C + 1


def test_the_default_dit_is_unchanged_and_refuses_a_condition() -> None:
    model = build_dit(ModelConfig(preset="dit-tiny", depth=1, hidden_size=32, num_heads=2), in_channels=C, text_dim=8)
    assert "condition_channels" not in model.config and model.x_embed.in_features == C * 1 * 2 * 2
    with pytest.raises(ValueError, match="takes no condition"):
        model(torch.randn(1, C, 1, 4, 4), torch.tensor([1]), torch.randn(1, 2, 8), torch.ones(1, 2, dtype=torch.bool),
              condition=torch.zeros(1, C + 1, 1, 4, 4))


def test_config_checks_the_condition() -> None:
    """(Which transformer folders take the condition: tests/models/families/test_errors.py.)"""
    for bad, match in [({"condition": "last_frame"}, "model.condition"), ({"condition_prob": 1.5}, "condition_prob"),
                       ({"condition_noise": -0.1}, "condition_noise")]:
        with pytest.raises(ConfigError, match=match):
            ModelConfig(**bad)


# ----------------------------------------------------------------------------- training and sampling


@pytest.fixture(scope="module")
def sharp_vae(tmp_path_factory, small_vae: Path) -> Path:
    """small_vae (3 training steps) with a trained VAE's sharp posterior: its log-variance output set to -12 (std
    0.0025; at 3 steps it is still about 1, which would bury the latents in posterior noise 5x their scale)."""
    from dit.models.vae import load_vae, save_vae

    vae = load_vae(small_vae)
    conv = vae.encoder.conv_out.conv  # 2C outputs: mean, then log-variance
    with torch.no_grad():
        conv.weight[vae.latent_channels:] = 0
        conv.bias[vae.latent_channels:] = -12.0
    out = tmp_path_factory.mktemp("sharp_vae") / "vae"
    save_vae(vae, out)
    return out


@pytest.fixture(scope="module")
def i2v_run(tmp_path_factory, small_shards: str, sharp_vae: Path) -> Path:
    from dit.encode import encode_shards
    from dit.training import train

    run = tmp_path_factory.mktemp("i2v") / "run"
    # Trained from latent shards (encoded once, not in each of the 200 steps: the same training, for CI time);
    # the condition is drawn from the posterior sample's frame 0 there too.
    latents = tmp_path_factory.mktemp("i2v_latents")
    encode_shards(small_shards, latents, small_config(run, small_shards, sharp_vae), batch_size=16)
    # flow: its x0 estimates stay bounded at high noise, where eps prediction's do not (at 120 steps they reached 200)
    cfg = small_config(run, str(latents), sharp_vae, **{
        "data.latents": "true", "model.condition": "first_frame", "model.condition_prob": 1.0,
        "diffusion.objective": "flow", "diffusion.min_snr_gamma": "null", "sample.sampler": "null",
        "train.steps": 200, "train.lr": 2e-3, "train.checkpoint_every": 1000, "train.log_every": 20})
    train.main(cfg)
    return run


def first_frame_of(color: str, shape: str, direction: str) -> np.ndarray:
    """Frame 0 of a synthetic clip at the test size (16 x 16): uint8 [16, 16, 3]."""
    import random

    from data_pipelines.synthetic import render_clip

    video, _ = render_clip(color, shape, direction, frames=5, height=16, width=16, rng=random.Random(7))
    return video[0]


def test_a_first_frame_run_samples_latents_that_start_from_the_given_image(i2v_run: Path) -> None:
    """Measured in latent space: the 3-step test VAE's decoder cannot draw, but its encoder defines the image's
    latent, and the DiT must learn to put that latent at frame 0 when it is given (and cannot without it)."""
    from dit.export import load_weights
    from dit.pipeline import generate, image_condition, load_pipeline, sample_latents

    _, config = load_weights(sorted((i2v_run / "checkpoints").iterdir())[-1])
    assert config["experiment"]["model"]["condition"] == "first_frame"  # what `dit sample` reads
    pipe = load_pipeline(i2v_run)
    c = pipe.vae.latent_channels
    shape = (1, c, *pipe.vae.latent_shape(5, 16, 16))  # [1, C, t, h, w]
    errors = []
    for prompt, attrs in [("a red circle moving left", ("red", "circle", "left")),
                          ("a blue square moving up", ("blue", "square", "up")),
                          ("a green triangle moving right", ("green", "triangle", "right"))]:
        image = torch.as_tensor(first_frame_of(*attrs)).permute(2, 0, 1)[None]  # uint8 [1, 3, 16, 16]
        first = image_condition(pipe, image, shape)[:, :c, :1]  # the image's normalized latent [1, C, 1, h, w]
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        states, mask = pipe.text.encode([prompt, ""])
        cond, uncond = dict(text=states[:1], text_mask=mask[:1]), dict(text=states[1:], text_mask=mask[1:])
        given = sample_latents(pipe, noise, cond, uncond, steps=10, image=image)
        plain = sample_latents(pipe, noise, cond, uncond, steps=10)
        errors.append((float((given[:, :, :1] - first).square().mean()),
                       float((plain[:, :, :1] - first).square().mean())))
    # frame 0 nearer the image's latent with the image than from the prompt alone, for each prompt, and on average
    # well nearer (ratios at 200 steps: 0.74, 0.61, 0.41; at 120 steps 0.84, 0.80, 0.79)
    ratios = [g / p for g, p in errors]
    assert max(ratios) < 0.95 and sum(ratios) / len(ratios) < 0.8, errors
    clip = generate(pipe, ["a red circle moving left"], frames=5, height=16, width=16, steps=2, seed=0,
                    image=torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    assert clip.shape == (1, 3, 5, 16, 16)
    with pytest.raises(ValueError, match="sampling size"):
        generate(pipe, ["x"], frames=5, height=16, width=16, steps=1, image=torch.zeros(1, 3, 8, 8))


def sample_args(*argv: str) -> argparse.Namespace:
    from dit.cli import build_parser

    return build_parser().parse_args(["sample", *argv])


def test_dit_sample_image_resizes_the_image_and_writes_the_clip(i2v_run: Path, tmp_path: Path) -> None:
    from PIL import Image

    from dit.sample import run_sample

    image = np.repeat(np.repeat(first_frame_of("red", "circle", "left"), 4, axis=0), 6, axis=1)  # 64 x 96
    Image.fromarray(image).save(tmp_path / "first.png")
    out = tmp_path / "clip.gif"
    run_sample(sample_args("--checkpoint", str(i2v_run), "--prompt", "a red circle moving left", "--steps", "3",
                           "--image", str(tmp_path / "first.png"), "--out", str(out)))
    gif = Image.open(out)
    assert gif.n_frames == 5 and gif.size == (16, 16)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ConfigError, match="bad.png.*cannot decode image"):
        run_sample(sample_args("--checkpoint", str(i2v_run), "--prompt", "x", "--image", str(tmp_path / "bad.png"),
                               "--out", str(tmp_path / "x.mp4")))


def test_dit_sample_image_is_refused_before_loading_for_a_text_to_video_run(
        tmp_path: Path, small_shards: str, small_vae: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    import dit.sample
    from dit.training import train

    run = tmp_path / "t2v"
    train.main(small_config(run, small_shards, small_vae, **{"train.steps": 1}))
    Image.fromarray(first_frame_of("red", "circle", "left")).save(tmp_path / "first.png")
    monkeypatch.setattr(dit.sample, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ConfigError, match="model.condition=none, so it cannot continue a given first frame"):
        dit.sample.run_sample(sample_args("--checkpoint", str(run), "--prompt", "x", "--image",
                                          str(tmp_path / "first.png"), "--out", str(tmp_path / "x.mp4")))
    with pytest.raises(ConfigError, match="does not exist"):
        dit.sample.run_sample(sample_args("--checkpoint", str(run), "--prompt", "x", "--image",
                                          str(tmp_path / "missing.png"), "--out", str(tmp_path / "x.mp4")))


def test_a_first_frame_run_logs_samples_from_its_sample_images(tmp_path: Path, small_shards: str, small_vae: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """train.sample_images: the clips logged during training continue each prompt's image, resized and cropped to
    the training size as `dit sample --image` does; the config refuses a count that differs from the prompts', a
    missing file, and images for a text-to-video model."""
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dit.pipeline import read_image
    from dit.training import run_log, train

    image = np.repeat(np.repeat(first_frame_of("red", "circle", "left"), 4, axis=0), 6, axis=1)  # 64 x 96
    Image.fromarray(image).save(tmp_path / "first.png")
    given, real = [], run_log.generate

    def generate(*args, **kwargs):
        given.append(kwargs.get("image"))
        return real(*args, **kwargs)

    monkeypatch.setattr(run_log, "generate", generate)  # (what log_samples calls)
    settings = {"model.condition": "first_frame", "train.sample_prompts": '["a red circle moving left"]',
                "sample.steps": 2, "train.steps": 1}
    run = tmp_path / "run"
    train.main(small_config(run, small_shards, small_vae, **settings,
                            **{"train.sample_images": f'["{tmp_path / "first.png"}"]'}))
    assert len(given) == 1 and given[0].shape == (1, 3, 16, 16)
    torch.testing.assert_close(given[0], read_image(tmp_path / "first.png", 16, 16))
    assert given[0].float().std() > 0.1  # the picture, not a blank
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert events.Tags()["images"] == ["samples/0"]

    for extra, match in ((f'["{tmp_path / "first.png"}", "{tmp_path / "first.png"}"]', "has 2 images for 1"),
                         (f'["{tmp_path / "missing.png"}"]', "do not exist"),):
        with pytest.raises(ConfigError, match=match):
            small_config(run, small_shards, small_vae, **settings, **{"train.sample_images": extra})
    with pytest.raises(ConfigError, match="set model.condition=first_frame"):
        small_config(run, small_shards, small_vae, **{**settings, "model.condition": "none",
                                                      "train.sample_images": f'["{tmp_path / "first.png"}"]'})
