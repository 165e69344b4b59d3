"""Z-Image: diffusers' ZImageTransformer2DModel behind our denoiser contract, called as ZImagePipeline calls it: a
list of per-image latents [C, 1, h, w], the reversed time (1000 - sigma * 1000) / 1000, a list of each prompt's real
Qwen3 tokens (text.encoder=zimage: the mask says which), and the output negated (the transformer predicts
x0 - eps; our flow objective's velocity is eps - x0). An image model: latents [B, C, 1, h, w] from FLUX.1's VAE
(vae.family=flux)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dit.models.families.base import FamilyDenoiser


class ZImageDenoiser(FamilyDenoiser):
    """Flow matching: predicts the velocity eps - x0 at timestep t = sigma * 1000."""

    family = "zimage"
    class_name = "ZImageTransformer2DModel"
    blocks_attr = "layers"  # after the noise and context refiners (``blocks``)
    text_key = "cap_feat_dim"
    prediction = "flow"
    joint_text = True  # the caption tokens run through the main layers beside the image's
    title = "Z-Image"

    @property
    def blocks(self) -> nn.ModuleList:
        """The image and caption refiners, then the main layers: what checkpointing, compile and FSDP act on."""
        t = self.transformer
        return nn.ModuleList([*t.noise_refiner, *t.context_refiner, *t.layers])

    @classmethod
    def sizes(cls, dcfg: dict[str, Any]) -> dict[str, Any]:
        p, pf = int(dcfg["all_patch_size"][0]), int(dcfg["all_f_patch_size"][0])
        # (for flops_per_token: its SwiGLU of 8/3 x dim in three matrices costs what a 4x MLP in two does; refiner
        # layers over the caption alone and over the image alone)
        return dict(hidden_size=dcfg["dim"], depth=dcfg["n_layers"], num_heads=dcfg["n_heads"], mlp_ratio=4.0,
                    patch_size=[pf, p, p], refiner_layers=dcfg["n_refiner_layers"],
                    image_layers=dcfg["n_refiner_layers"])

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                condition: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` [B, C, 1, h, w]; ``text`` [B, L, D] with ``text_mask`` [B, L] marking each prompt's real tokens."""
        self.image_grid(x, condition)
        if not text_mask.any(1).all():
            raise ValueError("Z-Image takes each prompt's real tokens (text.encoder=zimage): a prompt has none")
        dtype = self.dtype_in()
        pf, p = self.patch[0], self.patch[1]
        caps = [states[keep].to(dtype) for states, keep in zip(text, text_mask.bool())]
        out = self.transformer(list(x.to(dtype).unbind(0)), (1000 - t.float()) / 1000, caps, patch_size=p,
                               f_patch_size=pf, return_dict=False)[0]  # [C, 1, h, w] each
        return -torch.stack(out).to(x.dtype)
