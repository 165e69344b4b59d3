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


class SD3Denoiser(FamilyDenoiser):
    """Flow matching: predicts the velocity eps - x0 at timestep t = sigma * 1000."""

    family = "sd3"
    class_name = "SD3Transformer2DModel"
    blocks_attr = "transformer_blocks"
    text_key = "joint_attention_dim"
    prediction = "flow"
    joint_text = True  # the text tokens run through every block beside the image's
    title = "Stable Diffusion 3"

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
        _, h, w = self.image_grid(x, condition)
        most = int(self.transformer.config.pos_embed_max_size)
        if max(h, w) > most:
            raise ValueError(f"a latent grid of {h} x {w} patches is larger than this SD3 transformer's position "
                             f"table ({most} x {most}, pos_embed_max_size): sample or train smaller images")
        states, _, pooled = self.pooled_text(text, text_mask, "the CLIP and T5 states")
        dtype = self.dtype_in()
        out = self.transformer(hidden_states=x[:, :, 0].to(dtype), timestep=t, encoder_hidden_states=states.to(dtype),
                               pooled_projections=pooled.to(dtype), return_dict=False)[0]  # [B, C, h, w]
        return out[:, :, None].to(x.dtype)
