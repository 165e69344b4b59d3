"""A LoRA run on a tiny Wan (a diffusers folder): its adapter file loads into diffusers' own WanTransformer3DModel
(`load_lora_adapter`) and WanPipeline (`load_lora_weights`), and their outputs equal ours (base + adapter, as `dit
sample` loads a LoRA run) within 1e-4."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml
from runs import DEMO, MEDIA_FREE, small_overrides

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models" / "families"))
from tiny_families import tiny_transformer  # noqa: E402
from tiny_vaes import save_tiny_vae  # noqa: E402

from dit.config import load_config  # noqa: E402
from dit.export import list_checkpoints  # noqa: E402
from dit.models.lora import LORA_FILE  # noqa: E402
from dit.models.text import NoText  # noqa: E402
from dit.pipeline import load_pipeline, sample_latents  # noqa: E402
from dit.training import train  # noqa: E402

TEXT = 384  # the packaged MiniLM's width, what the demo config's text encoder gives

# the runs encode clips through the Wan VAE with the packaged MiniLM; media-free shards hold the demo VAE's latents
pytestmark = pytest.mark.skipif(MEDIA_FREE, reason="needs PyAV and the MiniLM package (not media-free mode)")


@pytest.fixture(scope="module")
def wan_lora(tmp_path_factory, small_shards: str) -> tuple[Path, Path]:
    """(the tiny Wan transformer folder, a LoRA run on it)."""
    root = tmp_path_factory.mktemp("wan_lora")
    tiny_transformer("wan", in_channels=16, out_channels=16, text_dim=TEXT).save_pretrained(root / "transformer")
    save_tiny_vae("wan", root / "vae")
    data = yaml.safe_load(DEMO.read_text())
    data["model"] = {"family": "wan", "pretrained": str(root / "transformer")}
    data["vae"] = {"family": "wan", "pretrained": str(root / "vae")}
    data["diffusion"] = {"objective": "flow", "shift": 3.0}
    data["sample"] = {"sampler": "flow_euler"}
    (root / "wan.yaml").write_text(yaml.safe_dump(data))
    run = root / "run"
    train.main(load_config(root / "wan.yaml", small_overrides(run, small_shards, None, **{
        "train.steps": 3, "train.checkpoint_every": 3, "train.lr": 3e-2, "train.ema_decay": 0.0,
        "train.lora.rank": 4, "train.lora.alpha": 8})))
    return root / "transformer", run


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 3, 4, 6, generator=g)  # [B, C, t, h, w]
    text = torch.randn(2, 5, TEXT, generator=g)
    return x, text


@torch.no_grad()
def test_the_adapter_loads_into_diffusers_transformer_and_pipeline(wan_lora) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    folder, run = wan_lora
    ckpt = list_checkpoints(run)[-1]
    ours = load_pipeline(run, text=NoText(TEXT))  # what `dit sample --checkpoint RUN` samples: base + adapter
    x, text = inputs()
    t = torch.tensor([800.0, 250.0])

    plain = WanTransformer3DModel.from_pretrained(folder).eval()
    base_out = plain(x, t, text, return_dict=False)[0]
    adapted = WanTransformer3DModel.from_pretrained(folder).eval()
    adapted.load_lora_adapter(str(ckpt), weight_name=LORA_FILE, prefix="transformer")
    theirs = adapted(x, t, text, return_dict=False)[0]
    mine = ours.model(x, t, text, torch.ones(2, 5, dtype=torch.bool))
    assert (theirs - base_out).abs().max() > 1e-3  # the adapter changes the output
    torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=0)

    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                       transformer=WanTransformer3DModel.from_pretrained(folder))
    pipe.load_lora_weights(str(ckpt))  # finds pytorch_lora_weights.safetensors, as for any diffusers LoRA
    pipe.set_progress_bar_config(disable=True)
    neg = torch.zeros_like(text)
    ref = pipe(prompt_embeds=text, negative_prompt_embeds=neg, latents=x.clone(), num_inference_steps=3,
               guidance_scale=4.0, height=32, width=48, num_frames=9, output_type="latent").frames
    mask = torch.ones(2, 5, dtype=torch.bool)
    got = sample_latents(ours, x, dict(text=text, text_mask=mask), dict(text=neg, text_mask=mask), steps=3, cfg=4.0)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    # and with the pipeline's own sampler (Wan's released scheduler_config: UniPC on flow sigmas), 4 steps: both
    # orders of predictor and corrector
    pipe.scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    ref = pipe(prompt_embeds=text, negative_prompt_embeds=neg, latents=x.clone(), num_inference_steps=4,
               guidance_scale=4.0, height=32, width=48, num_frames=9, output_type="latent").frames
    got = sample_latents(ours, x, dict(text=text, text_mask=mask), dict(text=neg, text_mask=mask), steps=4, cfg=4.0,
                         sampler="flow_unipc")
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


@torch.no_grad()
def test_the_comfyui_export_loads_into_diffusers_with_the_same_output(wan_lora, tmp_path) -> None:
    """`dit lora export RUN --out F` writes Wan's original module names under diffusion_model. with lora_down /
    lora_up / alpha (ComfyUI's layout for Wan); diffusers' own converter of such files loads it into WanPipeline,
    and the transformer then gives our output (1e-4), every adapted module included."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from safetensors.torch import load_file

    from dit.cli import main as dit
    from dit.config import ConfigError
    from dit.lora_export import export_lora

    folder, run = wan_lora
    out = tmp_path / "wan_comfyui.safetensors"
    dit(["lora", "export", str(run), "--out", str(out)])
    tensors = load_file(out)
    ckpt = list_checkpoints(run)[-1]
    ours_file = load_file(ckpt / LORA_FILE)
    assert len(tensors) == 3 * len(ours_file) // 2  # down, up and alpha per adapted module
    assert "diffusion_model.blocks.0.self_attn.q.lora_down.weight" in tensors
    assert "diffusion_model.blocks.1.ffn.2.lora_up.weight" in tensors
    assert all(float(v) == 8.0 for k, v in tensors.items() if k.endswith(".alpha"))  # train.lora.alpha
    assert not any("attn1" in k or "to_q" in k for k in tensors)

    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(),
                       transformer=WanTransformer3DModel.from_pretrained(folder))
    pipe.load_lora_weights(str(out))  # diffusers converts the original names back
    x, text = inputs(1)
    t = torch.tensor([700.0, 120.0])
    ours = load_pipeline(run, text=NoText(TEXT))
    want = ours.model(x, t, text, torch.ones(2, 5, dtype=torch.bool))
    plain = WanTransformer3DModel.from_pretrained(folder).eval()(x, t, text, return_dict=False)[0]
    got = pipe.transformer.eval()(x, t, text, return_dict=False)[0]
    assert (got - plain).abs().max() > 1e-3
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    with pytest.raises(ConfigError, match="exists; give a new file"):
        export_lora(run, out)
    with pytest.raises(ConfigError, match="write a .safetensors file"):
        export_lora(run, tmp_path / "x.pt")
