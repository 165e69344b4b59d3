"""A tiny pretrained-family model trains through the same loop as ours: a Wan transformer (diffusers'
WanTransformer3DModel, random tiny sizes) on a tiny Wan VAE folder, rectified flow, from raw shards and from
`dit encode` latent shards of that VAE (the same losses), and its checkpoint samples with `dit sample` alone."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from family_runs import losses
from runs import DEMO, small_overrides

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit.config import ConfigError, load_config  # noqa: E402
from dit.encode import encode_shards  # noqa: E402
from dit.export import load_weights  # noqa: E402
from dit.training import train  # noqa: E402

WAN = dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=12, ffn_dim=32, num_layers=2,
           freq_dim=256, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


def wan_config(tmp: Path, out: Path, shards: str, vae: Path, **extra: object):
    """configs/demo.yaml with a Wan transformer, the Wan VAE folder and the flow objective."""
    data = yaml.safe_load(DEMO.read_text())
    data["model"] = {"family": "wan", "family_config": WAN}
    data["vae"] = {"family": "wan", "pretrained": str(vae)}
    data["diffusion"] = {"objective": "flow", "timestep_sampling": "logit_normal", "shift": 3.0,
                         "prompt_dropout": 0.1}
    data["sample"] = {"sampler": "flow_euler", "steps": 2, "cfg": 4.0}
    path = tmp / f"wan-{out.name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path, small_overrides(out, shards, None, **extra))


def test_a_wan_model_trains_from_raw_and_latent_shards_alike_and_samples(tmp_path: Path, small_shards: str,
                                                                        wan_vae: Path) -> None:
    common = {"train.steps": 4, "train.checkpoint_every": 4, "diffusion.prompt_dropout": 0.5}
    raw = tmp_path / "raw"
    ckpt = train.main(wan_config(tmp_path, raw, small_shards, wan_vae, **common))
    weights, config = load_weights(ckpt)
    assert config["dit"]["family"] == "wan" and all(k.startswith("transformer.") for k in weights)
    assert json.loads((ckpt / "vae" / "vae.json").read_text())["family"] == "wan"  # recorded, not copied
    assert all(torch.isfinite(w).all() for w in weights.values())

    latents = tmp_path / "latents"
    cfg = wan_config(tmp_path, tmp_path / "enc", small_shards, wan_vae)
    assert encode_shards(small_shards, latents, cfg, batch_size=8)["samples"] == 64
    latent_run = tmp_path / "latent"
    train.main(wan_config(tmp_path, latent_run, str(latents), wan_vae, **common, **{"data.latents": "true"}))
    a, b = losses(raw), losses(latent_run)
    assert len(a) == 4 and len({round(x, 6) for x in a}) == 4
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-5, atol=1e-6)

    # The frozen parts in bf16 (vae.dtype, text.dtype) train on the same fp32-encoded shards (the VAE digest is its
    # fp32 weights'); only the dropped prompts' states (the text encoder's, in bf16) differ
    half_run = tmp_path / "half"
    half = train.main(wan_config(tmp_path, half_run, str(latents), wan_vae, **common,  # (no text.cache_dir: the
                                 **{"data.latents": "true", "vae.dtype": "bf16", "text.dtype": "bf16",  # encoder
                                    "text.cache_dir": "null"}))  # loads, in bf16, as checked below)
    assert json.loads((half / "vae" / "vae.json").read_text())["dtype"] == "bf16"
    from dit.pipeline import load_pipeline

    pipe = load_pipeline(half_run)
    assert next(pipe.vae.parameters()).dtype == next(pipe.text.parameters()).dtype == torch.bfloat16
    c = losses(half_run)
    assert c != b
    torch.testing.assert_close(torch.tensor(c), torch.tensor(b), rtol=1e-3, atol=0)  # measured 1.9e-5 apart

    from dit.cli import main as dit

    out = tmp_path / "clip.gif"
    dit(["sample", "--checkpoint", str(raw), "--prompt", "a red circle moving left", "--steps", "2",
         "--out", str(out)])
    from PIL import Image

    gif = Image.open(out)
    assert (gif.n_frames, gif.size) == (5, (16, 16))  # the trained size, through the Wan VAE's decoder
    dit(["sample", "--checkpoint", str(half_run), "--prompt", "a red circle moving left", "--steps", "2",
         "--out", str(tmp_path / "half.gif")])
    assert Image.open(tmp_path / "half.gif").n_frames == 5


def test_a_wan_model_refuses_the_diffusion_objective(tmp_path: Path, small_shards: str, wan_vae: Path) -> None:
    with pytest.raises(ConfigError, match="diffusion.objective=flow"):
        wan_config(tmp_path, tmp_path / "run", small_shards, wan_vae, **{"diffusion.objective": "diffusion",
                                                                          "sample.sampler": "ddim"})
