"""FLUX.1: diffusers' FluxTransformer2DModel behind our denoiser contract, called as FluxPipeline calls it: the
image's latents packed into 2x2 patches ([B, h/2 w/2, 4C]) with their (0, row, column) ids, the timestep sigma
(the model multiplies by 1000 itself), the T5 states with zero ids (no mask: the transformer takes none), CLIP's
pooled embedding and, for the guidance-distilled FLUX.1-dev, the embedded guidance scale.

An image model: latents [B, C, 1, h, w] (one frame, from the image VAE, vae.family=flux). The text comes from
text.encoder=flux (dit/models/text_pooled.py): one row that holds the pooled embedding, then the T5 states;
``forward`` splits it off."""

from __future__ import annotations

from typing import Any

import torch

from dit.models.families.base import DistilledDualStream

PACK = 2  # FluxPipeline._pack_latents: 2 x 2 latent positions per token


def pack(x: torch.Tensor) -> torch.Tensor:
    """Latents [B, C, 1, h, w] as FluxPipeline._pack_latents packs them: [B, h/2 w/2, 4C] (channel, then the 2 x 2
    position, per token; QwenImagePipeline's too)."""
    b, c, _, h, w = x.shape
    return x.view(b, c, h // PACK, PACK, w // PACK, PACK).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * PACK * PACK)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """pack's inverse: [B, h/2 w/2, 4C] -> [B, C, 1, h, w]."""
    b, _, d = tokens.shape
    c = d // (PACK * PACK)
    return tokens.view(b, h // PACK, w // PACK, c, PACK, PACK).permute(0, 3, 1, 4, 2, 5).reshape(b, c, 1, h, w)


class FluxDenoiser(DistilledDualStream):
    """Flow matching: predicts the velocity eps - x0 at timestep t = sigma * 1000; the embedded guidance of
    FLUX.1-dev samples at 3.5 by default (FluxPipeline's guidance_scale)."""

    family = "flux"
    class_name = "FluxTransformer2DModel"
    blocks_attr = "transformer_blocks"  # then single_transformer_blocks (``blocks``)
    text_key = "joint_attention_dim"
    prediction = "flow"
    channel_pack = PACK * PACK  # the transformer's in_channels are 4 x the VAE's latent channels
    title = "FLUX.1"
    sample_guidance = 3.5  # FluxPipeline's default guidance_scale (the embedded one)

    @classmethod
    def sizes(cls, dcfg: dict[str, Any]) -> dict[str, Any]:
        if int(dcfg.get("patch_size", 1)) != 1:
            raise ValueError(f"a FluxTransformer2DModel of patch_size {dcfg['patch_size']}: FluxPipeline's 2 x 2 "
                             "packing is the patch, and its transformers have patch_size 1")
        return dict(hidden_size=dcfg["num_attention_heads"] * dcfg["attention_head_dim"],
                    depth=dcfg["num_layers"] + dcfg["num_single_layers"], num_heads=dcfg["num_attention_heads"],
                    mlp_ratio=4.0, patch_size=[1, PACK, PACK])

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                condition: torch.Tensor | None = None, guidance: float | None = None) -> torch.Tensor:
        """``x`` [B, C, 1, h, w]; ``text`` [B, 1 + L, D]: the pooled row and the T5 states (all of them: FLUX.1 was
        trained on the padded states, its pipeline passes no mask); ``guidance``: the embedded guidance scale (None:
        the training one)."""
        b, _, _, h, w = x.shape
        self.image_grid(x, condition)
        states, _, pooled = self.pooled_text(text, text_mask, "the T5 states")
        dtype = self.dtype_in()
        scale = self.embedded_scale(guidance)
        g = None if scale is None else x.new_full((b,), scale, dtype=torch.float32)
        hp, wp = h // PACK, w // PACK
        packed = pack(x)
        img_ids = torch.zeros(hp, wp, 3, device=x.device)
        img_ids[..., 1] += torch.arange(hp, device=x.device)[:, None]
        img_ids[..., 2] += torch.arange(wp, device=x.device)[None, :]
        txt_ids = torch.zeros(states.shape[1], 3, device=x.device)
        out = self.transformer(hidden_states=packed.to(dtype), timestep=(t.float() / 1000).to(dtype),
                               guidance=g, pooled_projections=pooled.to(dtype), encoder_hidden_states=states.to(dtype),
                               txt_ids=txt_ids.to(dtype), img_ids=img_ids.flatten(0, 1).to(dtype),
                               return_dict=False)[0]  # [B, h/2 w/2, 4C]
        out = unpack(out, h, w)
        return out.to(x.dtype)
