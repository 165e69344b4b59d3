"""Wan 2.1 and 2.2: diffusers' WanTransformer3DModel behind our denoiser contract, called as WanPipeline
calls it (latents [B, C, t, h, w] as they are, float timesteps sigma*1000, text states zero after the prompt)."""

from __future__ import annotations

from typing import Any

import torch

from dit.models.families.base import FamilyDenoiser

WAN_TEXT_TOKENS = 512  # the text length WanAttnProcessor assumes when it splits CLIP states from the text


class WanDenoiser(FamilyDenoiser):
    """Flow matching: predicts the velocity eps - x0 at timestep t = sigma * 1000.

    ``first_frame`` (model.condition=first_frame): image-to-video as Wan 2.2 TI2V does it (WanImageToVideoPipeline
    with expand_timesteps): the first latent frame replaced by the image's, and per-token timesteps, 0 on its
    tokens; without an image every token gets t, as WanPipeline calls TI2V for text-to-video.

    A Wan 2.1 I2V or Wan 2.2 I2V A14B transformer (in_channels 36 = 16 + a 4-channel mask + 16 of the image's code)
    takes the condition concatenated on channels (``code_condition``), as WanImageToVideoPipeline calls it. Wan 2.1's
    (``image_dim`` in its config) also takes the image's CLIP states (``image_states``) before the text in its
    cross-attention; its attention takes the last 512 text tokens as the text (diffusers hard-codes UMT5's 512), so
    the text comes padded to 512 tokens (text.max_length). Wan 2.1 FLF2V's (``pos_embed_seq_len``) takes the
    first and the last frame (``last_frame``): both in the condition, and both frames' CLIP states."""

    family = "wan"
    class_name = "WanTransformer3DModel"
    blocks_attr = "blocks"
    text_key = "text_dim"
    prediction = "flow"
    option_keys = ("first_frame",)
    replace_condition = True

    def __init__(self, transformer: torch.nn.Module, first_frame: bool = False) -> None:
        code = self.condition_width(dict(transformer.config)) > 0
        super().__init__(transformer, first_frame=bool(first_frame) and not code)  # (the code form: concatenated)
        self.code_condition = code
        self.clip_image = bool(transformer.config.get("image_dim"))
        # Wan 2.1 FLF2V: its image embedding takes the CLIP states of a first and a last frame (pos_embed_seq_len)
        self.last_frame = bool(transformer.config.get("pos_embed_seq_len"))

    @classmethod
    def condition_width(cls, dcfg: dict[str, Any]) -> int:
        """The code form's mask and image code (in_channels - out_channels); 0 for text-to-video and TI2V."""
        return int(dcfg["in_channels"]) - int(dcfg.get("out_channels") or dcfg["in_channels"])

    @classmethod
    def sizes(cls, dcfg: dict[str, Any]) -> dict[str, Any]:
        hidden = dcfg["num_attention_heads"] * dcfg["attention_head_dim"]
        return dict(hidden_size=hidden, depth=dcfg["num_layers"], num_heads=dcfg["num_attention_heads"],
                    mlp_ratio=dcfg["ffn_dim"] / hidden, patch_size=[int(p) for p in dcfg["patch_size"]])

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                condition: torch.Tensor | None = None, image_states: torch.Tensor | None = None) -> torch.Tensor:
        self.grid(x)
        dtype = self.dtype_in()
        x_in, t = self.image_inputs(x, t, condition)  # first_frame: t [B, N]; 2.1 I2V: [B, 36, t, h, w]
        text = text * text_mask[..., None].to(text.dtype)  # [B, L, D]: zeros after the prompt, as WanPipeline pads
        extra = {}
        if self.clip_image:
            extra["encoder_hidden_states_image"] = self.clip_states(image_states, text).to(dtype)
        elif image_states is not None:
            raise ValueError("this Wan transformer takes no CLIP image states (not a Wan 2.1 I2V transformer)")
        elif self.code_condition and condition is None:
            raise ValueError("a Wan image-to-video transformer of the code form (Wan 2.1 I2V, Wan 2.2 I2V A14B) has "
                             "no text-to-video mode: sample with an image (--image)")
        out = self.transformer(hidden_states=x_in.to(dtype), timestep=t, encoder_hidden_states=text.to(dtype),
                               return_dict=False, **extra)[0]  # [B, C, t, h, w]
        return out.to(x.dtype)

    def clip_states(self, image_states: torch.Tensor | None, text: torch.Tensor) -> torch.Tensor:
        """The CLIP states a 2.1 I2V transformer is given, checked: its attention splits them from the text by
        counting 512 text tokens from the end."""
        if text.shape[1] != WAN_TEXT_TOKENS:
            raise ValueError(f"a Wan 2.1 I2V transformer takes text states of {WAN_TEXT_TOKENS} tokens (diffusers "
                             f"splits image from text by that count), got {text.shape[1]}: set text.max_length="
                             f"{WAN_TEXT_TOKENS}")
        if image_states is None:
            raise ValueError("a Wan 2.1 I2V transformer needs the image's CLIP states: sample with an image "
                             "(--image), as it has no text-to-video mode")
        width, pairs = self.transformer.config.image_dim, self.transformer.config.get("pos_embed_seq_len")
        if image_states.ndim != 3 or image_states.shape[0] != text.shape[0] or image_states.shape[2] != width:
            raise ValueError(f"CLIP image states of shape {tuple(image_states.shape)} do not fit: expected "
                             f"[{text.shape[0]}, tokens, {width}] (image_dim)")
        if pairs:  # FLF2V: both frames' states, [B, 2n, D], given as the pipeline gives them, [2B, n, D]
            if image_states.shape[1] != pairs:
                raise ValueError(f"a Wan 2.1 FLF2V transformer takes the CLIP states of a first and a last frame "
                                 f"({pairs} tokens, pos_embed_seq_len), got {image_states.shape[1]}: sample with "
                                 "--image and --last-image")
            return image_states.reshape(-1, pairs // 2, width)
        return image_states
