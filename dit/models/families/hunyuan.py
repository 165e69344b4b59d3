"""HunyuanVideo: diffusers' HunyuanVideoTransformer3DModel behind our denoiser contract, called as
HunyuanVideoPipeline calls it (latents [B, C, t, h, w] as they are, float timesteps sigma*1000, the Llama states
with their mask, CLIP's pooled embedding, and the embedded guidance scale x 1000 of the guidance-distilled release).

The text comes from text.encoder=hunyuan (dit/models/text_hunyuan.py): one row that holds the pooled embedding,
then the Llama states; ``forward`` splits it off."""

from __future__ import annotations

from typing import Any

import torch

from dit.models.families.base import DistilledDualStream
from dit.models.text_hunyuan import split_pooled


class HunyuanVideoDenoiser(DistilledDualStream):
    """Flow matching: predicts the velocity eps - x0 at timestep t = sigma * 1000; the embedded guidance samples at
    6.0 by default (HunyuanVideoPipeline's guidance_scale)."""

    family = "hunyuan"
    class_name = "HunyuanVideoTransformer3DModel"
    blocks_attr = "transformer_blocks"  # then single_transformer_blocks (``blocks``)
    text_key = "text_embed_dim"
    prediction = "flow"
    # SkyReels V1 (HunyuanSkyreelsImageToVideoPipeline): an image-to-video transformer of in_channels 2C takes the
    # first frame's latents beside the noisy ones, zeros after frame 0, without a mask
    concat_condition = True
    sample_guidance = 6.0  # HunyuanVideoPipeline's default guidance_scale (the embedded one)

    @classmethod
    def sizes(cls, dcfg: dict[str, Any]) -> dict[str, Any]:
        return dict(hidden_size=dcfg["num_attention_heads"] * dcfg["attention_head_dim"],
                    depth=dcfg["num_layers"] + dcfg["num_single_layers"], num_heads=dcfg["num_attention_heads"],
                    mlp_ratio=float(dcfg["mlp_ratio"]), refiner_layers=dcfg["num_refiner_layers"],
                    patch_size=[dcfg["patch_size_t"], dcfg["patch_size"], dcfg["patch_size"]])

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                condition: torch.Tensor | None = None, guidance: float | None = None) -> torch.Tensor:
        """``text`` [B, 1 + L, D]: the pooled row and the Llama states; ``condition``: a SkyReels V1 transformer's
        image latents [B, C, t, h, w] (None: zeros); ``guidance``: the embedded guidance scale (None: the training
        one)."""
        self.grid(x)
        pooled_dim = int(self.transformer.config.pooled_projection_dim)
        if text.shape[-1] < pooled_dim or text.shape[1] < 2:
            raise ValueError(f"HunyuanVideo takes text.encoder=hunyuan's states (a row with CLIP's pooled embedding "
                             f"of width {pooled_dim}, then the Llama states), got text of shape {tuple(text.shape)}")
        dtype = self.dtype_in()
        states, mask, pooled = split_pooled(text, text_mask, pooled_dim)
        if guidance is not None and not self.distilled:
            raise ValueError("this HunyuanVideo transformer has no embedded guidance (guidance_embeds false): "
                             "sample without sample.guidance, with sample.cfg")
        g = None
        if self.distilled:
            g = x.new_full((x.shape[0],), 1000.0 * (self.guidance if guidance is None else guidance), dtype=dtype)
        x_in = self.with_condition(x, condition)  # [B, C (+ C), t, h, w]
        out = self.transformer(hidden_states=x_in.to(dtype), timestep=t, encoder_hidden_states=states.to(dtype),
                               encoder_attention_mask=mask, pooled_projections=pooled.to(dtype), guidance=g,
                               return_dict=False)[0]  # [B, C, t, h, w]
        return out.to(x.dtype)
