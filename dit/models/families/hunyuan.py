"""HunyuanVideo: diffusers' HunyuanVideoTransformer3DModel behind our denoiser contract, called as
HunyuanVideoPipeline calls it (latents [B, C, t, h, w] as they are, float timesteps sigma*1000, the Llama states
with their mask, CLIP's pooled embedding, and the embedded guidance scale x 1000 of the guidance-distilled release).

The text comes from text.encoder=hunyuan (dit/models/text_hunyuan.py): one row that holds the pooled embedding,
then the Llama states; ``forward`` splits it off."""

from __future__ import annotations

from typing import Any

import torch

from dit.models.families.base import DistilledDualStream


class HunyuanVideoDenoiser(DistilledDualStream):
    """Flow matching: predicts the velocity eps - x0 at timestep t = sigma * 1000; the embedded guidance samples at
    6.0 by default (HunyuanVideoPipeline's guidance_scale)."""

    family = "hunyuan"
    class_name = "HunyuanVideoTransformer3DModel"
    blocks_attr = "transformer_blocks"  # then single_transformer_blocks (``blocks``)
    text_key = "text_embed_dim"
    prediction = "flow"
    title = "HunyuanVideo"
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
        states, mask, pooled = self.pooled_text(text, text_mask, "the Llama states")
        dtype = self.dtype_in()
        scale = self.embedded_scale(guidance)
        g = None if scale is None else x.new_full((x.shape[0],), 1000.0 * scale, dtype=dtype)
        x_in = self.with_condition(x, condition)  # [B, C (+ C), t, h, w]
        out = self.transformer(hidden_states=x_in.to(dtype), timestep=t, encoder_hidden_states=states.to(dtype),
                               encoder_attention_mask=mask, pooled_projections=pooled.to(dtype), guidance=g,
                               return_dict=False)[0]  # [B, C, t, h, w]
        return out.to(x.dtype)
