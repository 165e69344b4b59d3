"""Stable Diffusion 3 / 3.5: diffusers' SD3Transformer2DModel (MMDiT) behind our denoiser contract, called as
StableDiffusion3Pipeline calls it: the image's latents [B, C, h, w] (the transformer patchifies them itself), the
timestep sigma * 1000, the text states (CLIP-L | CLIP-G rows, then T5's: no mask) and the pooled embeddings.

An image model: latents [B, C, 1, h, w] (one frame, from its image VAE, vae.family=sd3). The text comes from
text.encoder=sd3 (dit/models/text_pooled.py): one row that holds the pooled embeddings, then the states; ``forward``
splits it off."""

from __future__ import annotations

from typing import Any

import torch

from dit.models.families.base import FamilyDenoiser
from dit.models.text_pooled import split_pooled


class SD3Denoiser(FamilyDenoiser):
    """Flow matching: predicts the velocity eps - x0 at timestep t = sigma * 1000."""

    family = "sd3"
    class_name = "SD3Transformer2DModel"
    blocks_attr = "transformer_blocks"
    text_key = "joint_attention_dim"
    prediction = "flow"
    joint_text = True  # the text tokens run through every block beside the image's
    image_only = True

    @classmethod
    def sizes(cls, dcfg: dict[str, Any]) -> dict[str, Any]:
        p = int(dcfg["patch_size"])
        # (for flops_per_token: the last block's text stream ends after the attention; SD3.5's dual-attention blocks)
        return dict(hidden_size=dcfg["num_attention_heads"] * dcfg["attention_head_dim"], depth=dcfg["num_layers"],
                    num_heads=dcfg["num_attention_heads"], mlp_ratio=4.0, patch_size=[1, p, p], text_out_skipped=1,
                    image_attention_layers=len(dcfg.get("dual_attention_layers") or ()))

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                condition: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` [B, C, 1, h, w]; ``text`` [B, 1 + L, D]: the pooled row and the states (all of them: the transformer
        takes no mask)."""
        frames = x.shape[2]
        if frames != 1:
            raise ValueError(f"Stable Diffusion 3 is an image model: latents of one frame, got {frames} (sample "
                             "images, data.frames=1)")
        _, h, w = self.grid(x)
        most = int(self.transformer.config.pos_embed_max_size)
        if max(h, w) > most:
            raise ValueError(f"a latent grid of {h} x {w} patches is larger than this SD3 transformer's position "
                             f"table ({most} x {most}, pos_embed_max_size): sample or train smaller images")
        self.with_condition(x, condition)  # (refuses an image condition: SD3 takes none)
        pooled_dim = int(self.transformer.config.pooled_projection_dim)
        if text.shape[-1] < pooled_dim or text.shape[1] < 2:
            raise ValueError(f"Stable Diffusion 3 takes text.encoder=sd3's states (a row with the pooled embeddings "
                             f"of width {pooled_dim}, then the CLIP and T5 states), got text of shape "
                             f"{tuple(text.shape)}")
        dtype = self.dtype_in()
        states, _, pooled = split_pooled(text, text_mask, pooled_dim)
        out = self.transformer(hidden_states=x[:, :, 0].to(dtype), timestep=t, encoder_hidden_states=states.to(dtype),
                               pooled_projections=pooled.to(dtype), return_dict=False)[0]  # [B, C, h, w]
        return out[:, :, None].to(x.dtype)
