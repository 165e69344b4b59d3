"""HunyuanVideo 1.5: diffusers' HunyuanVideo15Transformer3DModel behind our denoiser contract, called as
HunyuanVideo15Pipeline calls it for text-to-video (latents [B, C, t, h, w] beside zero condition latents and a zero
mask channel, float timesteps sigma*1000, the Qwen2.5-VL states with their mask, the ByT5 states of the prompt's
quoted texts with theirs, and no image), and as HunyuanVideo15ImageToVideoPipeline calls it with
model.condition=first_frame (the image's latent at frame 0 and the mask there in those channels, and its SigLIP
states).

The text comes from text.encoder=hunyuan15 (dit/models/text_hunyuan15.py), both encoders' states in one tensor;
``forward`` splits them. Where the pipeline passes 729 zero SigLIP tokens (masked out: no image), the adapter passes
one; masked tokens change no output."""

from __future__ import annotations

from typing import Any

import torch

from dit.models.families.base import FamilyDenoiser


class HunyuanVideo15Denoiser(FamilyDenoiser):
    """Flow matching: predicts the velocity eps - x0 at timestep t = sigma * 1000.

    Its transformer takes C latent channels, C of an image condition's latents and a mask channel (in_channels
    2C + 1) for text-to-video and image-to-video alike: text-to-video gives zeros there, as the pipeline does."""

    family = "hunyuan15"
    class_name = "HunyuanVideo15Transformer3DModel"
    blocks_attr = "transformer_blocks"
    text_key = "text_embed_dim"
    prediction = "flow"
    title = "HunyuanVideo 1.5"
    option_keys = ("first_frame",)
    joint_text = True  # the text tokens run through every block beside the clip's
    last_text_outputs = ("attn.to_add_out", "ff_context.net.0.proj", "ff_context.net.2")

    def __init__(self, transformer: torch.nn.Module, first_frame: bool = False) -> None:
        super().__init__(transformer, first_frame=bool(first_frame))
        if first_frame:  # image-to-video: the zero channels hold the image's latent and the mask
            self.condition_channels, self.zero_channels = self.zero_channels, 0
            self.config["condition_channels"] = self.condition_channels
        self.clip_image = bool(first_frame)  # (and its forward takes the image's SigLIP states)

    @property
    def condition_mask(self) -> bool:
        return True  # its condition carries the mask channel after the latent

    @classmethod
    def zero_inputs(cls, dcfg: dict[str, Any]) -> int:
        return int(dcfg["in_channels"]) - int(dcfg["out_channels"])  # an image's latents and the mask channel

    @classmethod
    def random_in_channels(cls, latent: int) -> int:
        return 2 * latent + 1

    @classmethod
    def sizes(cls, dcfg: dict[str, Any]) -> dict[str, Any]:
        return dict(hidden_size=dcfg["num_attention_heads"] * dcfg["attention_head_dim"],
                    depth=dcfg["num_layers"], num_heads=dcfg["num_attention_heads"],
                    mlp_ratio=float(dcfg["mlp_ratio"]), refiner_layers=dcfg["num_refiner_layers"],
                    patch_size=[dcfg["patch_size_t"], dcfg["patch_size"], dcfg["patch_size"]])

    def text_tokens(self, text: torch.Tensor, text_mask: torch.Tensor, image_tokens: int = 1) -> int:
        """The text tokens its blocks run beside the clip's for this packed text: its image tokens (one masked one
        without an image), and the ByT5 and Qwen2.5-VL ones up to the batch's longest (``split_glyph``)."""
        from dit.models.text_hunyuan15 import split_glyph

        qwen, _, glyph, _ = split_glyph(text, text_mask, int(self.transformer.config.text_embed_2_dim))
        return image_tokens + glyph.shape[1] + qwen.shape[1]

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                condition: torch.Tensor | None = None, image_states: torch.Tensor | None = None) -> torch.Tensor:
        """``text`` [B, 1 + G + L, D]: text.encoder=hunyuan15's packed states (dit/models/text_hunyuan15.py);
        image-to-video: ``condition`` [B, C + 1, t, h, w] (the image's latent and the mask at frame 0) and
        ``image_states`` [B, n, image_embed_dim] (its SigLIP states), both or neither."""
        from dit.models.text_hunyuan15 import split_glyph

        self.grid(x)
        cfg = self.transformer.config
        if (condition is None) != (image_states is None):
            raise ValueError("HunyuanVideo 1.5 image-to-video takes the image's latent condition and its SigLIP "
                             "states together (model.image_encoder)")
        if condition is not None and not self.condition_channels:
            raise ValueError("this HunyuanVideo 1.5 model takes no image (trained with model.condition=none): its "
                             "image-to-video transformer trains with model.condition=first_frame")
        if image_states is not None and (image_states.ndim != 3 or image_states.shape[0] != x.shape[0]
                                         or image_states.shape[2] != int(cfg.image_embed_dim)):
            raise ValueError(f"SigLIP image states of shape {tuple(image_states.shape)} do not fit: expected "
                             f"[{x.shape[0]}, tokens, {cfg.image_embed_dim}] (image_embed_dim)")
        if text.shape[1] < 2 or text.shape[-1] < int(cfg.text_embed_2_dim):
            raise ValueError(f"HunyuanVideo 1.5 takes text.encoder=hunyuan15's states (a row with the ByT5 token "
                             f"count, the ByT5 states, then Qwen2.5-VL's), got text of shape {tuple(text.shape)}")
        qwen, qwen_mask, glyph, glyph_mask = split_glyph(text, text_mask, int(cfg.text_embed_2_dim))
        dtype = self.dtype_in()
        image = x.new_zeros(x.shape[0], 1, int(cfg.image_embed_dim), dtype=dtype)  # no image: masked out
        if image_states is not None:
            image = image_states.to(dtype)
        x_in = self.with_condition(x, condition) if self.condition_channels else self.with_zeros(x)
        out = self.transformer(hidden_states=x_in.to(dtype), timestep=t.to(dtype),
                               encoder_hidden_states=qwen.to(dtype), encoder_attention_mask=qwen_mask.to(dtype),
                               encoder_hidden_states_2=glyph.to(dtype), encoder_attention_mask_2=glyph_mask.to(dtype),
                               image_embeds=image, return_dict=False)[0]  # [B, C, t, h, w]
        return out.to(x.dtype)
