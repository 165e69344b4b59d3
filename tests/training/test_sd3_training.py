"""Stable Diffusion 3 trains through the same loop, on images: a tiny SD3Transformer2DModel folder (SD3.5's form) on
a tiny image VAE with its three text encoders (text.encoder=sd3), from raw shards (each clip's first frame) and from
`dit encode` latent shards alike (all CLIP and T5 states stored); its checkpoint samples with `dit sample`; a LoRA
run's adapter loads into diffusers' own transformer and StableDiffusion3Pipeline with our outputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from family_runs import first_latent_sample, raw_then_latent, run_config, write_config
from runs import MEDIA_FREE

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_sd3 import POOLED, WIDTH, save_tiny_sd3  # noqa: E402

from dit.export import list_checkpoints  # noqa: E402
from dit.models.lora import LORA_FILE  # noqa: E402
from dit.training import train  # noqa: E402

LENGTH = 12  # T5 tokens: more than the captions fill
ROWS = 1 + 77 + LENGTH  # the pooled row, CLIP-L | CLIP-G, T5
SIZE = ["data.frames=1", "data.height=32", "data.width=32"]  # 4 x 4 latents, 2 x 2 patches
# raw runs decode clips (PyAV) and read the MiniLM tokenizer files the tiny encoders use
pytestmark = pytest.mark.skipif(MEDIA_FREE, reason="needs PyAV and the MiniLM package (not media-free mode)")


@pytest.fixture(scope="module")
def sd3(tmp_path_factory) -> dict[str, Path]:
    """A folder laid out as the Stable Diffusion 3.5 Diffusers download (tiny random parts) and a config for it."""
    f = save_tiny_sd3(tmp_path_factory.mktemp("sd3"))
    f["config"] = write_config(
        f["root"] / "sd3.yaml", model={"family": "sd3", "pretrained": str(f["transformer"])},
        vae={"family": "sd3", "pretrained": str(f["vae"])},
        text={"encoder": "sd3", "path": str(f["t5"]), "path_2": str(f["clip_l"]), "path_3": str(f["clip_g"]),
              "max_length": LENGTH, "padding": "unmasked"},
        diffusion={"objective": "flow", "shift": 3.0, "prompt_dropout": 0.5, "timestep_sampling": "logit_normal"},
        sample={"sampler": "flow_euler", "steps": 2, "cfg": 5.0})
    return f


def config(f: dict[str, Path], run: Path, shards: str, **extra: object):
    return run_config(f["config"], run, shards, *SIZE, **extra)


def test_trains_from_raw_and_latent_shards_alike_and_samples(sd3: dict[str, Path], small_shards: str,
                                                             tmp_path: Path) -> None:
    def every_state(latents: Path) -> None:  # all of them stored, after the pooled row
        files = first_latent_sample(latents)
        text, mask = files["text"], files["text_mask"]
        assert text.shape == (ROWS, WIDTH) and 2 < mask.sum() < ROWS and mask[0] == 1
        assert np.count_nonzero(text[0, :POOLED]) == POOLED

    ckpt, _ = raw_then_latent(sd3["config"], small_shards, tmp_path, *SIZE, check_shards=every_state)
    raw = tmp_path / "raw"
    assert json.loads((ckpt / "config.json").read_text())["dit"]["family"] == "sd3"

    from PIL import Image

    from dit.cli import main as dit

    dit(["sample", "--checkpoint", str(raw), "--prompt", "a red circle", "--steps", "2", "--out",
         str(tmp_path / "image.png")])
    assert Image.open(tmp_path / "image.png").size == (32, 32)


def test_a_lora_adapter_loads_into_diffusers(sd3: dict[str, Path], small_shards: str, tmp_path: Path) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    from dit.pipeline import load_pipeline, sample_latents

    run = tmp_path / "lora"
    train.main(config(sd3, run, small_shards, **{"train.steps": 3, "train.checkpoint_every": 3, "train.lr": 3e-2,
                                                 "train.ema_decay": 0.0, "train.lora.rank": 4,
                                                 "train.lora.alpha": 8}))
    ckpt = list_checkpoints(run)[-1]
    ours = load_pipeline(run)  # base + adapter, as `dit sample --checkpoint RUN` samples
    g = torch.Generator().manual_seed(0)
    x, sigma = torch.randn(2, 4, 1, 4, 6, generator=g), torch.tensor([0.8, 0.25])
    text, pooled = torch.randn(2, ROWS - 1, WIDTH, generator=g), torch.randn(2, POOLED, generator=g)
    packed = torch.cat([pooled[:, None], text], 1)  # (POOLED == WIDTH: the row is the pooled embeddings)
    mask = torch.ones(2, ROWS, dtype=torch.bool)

    def call(model):
        return model(hidden_states=x[:, :, 0], timestep=sigma * 1000, encoder_hidden_states=text,
                     pooled_projections=pooled, return_dict=False)[0][:, :, None]

    with torch.no_grad():
        base_out = call(SD3Transformer2DModel.from_pretrained(sd3["transformer"]).eval())
        adapted = SD3Transformer2DModel.from_pretrained(sd3["transformer"]).eval()
        adapted.load_lora_adapter(str(ckpt), weight_name=LORA_FILE, prefix="transformer")
        theirs = call(adapted)
        assert (theirs - base_out).abs().max() > 1e-3  # the adapter changes the output
        torch.testing.assert_close(ours.model(x, sigma * 1000, packed, mask), theirs, atol=1e-4, rtol=0)

        pipe = StableDiffusion3Pipeline(tokenizer=None, text_encoder=None, tokenizer_2=None, text_encoder_2=None,
                                        tokenizer_3=None, text_encoder_3=None, vae=None,
                                        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                        transformer=SD3Transformer2DModel.from_pretrained(sd3["transformer"]))
        pipe.vae_scale_factor = 8
        pipe.load_lora_weights(str(ckpt))  # finds pytorch_lora_weights.safetensors, as for any diffusers LoRA
        pipe.set_progress_bar_config(disable=True)
        ref = pipe(prompt_embeds=text, pooled_prompt_embeds=pooled, negative_prompt_embeds=text.flip(0),
                   negative_pooled_prompt_embeds=pooled.flip(0), latents=x[:, :, 0].clone(), num_inference_steps=3,
                   guidance_scale=4.0, height=32, width=48, output_type="latent").images
        got = sample_latents(ours, x, dict(text=packed, text_mask=mask), dict(text=packed.flip(0), text_mask=mask),
                             steps=3, cfg=4.0)
        torch.testing.assert_close(got, ref[:, :, None], atol=1e-4, rtol=0)
