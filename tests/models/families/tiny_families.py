"""Tiny random diffusers transformers of each family (sizes as in diffusers' own model tests) and matching inputs."""

from __future__ import annotations

import torch

# Constructor arguments of tiny models: 4 latent channels, text width 16, 2 blocks.
TINY: dict[str, dict] = {
    "wan": dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
                text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", rope_max_seq_len=32),
    "ltx": dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                num_layers=2, qk_norm="rms_norm_across_heads", caption_channels=16),
    "cogvideox": dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=2,
                      text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
                      temporal_compression_ratio=4, max_text_seq_length=6, use_rotary_positional_embeddings=True),
    # one dual-stream and one single-stream block (depth 2); the packed text's last row carries the pooled embedding
    "hunyuan": dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
                    num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=16,
                    pooled_projection_dim=8, rope_axes_dim=(2, 4, 4), guidance_embeds=True),
    # FLUX.1-dev's form: 4 latent channels packed 2 x 2 (in_channels 16), one dual- and one single-stream block
    "flux": dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=True,
                 axes_dims_rope=(4, 6, 6)),
    # SD3.5's form: a second self-attention in block 0 (dual_attention_layers) and QK RMSNorm; patch 2 on 4 channels
    "sd3": dict(sample_size=32, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
                num_attention_heads=2, caption_projection_dim=32, joint_attention_dim=16, pooled_projection_dim=16,
                pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm"),
    # two main layers, one noise and one context refiner; SwiGLU of 8/3 x 32
    "zimage": dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=1,
                   n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[4, 6, 6], axes_lens=[256, 64, 64]),
    # 4 latent channels packed 2 x 2 (in_channels 16; out_channels 4 at its patch 2), two joint blocks
    "qwenimage": dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                      num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(4, 6, 6)),
    # HunyuanVideo 1.5: 4 latent channels + 4 of an image's + a mask (in_channels 9), two dual-stream blocks
    "hunyuan15": dict(in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
                      num_refiner_layers=1, text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=8,
                      rope_axes_dim=(2, 2, 4)),
}
CLASSES = {"wan": "WanTransformer3DModel", "ltx": "LTXVideoTransformer3DModel",
           "cogvideox": "CogVideoXTransformer3DModel", "hunyuan": "HunyuanVideoTransformer3DModel",
           "flux": "FluxTransformer2DModel", "sd3": "SD3Transformer2DModel",
           "zimage": "ZImageTransformer2DModel", "qwenimage": "QwenImageTransformer2DModel",
           "hunyuan15": "HunyuanVideo15Transformer3DModel"}


def tiny_transformer(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A random tiny diffusers transformer; every parameter redrawn so no branch starts at zero."""
    import diffusers

    torch.manual_seed(seed)
    model = getattr(diffusers, CLASSES[family])(**{**TINY[family], **overrides})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def inputs(b: int = 2, grid: tuple[int, int, int] = (3, 4, 6), length: int = 6, seed: int = 1, family: str = ""):
    """Latents [B, 4, t, h, w], timesteps [B], text [B, L, 16] and a mask with padding in the second sample
    (HunyuanVideo 1.5: packed with ByT5 states, ``glyph_parts``)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, *grid, generator=g)
    t = torch.tensor([999.0, 321.5])[:b]
    text = torch.randn(b, length, 16, generator=g)
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[-1, length // 2:] = False
    if family == "hunyuan15":
        text, mask = packed_glyph_text(text, mask, *glyph_parts(b))
    return x, t, text, mask


def glyph_parts(b: int, width: int = 8, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """ByT5 states [B, 3, width] and their mask: 3 quoted-text tokens in the first sample, none in the others."""
    states = torch.randn(b, 3, width, generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(b, 3, dtype=torch.bool)
    mask[0] = True
    return states * mask[..., None], mask


def packed_glyph_text(text, mask, glyph, glyph_mask, extra: int = 2):
    """text.encoder=hunyuan15's layout, written out here on its own (dit/models/text_hunyuan15.py): per row a header
    (ByT5 token count, ByT5 width), the real ByT5 states zero-padded to the text width, then the Qwen states with
    their mask; ``extra`` padding rows after."""
    b, length, d = text.shape
    out = text.new_zeros(b, 1 + glyph.shape[1] + length + extra, d)
    out_mask = mask.new_zeros(b, out.shape[1])
    for i in range(b):
        n = int(glyph_mask[i].sum())
        out[i, 0, :2] = torch.tensor([n, glyph.shape[-1]])
        out[i, 1:1 + n, :glyph.shape[-1]] = glyph[i, :n]
        out[i, 1 + n:1 + n + length] = text[i] * mask[i, :, None]
        out_mask[i, :1 + n] = True
        out_mask[i, 1 + n:1 + n + length] = mask[i]
    return out, out_mask


def export_checkpoint(tmp_path, overrides: list[str], text_dim: int, in_channels: int = 4):
    """A checkpoint of ours (what a run writes) of the model and VAE ``overrides`` configure, ready for
    load_pipeline: tmp_path/run/checkpoints/step-00000001."""
    from dit.config import load_config
    from dit.export import write_export
    from dit.models.families import build_denoiser

    cfg = load_config(None, overrides)
    model = build_denoiser(cfg.model, in_channels=in_channels, text_dim=text_dim)
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000001"
    ckpt.mkdir(parents=True)
    write_export(ckpt, weights=model.state_dict(), config={"dit": model.config, "experiment": cfg.to_dict()},
                 vae=cfg.vae)
    return ckpt
