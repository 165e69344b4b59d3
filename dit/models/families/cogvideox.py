"""CogVideoX: diffusers' CogVideoXTransformer3DModel behind our denoiser contract, called as CogVideoXPipeline
calls it (latents as [B, t, C, h, w], integer DDPM timesteps, the 3D rotary embeddings the pipeline computes with
diffusers' get_3d_rotary_pos_embed, the full padded text sequence: CogVideoX attends to its padding)."""

from __future__ import annotations

from typing import Any

import torch
from einops import rearrange

from dit.models.families.base import FamilyDenoiser


class CogVideoXDenoiser(FamilyDenoiser):
    """v-prediction at integer DDPM timesteps (CogVideoXDDIMScheduler's)."""

    family = "cogvideox"
    class_name = "CogVideoXTransformer3DModel"
    blocks_attr = "transformer_blocks"
    text_key = "text_embed_dim"
    prediction = "v"
    joint_text = True
    concat_condition = True  # CogVideoX-I2V: the image latents beside the noisy ones (in_channels 2C)
    pads_frames = True  # CogVideoX 1.5 (temporal patch 2) at an odd latent frame count (81 frames: 21)
    frames_first = True  # its pipelines hold latents [B, F, C, H, W] and draw their noise so (seeded parity)

    @classmethod
    def sizes(cls, dcfg: dict[str, Any]) -> dict[str, Any]:
        return dict(hidden_size=dcfg["num_attention_heads"] * dcfg["attention_head_dim"], depth=dcfg["num_layers"],
                    num_heads=dcfg["num_attention_heads"], mlp_ratio=4.0,  # diffusers' FeedForward: 4 x hidden
                    patch_size=[dcfg.get("patch_size_t") or 1, dcfg["patch_size"], dcfg["patch_size"]])

    def rotary(self, frames: int, height: int, width: int,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """CogVideoXPipeline._prepare_rotary_positional_embeddings for a latent grid (frames, height, width)."""
        from diffusers.models.embeddings import get_3d_rotary_pos_embed
        from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

        c = self.config["diffusers"]
        if not c["use_rotary_positional_embeddings"]:
            return None
        p, p_t = c["patch_size"], c.get("patch_size_t")
        grid = (height // p, width // p)
        base_w, base_h = c["sample_width"] // p, c["sample_height"] // p
        if p_t is None:  # CogVideoX 1.0
            crops = get_resize_crop_region_for_grid(grid, base_w, base_h)
            return get_3d_rotary_pos_embed(embed_dim=c["attention_head_dim"], crops_coords=crops, grid_size=grid,
                                           temporal_size=frames, device=device)
        return get_3d_rotary_pos_embed(embed_dim=c["attention_head_dim"], crops_coords=None, grid_size=grid,
                                       temporal_size=(frames + p_t - 1) // p_t, grid_type="slice",
                                       max_size=(base_h, base_w), device=device)  # CogVideoX 1.5

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                condition: torch.Tensor | None = None) -> torch.Tensor:
        """``condition``: an I2V transformer's image latents [B, C, t, h, w] (CogVideoXImageToVideoPipeline's
        ``image_latents``), concatenated to x on channels; None gives zeros."""
        self.grid(x)
        c = self.config["diffusers"]
        if not c["use_rotary_positional_embeddings"] and text.shape[1] != c["max_text_seq_length"]:
            raise ValueError(f"CogVideoX with sin/cos positions needs text of exactly {c['max_text_seq_length']} "
                             f"tokens (its max_text_seq_length), got {text.shape[1]}: set text.max_length="
                             f"{c['max_text_seq_length']}")
        dtype = self.dtype_in()
        _, _, f, h, w = x.shape
        # CogVideoX 1.5 I2V's offset embedding: the pipeline passes 2.0 whenever the model has one
        ofs = None if c.get("ofs_embed_dim") is None else x.new_full((1,), 2.0, dtype=dtype)
        x_in, t = self.image_inputs(x, t, condition)
        out = self.transformer(hidden_states=rearrange(x_in, "b c f h w -> b f c h w").to(dtype),
                               encoder_hidden_states=text.to(dtype), timestep=t, ofs=ofs,
                               image_rotary_emb=self.rotary(f, h, w, x.device), return_dict=False)[0]  # [B, t, C, h, w]
        return rearrange(out, "b f c h w -> b c f h w").to(x.dtype)  # [B, C, t, h, w]
