"""`dit plan` sizes a family from its diffusers config alone: parameters on the meta device, tokens from the VAE's
compression and the family's patch."""

from __future__ import annotations

import pytest
import torch
from tiny_families import TINY, tiny_transformer

from dit.config import load_config
from dit.plan import MINILM, estimate, family_vae, model_size

SIZES = ("num_attention_heads", "attention_head_dim", "ffn_dim", "num_layers", "rope_max_seq_len", "patch_size")
DATA = ["text.encoder=none", "data.frames=9", "data.height=32", "data.width=48"]  # latents 3 x 4 x 6, text width 8


@pytest.mark.parametrize("source", ["family_config", "pretrained"])
def test_plan_counts_a_wan_model(source, tmp_path):
    reference = tiny_transformer("wan", text_dim=8)  # what training would build: the VAE's 4 channels, width 8
    if source == "pretrained":
        reference.save_pretrained(tmp_path / "transformer")
        model = [f"model.pretrained={tmp_path / 'transformer'}"]
    else:
        model = [f"model.family_config.{k}={list(TINY['wan'][k]) if k == 'patch_size' else TINY['wan'][k]}"
                 for k in SIZES]
    cfg = load_config(None, ["model.family=wan", "diffusion.objective=flow", *model, *DATA])
    size = model_size(cfg)
    assert size.params == sum(p.numel() for p in reference.parameters())
    assert (size.hidden, size.depth, size.heads) == (24, 2, 2)
    assert size.tokens == 3 * (4 // 2) * (6 // 2)  # the (1, 2, 2) patch on the 3 x 4 x 6 latent grid
    assert all(e.total > 4 * size.params for e in estimate(cfg, gpus=1, gpu_memory_gb=80, size=size))


def test_plan_counts_an_ltx_model():
    """LTX's patch is (1, 1, 1): every latent position is a token."""
    keys = ("num_attention_heads", "attention_head_dim", "cross_attention_dim", "num_layers")
    cfg = load_config(None, ["model.family=ltx", "diffusion.objective=flow",
                             *[f"model.family_config.{k}={TINY['ltx'][k]}" for k in keys], *DATA])
    size = model_size(cfg)
    assert size.params == sum(p.numel() for p in tiny_transformer("ltx", caption_channels=8).parameters())
    assert size.tokens == 3 * 4 * 6


def test_plan_counts_the_frozen_parts_in_their_dtypes():
    """The VAE in vae.dtype, the text encoder in text.dtype: 2 bytes a parameter in bf16, 4 in fp32."""
    base = ["model.family=ltx", "diffusion.objective=flow", "vae.family=ltx", "text.encoder=minilm", *DATA[1:],
            *[f"model.family_config.{k}={TINY['ltx'][k]}" for k in ("num_attention_heads", "attention_head_dim",
                                                                   "num_layers")]]
    frozen = {}
    for vae, text in (("fp32", "fp32"), ("bf16", "fp32"), ("bf16", "bf16")):
        cfg = load_config(None, [*base, f"vae.dtype={vae}", f"text.dtype={text}", "data.height=64", "data.width=64"])
        size = model_size(cfg)
        frozen[vae, text] = next(e for e in estimate(cfg, gpus=1, gpu_memory_gb=80, size=size)).frozen
    with torch.device("meta"):
        vae_params = sum(p.numel() for p in family_vae(cfg.vae).parameters())  # LTX-Video's released VAE
    assert frozen["fp32", "fp32"] == 4 * (vae_params + MINILM[0])
    assert frozen["bf16", "fp32"] == 2 * vae_params + 4 * MINILM[0]
    assert frozen["bf16", "bf16"] == 2 * (vae_params + MINILM[0])


def test_plan_counts_a_wan21_i2v_model_and_its_clip(tmp_path):
    """Wan 2.1 I2V: the transformer with its image projections (in_channels 2C + 4), and the CLIP encoder's
    parameters among the frozen ones, in fp32; without model.image_encoder the plan says it is not counted."""
    from tiny_clip import WIDTH, save_tiny_clip
    from transformers import CLIPVisionModel

    from dit.plan import format_plan

    clip = save_tiny_clip(tmp_path)
    reference = tiny_transformer("wan", text_dim=8, in_channels=12, out_channels=4, image_dim=WIDTH,
                                 added_kv_proj_dim=24)
    reference.save_pretrained(tmp_path / "transformer")
    base = ["model.family=wan", "diffusion.objective=flow", f"model.pretrained={tmp_path / 'transformer'}",
            "model.condition=first_frame", *DATA]
    plain, with_clip = (load_config(None, base + extra) for extra in ([], [f"model.image_encoder={clip}"]))
    size, sized = model_size(plain), model_size(with_clip)
    assert size.params == sized.params == sum(p.numel() for p in reference.parameters())
    clip_params = sum(p.numel() for p in CLIPVisionModel.from_pretrained(clip).parameters())
    assert sized.frozen - size.frozen == clip_params and sized.frozen_bytes - size.frozen_bytes == 4 * clip_params
    assert "CLIP image encoder not counted" in format_plan(plain, 1, 80, estimate(plain, 1, 80, size=size), size)
    text = format_plan(with_clip, 1, 80, estimate(with_clip, 1, 80, size=sized), sized)
    assert "+ CLIP fp32" in text and "not counted: set model.image_encoder" not in text


def test_plan_counts_the_text_encoders_as_they_load(tmp_path):
    """A T5 folder counts its encoder alone (what T5EncoderModel loads; AutoModel would add the decoder, which
    made T5-v1.1-XXL 11.0B instead of 4.76B), and FLUX.1's CLIP beside it; the width is the T5's."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tiny_flux import WIDTH, save_tiny_flux
    from transformers import CLIPTextModel, T5EncoderModel, T5Model

    from dit.plan import text_encoder_size

    f = save_tiny_flux(tmp_path)
    cfg = load_config(None, ["model.family=flux", f"model.pretrained={f['transformer']}", "vae.family=flux",
                             f"vae.pretrained={f['vae']}", "text.encoder=flux", f"text.path={f['t5']}",
                             f"text.path_2={f['clip']}", "text.padding=unmasked", "diffusion.objective=flow",
                             "data.frames=1", "data.height=64", "data.width=64"])
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    t5, clip = T5EncoderModel.from_pretrained(f["t5"]), CLIPTextModel.from_pretrained(f["clip"])
    assert text_encoder_size(cfg) == (count(t5) + count(clip), WIDTH)
    assert count(T5Model.from_pretrained(f["t5"])) > count(t5)  # (the decoder the count leaves out)


def test_plan_counts_sd3s_clips_with_their_projections_and_a_siglip(tmp_path):
    """SD3's two CLIP text encoders load with their text projections (CLIPTextModelWithProjection), and HunyuanVideo
    1.5's image encoder is a SigLIP: the plan counts what loads."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tiny_hunyuan15 import save_tiny_hunyuan15
    from tiny_sd3 import save_tiny_sd3
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, SiglipVisionModel, T5EncoderModel

    from dit.config import ModelConfig
    from dit.plan import image_encoder_size, text_encoder_size

    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    f = save_tiny_sd3(tmp_path / "sd3")
    cfg = load_config(None, ["model.family=sd3", f"model.pretrained={f['transformer']}", "vae.family=sd3",
                             f"vae.pretrained={f['vae']}", "text.encoder=sd3", f"text.path={f['t5']}",
                             f"text.path_2={f['clip_l']}", f"text.path_3={f['clip_g']}", "text.padding=unmasked",
                             "diffusion.objective=flow", "data.frames=1", "data.height=64", "data.width=64"])
    clips = [CLIPTextModelWithProjection.from_pretrained(f[k]) for k in ("clip_l", "clip_g")]
    params, _ = text_encoder_size(cfg)
    assert params == count(T5EncoderModel.from_pretrained(f["t5"])) + sum(map(count, clips))
    assert count(clips[0]) > count(CLIPTextModel.from_pretrained(f["clip_l"]))  # (the projection it counts)
    h = save_tiny_hunyuan15(tmp_path / "hv15")
    siglip = ModelConfig(family="hunyuan15", pretrained=str(h["transformer"]), image_encoder=str(h["siglip"]),
                         condition="first_frame")
    assert image_encoder_size(siglip) == count(SiglipVisionModel.from_pretrained(h["siglip"]))
