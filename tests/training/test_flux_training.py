"""FLUX.1 trains through the same loop as the video families, on images: a tiny FluxTransformer2DModel folder on a
tiny image VAE, with its T5 + CLIP pair (text.encoder=flux), from raw shards (each clip's first frame) and from
`dit encode` latent shards alike (all the T5 states stored: FLUX.1 reads the padding's); its checkpoint samples an
image with `dit sample`; a LoRA run's adapter loads into diffusers' own transformer and FluxPipeline with our
outputs."""

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
from tiny_flux import POOLED, WIDTH, save_tiny_flux  # noqa: E402

from dit.export import list_checkpoints  # noqa: E402
from dit.models.lora import LORA_FILE  # noqa: E402
from dit.training import train  # noqa: E402

LENGTH = 20  # T5 tokens: more than the captions fill
SIZE = ["data.frames=1", "data.height=32", "data.width=32"]  # 4 x 4 latents, 2 x 2 packed tokens
# raw runs decode clips (PyAV) and read the MiniLM tokenizer files the tiny encoders use
pytestmark = pytest.mark.skipif(MEDIA_FREE, reason="needs PyAV and the MiniLM package (not media-free mode)")


@pytest.fixture(scope="module")
def flux(tmp_path_factory) -> dict[str, Path]:
    """A folder laid out as the FLUX.1-dev Diffusers download (tiny random parts) and a config for it."""
    f = save_tiny_flux(tmp_path_factory.mktemp("flux"))
    f["config"] = write_config(
        f["root"] / "flux.yaml", model={"family": "flux", "pretrained": str(f["transformer"])},
        vae={"family": "flux", "pretrained": str(f["vae"])},
        text={"encoder": "flux", "path": str(f["t5"]), "path_2": str(f["clip"]), "max_length": LENGTH,
              "padding": "unmasked"},
        diffusion={"objective": "flow", "dynamic_shift": True, "flow_grid": "steps", "prompt_dropout": 0.5,
                   "timestep_sampling": "logit_normal"},
        sample={"sampler": "flow_euler", "steps": 2, "cfg": 1.0})
    return f


def config(f: dict[str, Path], run: Path, shards: str, **extra: object):
    return run_config(f["config"], run, shards, *SIZE, **extra)


def test_trains_from_raw_and_latent_shards_alike_and_samples(flux: dict[str, Path], small_shards: str,
                                                             tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    def every_t5_state(latents: Path) -> None:  # all of them stored, after the pooled row
        files = first_latent_sample(latents)
        text, mask = files["text"], files["text_mask"]
        assert text.shape == (1 + LENGTH, WIDTH) and 2 < mask.sum() < 1 + LENGTH and mask[0] == 1
        assert np.count_nonzero(text[0, :POOLED]) == POOLED and not text[0, POOLED:].any()
        assert np.abs(text[mask == 0]).sum() > 0  # the padding's states are kept, not zeros

    ckpt, _ = raw_then_latent(flux["config"], small_shards, tmp_path, *SIZE, check_shards=every_t5_state,
                              raw={"train.sample_prompts": "[a red circle]", "train.sample_every": 2})
    raw = tmp_path / "raw"
    saved = json.loads((ckpt / "config.json").read_text())
    assert saved["dit"]["family"] == "flux" and saved["dit"]["guidance"] == 1.0
    assert list((raw / "tensorboard").glob("events.*"))  # the logged sample images went somewhere

    from PIL import Image

    from dit.cli import main as dit

    for guidance, said in (([], "3.5"), (["--guidance", "5"], "5")):
        out = tmp_path / f"image{len(guidance)}.png"
        dit(["sample", "--checkpoint", str(raw), "--prompt", "a red circle", "--steps", "2", "--out", str(out),
             *guidance])
        assert Image.open(out).size == (32, 32)
        assert f"cfg 1, embedded guidance {said}, seed 0" in capsys.readouterr().err
    assert Image.open(tmp_path / "image0.png").tobytes() != Image.open(tmp_path / "image2.png").tobytes()


def test_a_lora_adapter_loads_into_diffusers(flux: dict[str, Path], small_shards: str, tmp_path: Path) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from dit.pipeline import load_pipeline, sample_latents

    run = tmp_path / "lora"
    train.main(config(flux, run, small_shards, **{"train.steps": 3, "train.checkpoint_every": 3, "train.lr": 3e-2,
                                                  "train.ema_decay": 0.0, "train.lora.rank": 4,
                                                  "train.lora.alpha": 8}))
    ckpt = list_checkpoints(run)[-1]
    ours = load_pipeline(run)  # base + adapter, as `dit sample --checkpoint RUN` samples
    g = torch.Generator().manual_seed(0)
    x, sigma = torch.randn(2, 4, 1, 4, 6, generator=g), torch.tensor([0.8, 0.25])
    text, pooled = torch.randn(2, LENGTH, WIDTH, generator=g), torch.randn(2, POOLED, generator=g)
    packed = torch.cat([torch.nn.functional.pad(pooled, (0, WIDTH - POOLED))[:, None], text], 1)
    mask = torch.ones(2, 1 + LENGTH, dtype=torch.bool)
    tokens = FluxPipeline._pack_latents(x[:, :, 0], 2, 4, 4, 6)
    ids = FluxPipeline._prepare_latent_image_ids(2, 2, 3, "cpu", torch.float32)

    def call(model):
        return model(hidden_states=tokens, timestep=sigma, guidance=torch.full((2,), 3.5), pooled_projections=pooled,
                     encoder_hidden_states=text, txt_ids=torch.zeros(LENGTH, 3), img_ids=ids, return_dict=False)[0]

    with torch.no_grad():
        base_out = call(FluxTransformer2DModel.from_pretrained(flux["transformer"]).eval())
        adapted = FluxTransformer2DModel.from_pretrained(flux["transformer"]).eval()
        adapted.load_lora_adapter(str(ckpt), weight_name=LORA_FILE, prefix="transformer")
        theirs = FluxPipeline._unpack_latents(call(adapted), 32, 48, 8)[:, :, None]
        assert (theirs - FluxPipeline._unpack_latents(base_out, 32, 48, 8)[:, :, None]).abs().max() > 1e-3
        torch.testing.assert_close(ours.model(x, sigma * 1000, packed, mask, guidance=3.5), theirs, atol=1e-4, rtol=0)
        # `dit to-diffusers`: the adapter merged into its base, as a folder diffusers loads without peft
        from dit.diffusers_export import export_diffusers

        merged = FluxTransformer2DModel.from_pretrained(export_diffusers(run, tmp_path / "merged")).eval()
        torch.testing.assert_close(FluxPipeline._unpack_latents(call(merged), 32, 48, 8)[:, :, None], theirs,
                                   atol=1e-4, rtol=0)

        scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                    base_image_seq_len=256, max_image_seq_len=4096)
        pipe = FluxPipeline(tokenizer=None, text_encoder=None, tokenizer_2=None, text_encoder_2=None,
                            vae=None, scheduler=scheduler,
                            transformer=FluxTransformer2DModel.from_pretrained(flux["transformer"]))
        pipe.vae_scale_factor = 8
        pipe.load_lora_weights(str(ckpt))  # finds pytorch_lora_weights.safetensors, as for any diffusers LoRA
        pipe.set_progress_bar_config(disable=True)
        ref = pipe(prompt_embeds=text, pooled_prompt_embeds=pooled, latents=tokens.clone(), num_inference_steps=3,
                   guidance_scale=3.5, height=32, width=48, output_type="latent").images
        got = sample_latents(ours, x, dict(text=packed, text_mask=mask, guidance=3.5),
                             dict(text=packed, text_mask=mask, guidance=3.5), steps=3, cfg=1.0)
        torch.testing.assert_close(got, FluxPipeline._unpack_latents(ref, 32, 48, 8)[:, :, None], atol=1e-4, rtol=0)


def test_trains_on_image_buckets(flux: dict[str, Path], tmp_path: Path) -> None:
    """data.buckets with frames [1]: 4:3 images train in the 4:3 bucket (64 x 48: 8 x 6 latents, 4 x 3 tokens)."""
    from data_pipelines.synthetic import make_synthetic

    make_synthetic(tmp_path / "shards", num_clips=16, frames=1, height=48, width=64, clips_per_shard=16)
    run = tmp_path / "run"
    cfg = config(flux, run, str(tmp_path / "shards" / "00000.tar"),
                 **{"train.steps": 2, "train.checkpoint_every": 2, "train.batch_size": 2, "data.shuffle_buffer": 4,
                    "data.buckets.enabled": "true", "data.buckets.frames": "[1]", "data.buckets.resolution": 48,
                    "data.buckets.multiple": 16})
    train.main(cfg)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(round(r["tokens_per_s"] / r["samples_per_s"]) == 12 for r in rows)
