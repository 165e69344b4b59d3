"""Qwen-Image: diffusers' QwenImageTransformer2DModel (an MMDiT) behind our denoiser contract, called as
QwenImagePipeline calls it: the image's latents packed into 2 x 2 patches ([B, h/2 w/2, 4C], as FLUX.1's) with
their shape for RoPE, the timestep sigma, and the Qwen2.5-VL states with their mask (text.encoder=qwenimage). Its
classifier-free guidance rescales each token's combined prediction to the conditional one's norm (``guide``). An
image model: latents [B, C, 1, h, w] from its own VAE (vae.family=qwenimage)."""

from __future__ import annotations

from typing import Any

import torch

from dit.models.families.base import FamilyDenoiser
from dit.models.families.flux import PACK, pack, unpack


class QwenImageDenoiser(FamilyDenoiser):
    """Flow matching: predicts the velocity eps - x0 at timestep t = sigma * 1000."""

    family = "qwenimage"
    class_name = "QwenImageTransformer2DModel"
    blocks_attr = "transformer_blocks"
    text_key = "joint_attention_dim"
    prediction = "flow"
    joint_text = True  # the text tokens run through every block beside the image's
    channel_pack = PACK * PACK  # in_channels 64: 16 latent channels x 2 x 2 positions
    title = "Qwen-Image"
    last_text_outputs = ("attn.to_add_out", "txt_mlp.net.0.proj", "txt_mlp.net.2")

    @classmethod
    def sizes(cls, dcfg: dict[str, Any]) -> dict[str, Any]:
        if int(dcfg.get("patch_size", 2)) != PACK:
            raise ValueError(f"a QwenImageTransformer2DModel of patch_size {dcfg['patch_size']}: QwenImagePipeline "
                             "packs 2 x 2 latent positions per token")
        return dict(hidden_size=dcfg["num_attention_heads"] * dcfg["attention_head_dim"], depth=dcfg["num_layers"],
                    num_heads=dcfg["num_attention_heads"], mlp_ratio=4.0, patch_size=[1, PACK, PACK])

    @staticmethod
    def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
        """QwenImagePipeline's true CFG: uncond + scale (cond - uncond), each packed token rescaled to the norm of
        its conditional prediction (over its 4C values)."""
        h, w = cond.shape[-2:]
        c, u = pack(cond), pack(uncond)
        combined = u + scale * (c - u)
        combined = combined * (torch.norm(c, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True))
        return unpack(combined, h, w)

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                condition: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` [B, C, 1, h, w]; ``text`` [B, L, D] with ``text_mask`` [B, L] marking each prompt's real tokens."""
        b, _, _, h, w = x.shape
        self.image_grid(x, condition)
        dtype = self.dtype_in()
        out = self.transformer(hidden_states=pack(x).to(dtype), timestep=(t.float() / 1000).to(dtype),
                               encoder_hidden_states=text.to(dtype), encoder_hidden_states_mask=text_mask.long(),
                               img_shapes=[[(1, h // PACK, w // PACK)]] * b, return_dict=False)[0]
        return unpack(out, h, w).to(x.dtype)
