"""LTX-Video: diffusers' LTXVideoTransformer3DModel behind our denoiser contract, called as LTXPipeline calls it
(latents packed into tokens, float timesteps sigma*1000, the text mask as attention mask, RoPE coordinates scaled
by the VAE's compression and the frame rate)."""

from __future__ import annotations

from typing import Any

import torch
from einops import rearrange

from dit.models.families.base import FamilyDenoiser

COMPRESSION = (8, 32)  # AutoencoderKLLTXVideo's (temporal, spatial) compression; LTXPipeline's default without a VAE
FRAME_RATE = 25.0  # LTXPipeline's default frame_rate


def rope_interpolation_scale(compression: tuple[int, int] | None, frame_rate: float) -> list[float]:
    """LTXPipeline's rope_interpolation_scale: (temporal compression / frame rate, spatial, spatial)."""
    temporal, spatial = compression or COMPRESSION
    return [temporal / frame_rate, float(spatial), float(spatial)]


class LTXDenoiser(FamilyDenoiser):
    """Flow matching: predicts the velocity eps - x0 at timestep t = sigma * 1000."""

    family = "ltx"
    class_name = "LTXVideoTransformer3DModel"
    blocks_attr = "transformer_blocks"
    text_key = "caption_channels"
    prediction = "flow"
    option_keys = ("rope_interpolation_scale", "first_frame")
    replace_condition = True  # image-to-video as LTXImageToVideoPipeline (model.condition=first_frame)

    def __init__(self, transformer: torch.nn.Module, rope_interpolation_scale: list[float],
                 first_frame: bool = False) -> None:
        super().__init__(transformer, rope_interpolation_scale=list(rope_interpolation_scale),
                         first_frame=bool(first_frame))
        self.rope_scale = tuple(rope_interpolation_scale)

    @classmethod
    def sizes(cls, dcfg: dict[str, Any]) -> dict[str, Any]:
        return dict(hidden_size=dcfg["num_attention_heads"] * dcfg["attention_head_dim"], depth=dcfg["num_layers"],
                    num_heads=dcfg["num_attention_heads"], mlp_ratio=4.0,  # diffusers' FeedForward: 4 x hidden
                    patch_size=[dcfg["patch_size_t"], dcfg["patch_size"], dcfg["patch_size"]])

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                condition: torch.Tensor | None = None) -> torch.Tensor:
        """``condition`` (first_frame): the image's latent in place of frame 0 and its tokens at timestep 0, the
        pipeline's conditioning mask (LTXImageToVideoPipeline); without an image every token gets t."""
        f, h, w = self.grid(x)
        pt, ph, pw = self.patch
        dtype = self.dtype_in()
        x, t = self.image_inputs(x, t, condition)  # first_frame: t [B, N]
        tokens = rearrange(x, "b c (f pt) (h ph) (w pw) -> b (f h w) (c pt ph pw)", pt=pt, ph=ph, pw=pw)  # [B, N, C']
        out = self.transformer(hidden_states=tokens.to(dtype), encoder_hidden_states=text.to(dtype), timestep=t,
                               encoder_attention_mask=text_mask, num_frames=f, height=h, width=w,
                               rope_interpolation_scale=self.rope_scale, return_dict=False)[0]  # [B, N, C']
        out = rearrange(out, "b (f h w) (c pt ph pw) -> b c (f pt) (h ph) (w pw)", f=f, h=h, w=w, pt=pt, ph=ph, pw=pw)
        return out.to(x.dtype)  # [B, C, t, h, w]
