"""Wan 2.1 text-to-video: diffusers' WanTransformer3DModel behind our denoiser contract, called as WanPipeline
calls it (latents [B, C, t, h, w] as they are, float timesteps sigma*1000, text states zero after the prompt)."""

from __future__ import annotations

from typing import Any

import torch

from dit.models.families.base import FamilyDenoiser


class WanDenoiser(FamilyDenoiser):
    """Flow matching: predicts the velocity eps - x0 at timestep t = sigma * 1000.

    ``first_frame`` (model.condition=first_frame): image-to-video as Wan 2.2 TI2V does it (WanImageToVideoPipeline
    with expand_timesteps): the first latent frame replaced by the image's, and per-token timesteps, 0 on its
    tokens; without an image every token gets t, as WanPipeline calls TI2V for text-to-video."""

    family = "wan"
    class_name = "WanTransformer3DModel"
    blocks_attr = "blocks"
    text_key = "text_dim"
    prediction = "flow"
    option_keys = ("first_frame",)
    replace_condition = True

    def __init__(self, transformer: torch.nn.Module, first_frame: bool = False) -> None:
        super().__init__(transformer, first_frame=bool(first_frame))

    @classmethod
    def sizes(cls, dcfg: dict[str, Any]) -> dict[str, Any]:
        hidden = dcfg["num_attention_heads"] * dcfg["attention_head_dim"]
        return dict(hidden_size=hidden, depth=dcfg["num_layers"], num_heads=dcfg["num_attention_heads"],
                    mlp_ratio=dcfg["ffn_dim"] / hidden, patch_size=[int(p) for p in dcfg["patch_size"]])

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                condition: torch.Tensor | None = None) -> torch.Tensor:
        self.grid(x)
        dtype = self.dtype_in()
        x, t = self.image_inputs(x, t, condition)  # first_frame: t [B, N]
        text = text * text_mask[..., None].to(text.dtype)  # [B, L, D]: zeros after the prompt, as WanPipeline pads
        out = self.transformer(hidden_states=x.to(dtype), timestep=t, encoder_hidden_states=text.to(dtype),
                               return_dict=False)[0]  # [B, C, t, h, w]
        return out.to(x.dtype)
