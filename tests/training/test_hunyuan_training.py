"""HunyuanVideo trains through the same loop as the other families: a tiny HunyuanVideoTransformer3DModel folder
on a tiny HunyuanVideo VAE, with its two text encoders (text.encoder=hunyuan), from raw shards and from `dit encode`
latent shards alike (the pooled row stored with the text); its checkpoint samples with `dit sample`; a LoRA run's
adapter loads into diffusers' own transformer and HunyuanVideoPipeline with our outputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from family_runs import first_latent_sample, losses, raw_then_latent, run_config, write_config
from runs import MEDIA_FREE

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models" / "families"))
from tiny_families import tiny_transformer  # noqa: E402
from tiny_hunyuan import POOLED, WIDTH, crop_start, save_tiny_text  # noqa: E402
from tiny_vaes import save_tiny_vae  # noqa: E402

from dit.export import list_checkpoints  # noqa: E402
from dit.models.lora import LORA_FILE  # noqa: E402
from dit.training import train  # noqa: E402

LENGTH = 24  # Llama tokens after the template: more than the captions fill (latent shards keep the real ones)
# raw runs decode clips (PyAV) and read the MiniLM tokenizer files the tiny encoders use
pytestmark = pytest.mark.skipif(MEDIA_FREE, reason="needs PyAV and the MiniLM package (not media-free mode)")


@pytest.fixture(scope="module")
def hunyuan(tmp_path_factory) -> Path:
    """A folder laid out as the HunyuanVideo Diffusers download (tiny random parts) and a config for it."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("hunyuan")
    llama, clip = save_tiny_text(root)
    save_tiny_vae("hunyuan", root / "vae", seed=1)
    tiny_transformer("hunyuan").save_pretrained(root / "transformer")
    write_config(root / "hunyuan.yaml", model={"family": "hunyuan", "pretrained": str(root / "transformer")},
                 vae={"family": "hunyuan", "pretrained": str(root / "vae")},
                 text={"encoder": "hunyuan", "path": str(llama), "path_2": str(clip), "max_length": LENGTH,
                       "crop_start": crop_start(AutoTokenizer.from_pretrained(root / "tokenizer"))},
                 diffusion={"objective": "flow", "shift": 7.0, "flow_grid": "steps", "prompt_dropout": 0.5},
                 sample={"sampler": "flow_euler", "steps": 2, "cfg": 1.0})
    return root


def config(root: Path, run: Path, shards: str, **extra: object):
    return run_config(root / "hunyuan.yaml", run, shards, **extra)


def test_trains_from_raw_and_latent_shards_alike_and_samples(hunyuan: Path, small_shards: str, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    def pooled_row_then_real_tokens(latents: Path) -> None:
        text = first_latent_sample(latents)["text"]
        assert 2 < text.shape[0] < 1 + LENGTH and text.shape[1] == WIDTH  # (the padding is rebuilt when it loads)
        assert np.count_nonzero(text[0, :POOLED]) == POOLED and not text[0, POOLED:].any()

    ckpt, _ = raw_then_latent(hunyuan / "hunyuan.yaml", small_shards, tmp_path,
                              check_shards=pooled_row_then_real_tokens)
    raw = tmp_path / "raw"
    saved = json.loads((ckpt / "config.json").read_text())
    assert saved["dit"]["family"] == "hunyuan" and saved["dit"]["guidance"] == 1.0

    from PIL import Image

    from dit.cli import main as dit

    for guidance, said in (([], "6"), (["--guidance", "3.5"], "3.5")):
        out = tmp_path / f"clip{len(guidance)}.gif"
        dit(["sample", "--checkpoint", str(raw), "--prompt", "a red circle moving left", "--steps", "2",
             "--out", str(out), *guidance])
        gif = Image.open(out)
        assert (gif.n_frames, gif.size) == (5, (16, 16))
        assert f"cfg 1, embedded guidance {said}, seed 0" in capsys.readouterr().err
    assert Image.open(tmp_path / "clip0.gif").tobytes() != Image.open(tmp_path / "clip2.gif").tobytes()


def test_a_skyreels_image_to_video_model_trains_and_samples_from_an_image(hunyuan: Path, small_shards: str,
                                                                          tmp_path: Path) -> None:
    """model.condition=first_frame on a SkyReels V1 transformer (in_channels 2C): the first frame's latents beside
    the noisy ones in training, and `dit sample --image` continues a given frame (another image, other frames)."""
    from PIL import Image

    from dit.cli import main as dit

    tiny_transformer("hunyuan", in_channels=8, out_channels=4).save_pretrained(tmp_path / "skyreels")
    run = tmp_path / "run"
    ckpt = train.main(config(hunyuan, run, small_shards, **{"model.pretrained": tmp_path / "skyreels",
                                                              "model.condition": "first_frame"}))
    assert json.loads((ckpt / "config.json").read_text())["dit"]["condition_channels"] == 4
    assert len(set(losses(run))) == 4 and all(np.isfinite(losses(run)))
    gen = torch.Generator().manual_seed(2)
    for name in ("a", "b"):
        pixels = torch.randint(0, 256, (16, 16, 3), generator=gen, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(tmp_path / f"{name}.png")
        dit(["sample", "--checkpoint", str(run), "--prompt", "a red circle", "--steps", "2", "--cfg", "3",
             "--guidance", "1", "--image", str(tmp_path / f"{name}.png"), "--out", str(tmp_path / f"{name}.gif")])
    a, b = (Image.open(tmp_path / f"{n}.gif") for n in ("a", "b"))
    assert a.n_frames == 5 and a.tobytes() != b.tobytes()


def test_guidance_of_a_model_without_it_is_refused_before_sampling(tmp_path: Path, small_shards: str,
                                                                   small_vae: Path) -> None:
    """`dit sample --guidance` on a checkpoint whose model has no embedded guidance: one line, exit 2."""
    import subprocess

    from runs import ROOT, small_config

    run = tmp_path / "dit"
    train.main(small_config(run, small_shards, small_vae, **{"train.steps": 1, "train.checkpoint_every": 1}))
    done = subprocess.run([sys.executable, "-m", "dit.cli", "sample", "--checkpoint", str(run), "--prompt", "x",
                           "--guidance", "6", "--out", str(tmp_path / "x.gif")], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--guidance is the embedded guidance scale of a guidance-distilled HunyuanVideo" in done.stderr
    assert not (tmp_path / "x.gif").exists()


def test_a_lora_adapter_loads_into_diffusers(hunyuan: Path, small_shards: str, tmp_path: Path) -> None:
    run = tmp_path / "lora"
    train.main(config(hunyuan, run, small_shards, **{"train.steps": 3, "train.checkpoint_every": 3,
                                                       "train.lr": 3e-2, "train.ema_decay": 0.0,
                                                       "train.lora.rank": 4, "train.lora.alpha": 8}))
    with torch.no_grad():
        check_adapter(hunyuan, run)
    from dit.config import ConfigError
    from dit.lora_export import export_lora

    with pytest.raises(ConfigError, match="written for Wan models; this adapter is for model.family=hunyuan"):
        export_lora(run, tmp_path / "comfyui.safetensors")


def check_adapter(hunyuan: Path, run: Path) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline, HunyuanVideoTransformer3DModel

    from dit.pipeline import load_pipeline, sample_latents

    ckpt = list_checkpoints(run)[-1]
    ours = load_pipeline(run)  # base + adapter, as `dit sample --checkpoint RUN` samples
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 3, 4, 6, generator=g), torch.tensor([800.0, 250.0])
    text, pooled = torch.randn(2, LENGTH, WIDTH, generator=g), torch.randn(2, POOLED, generator=g)
    mask = torch.ones(2, LENGTH, dtype=torch.bool)
    mask[1, 5:] = False
    guidance = torch.full((2,), 6000.0)
    packed = torch.cat([torch.nn.functional.pad(pooled, (0, WIDTH - POOLED))[:, None], text], 1)
    packed_mask = torch.cat([torch.ones(2, 1, dtype=torch.bool), mask], 1)

    def call(model):
        return model(hidden_states=x, timestep=t, encoder_hidden_states=text, encoder_attention_mask=mask,
                     pooled_projections=pooled, guidance=guidance, return_dict=False)[0]

    base_out = call(HunyuanVideoTransformer3DModel.from_pretrained(hunyuan / "transformer").eval())
    adapted = HunyuanVideoTransformer3DModel.from_pretrained(hunyuan / "transformer").eval()
    adapted.load_lora_adapter(str(ckpt), weight_name=LORA_FILE, prefix="transformer")
    theirs = call(adapted)
    assert (theirs - base_out).abs().max() > 1e-3  # the adapter changes the output
    torch.testing.assert_close(ours.model(x, t, packed, packed_mask, guidance=6.0), theirs, atol=1e-4, rtol=0)

    pipe = HunyuanVideoPipeline(tokenizer=None, text_encoder=None, tokenizer_2=None, text_encoder_2=None, vae=None,
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
                                transformer=HunyuanVideoTransformer3DModel.from_pretrained(hunyuan / "transformer"))
    pipe.load_lora_weights(str(ckpt))  # finds pytorch_lora_weights.safetensors, as for any diffusers LoRA
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt_embeds=text, prompt_attention_mask=mask, pooled_prompt_embeds=pooled, latents=x.clone(),
               num_inference_steps=3, guidance_scale=6.0, height=32, width=48, num_frames=9,
               output_type="latent").frames
    got = sample_latents(ours, x, dict(text=packed, text_mask=packed_mask, guidance=6.0),
                         dict(text=packed, text_mask=packed_mask, guidance=6.0), steps=3, cfg=1.0)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
