"""Each family adapter, loaded from a local diffusers folder, gives the diffusers transformer's own output when that
is called as its pipeline calls it; its state dict and config round-trip; its blocks are the diffusers ModuleList."""

from __future__ import annotations

import json
import math

import pytest
import torch
from einops import rearrange
from tiny_families import glyph_parts, inputs, packed_glyph_text, tiny_transformer

from dit.config import ModelConfig
from dit.distributed.parallelize import apply_activation_checkpointing
from dit.models.dit import flops_per_token
from dit.models.families import build_denoiser, denoiser_from_config

FAMILIES = ["wan", "ltx", "cogvideox", "hunyuan", "flux", "sd3", "zimage", "qwenimage", "hunyuan15"]
IMAGE = ("flux", "sd3", "zimage", "qwenimage")  # the image models: latents of one frame
GRID = {f: (1, 4, 6) if f in IMAGE else (3, 4, 6) for f in FAMILIES}
TINY_HEAD_DIM = {"wan": 12, "ltx": 8, "cogvideox": 16, "hunyuan": 10, "flux": 16, "sd3": 16, "zimage": 16,
                 "qwenimage": 16, "hunyuan15": 8}
TINY_WAN_SIZES = dict(num_attention_heads=2, attention_head_dim=12, ffn_dim=32, num_layers=1, rope_max_seq_len=32)


def pipeline_call(family: str, model: torch.nn.Module, x, t, text, mask) -> torch.Tensor:
    """The diffusers transformer called exactly as WanPipeline / LTXPipeline / CogVideoXPipeline call it."""
    _, _, f, h, w = x.shape
    if family == "wan":  # T5 states are zero after each prompt (_get_t5_prompt_embeds); no mask
        return model(hidden_states=x, timestep=t, encoder_hidden_states=text * mask[..., None],
                     return_dict=False)[0]
    if family == "ltx":  # packed tokens, the mask, rope scale (temporal / frame_rate, spatial, spatial)
        from diffusers import LTXPipeline

        out = model(hidden_states=LTXPipeline._pack_latents(x), encoder_hidden_states=text, timestep=t,
                    encoder_attention_mask=mask, num_frames=f, height=h, width=w,
                    rope_interpolation_scale=(8 / 25, 32, 32), return_dict=False)[0]
        return LTXPipeline._unpack_latents(out, f, h, w)
    if family == "hunyuan":  # the pooled row split off the Llama states and mask, embedded guidance 1.0 x 1000
        return model(hidden_states=x, timestep=t, encoder_hidden_states=text[:, 1:],
                     encoder_attention_mask=mask[:, 1:], pooled_projections=text[:, 0, :8],
                     guidance=torch.full((x.shape[0],), 1000.0), return_dict=False)[0]
    if family == "flux":  # 2 x 2 packed tokens with (0, row, column) ids, sigma, every T5 state (no mask), guidance
        from diffusers import FluxPipeline

        b, c = x.shape[:2]
        out = model(hidden_states=FluxPipeline._pack_latents(x[:, :, 0], b, c, h, w), timestep=t / 1000,
                    guidance=torch.full((b,), 1.0), pooled_projections=text[:, 0, :8],
                    encoder_hidden_states=text[:, 1:], txt_ids=torch.zeros(text.shape[1] - 1, 3),
                    img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype),
                    return_dict=False)[0]
        return FluxPipeline._unpack_latents(out, h, w, 1)[:, :, None]
    if family == "qwenimage":  # 2 x 2 packed tokens with their shape, sigma, the text with its mask
        from diffusers import QwenImagePipeline

        b, c = x.shape[:2]
        out = model(hidden_states=QwenImagePipeline._pack_latents(x[:, :, 0], b, c, h, w), timestep=t / 1000,
                    encoder_hidden_states=text, encoder_hidden_states_mask=mask.long(),
                    img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]
        return QwenImagePipeline._unpack_latents(out, h * 8, w * 8, 8)
    if family == "zimage":  # lists of latents and real caption tokens, reversed time, the output negated
        out = model(list(x.unbind(0)), (1000 - t) / 1000, [s[m] for s, m in zip(text, mask)], return_dict=False)[0]
        return -torch.stack(out)
    if family == "hunyuan15":  # zero image latents and mask beside x, the Qwen states and ByT5's with their masks,
        b = x.shape[0]       # 729 zero (masked) SigLIP tokens: no image
        qwen, qwen_mask = unpacked_qwen(text, mask)
        glyph, glyph_mask = glyph_parts(b)
        return model(hidden_states=torch.cat([x, torch.zeros_like(x), torch.zeros_like(x[:, :1])], 1), timestep=t,
                     encoder_hidden_states=qwen, encoder_attention_mask=qwen_mask.float(),
                     encoder_hidden_states_2=glyph, encoder_attention_mask_2=glyph_mask.float(),
                     image_embeds=torch.zeros(b, 729, 8), return_dict=False)[0]
    if family == "sd3":  # the image's latents as they are, sigma x 1000, every state (no mask), the pooled row
        return model(hidden_states=x[:, :, 0], timestep=t, encoder_hidden_states=text[:, 1:],
                     pooled_projections=text[:, 0], return_dict=False)[0][:, :, None]
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline  # [B, F, C, H, W]; rope from the pipeline

    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model,
                             scheduler=CogVideoXDDIMScheduler())
    rope = pipe._prepare_rotary_positional_embeddings(h * 8, w * 8, f, x.device)
    out = model(hidden_states=rearrange(x, "b c f h w -> b f c h w"), encoder_hidden_states=text, timestep=t,
                image_rotary_emb=rope, return_dict=False)[0]
    return rearrange(out, "b f c h w -> b c f h w")


def unpacked_qwen(text, mask):
    """The Qwen states and mask that inputs(family="hunyuan15") packed (after the header and sample 0's 3 ByT5
    rows), as the pipeline gives them: padded to the packed length."""
    _, _, _, qwen_mask = inputs()  # (the same draw)
    length = qwen_mask.shape[1]
    qwen = torch.stack([text[0, 4:4 + length], text[1, 1:1 + length]])
    return qwen, qwen_mask


def load(family: str, folder) -> torch.nn.Module:
    return build_denoiser(ModelConfig(family=family, pretrained=str(folder)), in_channels=4, text_dim=16).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_equals_the_pipeline_call(family, tiny_folder):
    adapter = load(family, tiny_folder(family))
    x, t, text, mask = inputs(grid=GRID[family], family=family)
    if family == "cogvideox":
        t = t.round().long()  # CogVideoX: integer DDPM timesteps
    with torch.no_grad():
        ours = adapter(x, t, text, mask)
        ref = pipeline_call(family, tiny_transformer(family), x, t, text, mask)
    assert ours.shape == x.shape
    assert ref.abs().mean() > 0.1  # a real output, not zeros
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_wan_padding_is_ignored_like_the_pipeline(tiny_folder):
    """Wan sees zeros after the prompt whatever the text encoder put there (its pipeline's padding)."""
    adapter = load("wan", tiny_folder("wan"))
    x, t, text, mask = inputs()
    noisy = text.clone()
    noisy[~mask] = 7.0
    with torch.no_grad():
        torch.testing.assert_close(adapter(x, t, noisy, mask), adapter(x, t, text, mask), atol=0, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_attributes_and_state_dict_keys(family, tiny_folder):
    adapter = load(family, tiny_folder(family))
    inner = adapter.transformer
    if family in ("hunyuan", "flux"):  # the dual-stream blocks, then the single-stream ones
        assert list(adapter.blocks) == [*inner.transformer_blocks, *inner.single_transformer_blocks]
    elif family == "zimage":  # the refiners, then the main layers
        assert list(adapter.blocks) == [*inner.noise_refiner, *inner.context_refiner, *inner.layers]
    else:
        assert adapter.blocks is getattr(inner, "blocks" if family == "wan" else "transformer_blocks")
    assert len(adapter.blocks) == (4 if family == "zimage" else 2)
    assert adapter.in_channels == 4 and adapter.text_dim == 16
    assert adapter.patch == {"wan": (1, 2, 2), "ltx": (1, 1, 1), "cogvideox": (1, 2, 2), "hunyuan": (1, 2, 2),
                             "flux": (1, 2, 2), "sd3": (1, 2, 2), "zimage": (1, 2, 2), "qwenimage": (1, 2, 2),
                             "hunyuan15": (1, 1, 1)}[family]
    assert list(adapter.state_dict()) == [f"transformer.{k}" for k in inner.state_dict()]
    c = adapter.config
    assert c["family"] == family and c["depth"] == 2 and c["num_heads"] == 2
    assert c["hidden_size"] == 2 * TINY_HEAD_DIM[family] and c["patch_size"] == list(adapter.patch)
    assert flops_per_token(adapter, num_tokens=18, text_len=6) > 2 * 2 * 4 * c["hidden_size"] ** 2  # > the QKVO



@pytest.mark.parametrize("family", FAMILIES)
def test_config_and_state_dict_round_trip(family, tiny_folder):
    """A checkpoint's config.json "dit" entry and model.safetensors rebuild the same denoiser."""
    adapter = load(family, tiny_folder(family))
    config = json.loads(json.dumps(adapter.config))
    weights = {k: v.clone() for k, v in adapter.state_dict().items()}
    rebuilt = denoiser_from_config(config, weights).eval()
    assert type(rebuilt) is type(adapter) and rebuilt.config == adapter.config
    fresh = denoiser_from_config(config)  # random weights, then a strict load
    fresh.load_state_dict(weights)
    x, t, text, mask = inputs(grid=GRID[family], family=family)
    with torch.no_grad():
        want = adapter(x, t, text, mask)
        torch.testing.assert_close(rebuilt(x, t, text, mask), want, atol=0, rtol=0)
        torch.testing.assert_close(fresh.eval()(x, t, text, mask), want, atol=0, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_activation_checkpointing_on_blocks_keeps_gradients(family, tiny_folder):
    """parallelize's per-block checkpointing acts on adapter.blocks and changes no gradient."""
    x, t, text, mask = inputs(grid=GRID[family], family=family)

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = load(family, tiny_folder(family)).train()
        if checkpointing:
            apply_activation_checkpointing(model)
        model(x, t, text, mask).square().mean().backward()
        return {k: p.grad for k, p in model.named_parameters() if p.grad is not None}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys() and any(k.startswith("transformer.") for k in plain)
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_blocks_keep_outputs_and_gradients(family, tiny_folder):
    """model.compile=true on a family: each diffusers block through torch.compile in place, after checkpointing (as
    parallelize applies them): the eager output and gradients, and the same parameter names. Wan's blocks go through
    inductor, as in training (our DiT's: tests/distributed/test_parallelize.py); the other families' through
    aot_eager, which traces the same graphs (dynamo, AOT autograd) without generating C++: inductor's code
    generation took 20-42 s a family in a fresh CI clone, where its cache is cold."""
    from dit.distributed.parallelize import apply_compile

    x, t, text, mask = inputs(grid=GRID[family], family=family)

    def run(compiled: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model = apply_activation_checkpointing(load(family, tiny_folder(family)).train())
        if compiled:
            apply_compile(model, backend="inductor" if family == "wan" else "aot_eager")
        out = model(x, t, text, mask)
        out.square().mean().backward()
        return out.detach(), {k: p.grad for k, p in model.named_parameters() if p.grad is not None}

    (out_e, eager), (out_c, compiled) = run(False), run(True)
    torch.testing.assert_close(out_c, out_e, atol=1e-5, rtol=1e-4)
    assert eager.keys() <= compiled.keys() and any(k.startswith("transformer.") for k in eager)
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], atol=1e-5, rtol=1e-4, msg=k)
    for k in compiled.keys() - eager.keys():  # (Qwen-Image's last block's text outputs, unused: a compiled block
        assert not compiled[k].any(), k      # gives their gradient as zeros, eager as None)


def test_random_family_takes_the_vae_and_text_widths():
    """Without model.pretrained a family is built at family_config's sizes with the VAE's channels and text width."""
    model = build_denoiser(ModelConfig(family="wan", family_config=dict(TINY_WAN_SIZES)), in_channels=8, text_dim=24)
    assert model.in_channels == 8 and model.text_dim == 24 and model.config["diffusers"]["out_channels"] == 8
    x = torch.randn(1, 8, 2, 4, 4)
    out = model(x, torch.tensor([500.0]), torch.randn(1, 3, 24), torch.ones(1, 3, dtype=torch.bool))
    assert out.shape == x.shape



def test_ltx_rope_scale_follows_the_vae_and_frame_rate(tiny_folder):
    """LTXPipeline scales RoPE by (VAE temporal compression / frame rate, spatial, spatial): so does the adapter."""
    from diffusers import LTXPipeline

    cfg = ModelConfig(family="ltx", pretrained=str(tiny_folder("ltx")), frame_rate=24.0)
    model = build_denoiser(cfg, in_channels=4, text_dim=16, compression=(4, 8)).eval()
    assert model.config["rope_interpolation_scale"] == [4 / 24, 8.0, 8.0]
    x, t, text, mask = inputs()
    with torch.no_grad():
        out = tiny_transformer("ltx")(hidden_states=LTXPipeline._pack_latents(x), encoder_hidden_states=text,
                                      timestep=t, encoder_attention_mask=mask, num_frames=3, height=4, width=6,
                                      rope_interpolation_scale=(4 / 24, 8, 8), return_dict=False)[0]
        torch.testing.assert_close(model(x, t, text, mask), LTXPipeline._unpack_latents(out, 3, 4, 6), atol=1e-5,
                                   rtol=0)


def test_bf16_folder_loads_as_fp32_master_weights(tmp_path):
    """Released checkpoints are bf16; training keeps fp32 master weights, equal to the stored bf16 values."""
    stored = tiny_transformer("wan").to(torch.bfloat16)
    stored.save_pretrained(tmp_path / "transformer")
    model = build_denoiser(ModelConfig(family="wan", pretrained=str(tmp_path / "transformer")), 4, 16)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    for k, v in stored.state_dict().items():
        assert torch.equal(model.state_dict()[f"transformer.{k}"], v.float())


FLOP_SIZES = {  # hidden 128, 2 blocks; 192 clip tokens (768 for LTX's patch 1) beside 64 text tokens
    "wan": dict(num_attention_heads=4, attention_head_dim=32, ffn_dim=512, num_layers=2, patch_size=[1, 2, 2]),
    "ltx": dict(num_attention_heads=4, attention_head_dim=32, cross_attention_dim=128, num_layers=2,
                caption_channels=64),
    "cogvideox": dict(num_attention_heads=4, attention_head_dim=32, time_embed_dim=128, num_layers=2,
                      sample_frames=9, sample_height=16, sample_width=16, max_text_seq_length=64, patch_size=2),
    "hunyuan": dict(num_attention_heads=4, attention_head_dim=32, num_layers=1, num_single_layers=1,
                    num_refiner_layers=1, rope_axes_dim=(8, 12, 12), text_embed_dim=64, pooled_projection_dim=32),
    "flux": dict(num_attention_heads=4, attention_head_dim=32, num_layers=1, num_single_layers=1,
                 axes_dims_rope=(8, 12, 12), joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True),
    "sd3": dict(num_attention_heads=4, attention_head_dim=32, num_layers=2, caption_projection_dim=128,
                joint_attention_dim=64, pooled_projection_dim=32, dual_attention_layers=[0], qk_norm="rms_norm"),
    "qwenimage": dict(num_attention_heads=4, attention_head_dim=32, num_layers=2, joint_attention_dim=64,
                      axes_dims_rope=(8, 12, 12)),
    "hunyuan15": dict(num_attention_heads=4, attention_head_dim=32, num_layers=2, num_refiner_layers=1,
                      rope_axes_dim=(8, 12, 12), text_embed_dim=64, text_embed_2_dim=16, image_embed_dim=16,
                      patch_size=2),
    "zimage": dict(dim=128, n_layers=2, n_refiner_layers=1, n_heads=4, n_kv_heads=4, cap_feat_dim=64,
                   axes_dims=[8, 12, 12], axes_lens=[256, 64, 64]),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_flops_per_token_matches_the_flop_counter(family):
    """The training log's TFLOP/s and MFU count (dit.models.dit.flops_per_token) against FlopCounterMode on the
    diffusers transformer's forward: within 3% (CogVideoX's text runs through its blocks: counted as for Wan, it
    was 14% under here)."""
    from dit.models.flops import counted_forward_flops

    torch.manual_seed(0)
    adapter = build_denoiser(ModelConfig(family=family, family_config=FLOP_SIZES[family]), in_channels=4,
                             text_dim=64).eval()
    grid, text_len = (1 if family in IMAGE else 3, 16, 16), 64  # (the image models: an image)
    tokens = math.prod(g // p for g, p in zip(grid, adapter.patch))
    text, mask = torch.randn(2, text_len, 64), torch.ones(2, text_len, dtype=torch.bool)
    if family == "hunyuan15":  # (its blocks take the Qwen tokens, one ByT5 token and one image token)
        text, mask = packed_glyph_text(text, mask, *glyph_parts(2, width=16))
        text_len = adapter.text_tokens(text, mask)
    inputs = (torch.randn(2, 4, *grid), torch.tensor([10, 500]), text, mask)
    counted = counted_forward_flops(adapter, *inputs)
    analytic = 2 * tokens * flops_per_token(adapter, tokens, text_len)
    if family == "hunyuan15":  # its ByT5 projection (1472 -> 2048 -> 2048 -> D) over the quoted text's tokens: left
        # out of the count (0.4% of such a token's cost at the released size), a third of this tiny model's FLOPs
        analytic += 2 * 2 * 3 * sum(m.in_features * m.out_features for m in
                                    adapter.transformer.context_embedder_2.modules() if isinstance(m, torch.nn.Linear))
    assert abs(analytic / counted - 1) < 0.03, (analytic, counted)
