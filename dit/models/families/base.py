"""What every pretrained-family adapter shares: reading and checking a local diffusers transformer folder, the
family's constructor defaults, and the denoiser attributes the rest of the code relies on (config, patch, blocks,
in_channels, text_dim). The diffusers model sits at ``self.transformer``, so state-dict keys are
``transformer.<diffusers name>``, the prefix of diffusers' own LoRA files."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from dit.models.diffusers_folder import read_diffusers_folder


def diffusers_class(class_name: str) -> type:
    """The diffusers model class of that name (imported on use: diffusers is large)."""
    import diffusers

    return getattr(diffusers, class_name)


def jsonable(config: Any) -> dict[str, Any]:
    """A diffusers config as plain JSON values (tuples become lists), without the loader's private entries."""
    keep = {k: v for k, v in dict(config).items() if k not in ("_name_or_path", "_use_default_values")}
    return json.loads(json.dumps(keep))


class FamilyDenoiser(nn.Module):
    """A diffusers video transformer behind our denoiser contract:
    forward(x [B, C, t, h, w], t [B], text [B, L, D], text_mask [B, L]) -> prediction [B, C, t, h, w].
    Subclasses set the class attributes and ``forward``, and say how their config gives our sizes."""

    family: ClassVar[str]  # the model.family name
    class_name: ClassVar[str]  # the diffusers class (config.json's _class_name)
    blocks_attr: ClassVar[str]  # the diffusers model's ModuleList of transformer blocks
    text_key: ClassVar[str]  # the diffusers config key of the text encoder width
    prediction: ClassVar[str]  # the family's native prediction: "flow" (velocity eps - x0) or "v"
    option_keys: ClassVar[tuple[str, ...]] = ()  # adapter settings (not diffusers') kept in the config
    # the text tokens run through every block beside the clip's (self-attention over both, no cross-attention)
    joint_text: ClassVar[bool] = False
    # image-to-video (model.condition=first_frame): whether the family has a transformer that takes the first-frame
    # latent concatenated to its input channels (in_channels = 2 x out_channels: CogVideoX-I2V), without a mask
    # channel (dit/models/condition.py)
    concat_condition: ClassVar[bool] = False
    # or whether it replaces the first latent frame by the image's and gives its tokens timestep 0 (Wan 2.2 TI2V's
    # expand_timesteps); the condition then carries the mask channel, which says where (``replaced``)
    replace_condition: ClassVar[bool] = False
    # latent frames the temporal patch does not divide are padded at the front, as the family's pipelines and
    # fine-tuning do (CogVideoX 1.5 at 81 frames: 21 latent frames, 22 with the pad; ``frame_pad``)
    pads_frames: ClassVar[bool] = False
    # the transformer's input channels per latent channel: FLUX.1 packs 2 x 2 latent positions into a token (4)
    channel_pack: ClassVar[int] = 1
    title: ClassVar[str] = ""  # the model's name in errors
    # the last block's text-stream layers whose output nothing after it reads (Qwen-Image, HunyuanVideo 1.5): their
    # gradients are None, so they are frozen (DDP would wait for them) and no LoRA target (``unused_linears``)
    last_text_outputs: ClassVar[tuple[str, ...]] = ()
    # a Wan I2V transformer of the code form (dit/models/condition.py): the condition is the code of [image, grey...]
    code_condition: bool = False
    clip_image: bool = False  # and its forward takes the image's CLIP states (Wan 2.1 I2V)

    def __init__(self, transformer: nn.Module, **options: Any) -> None:
        super().__init__()
        self.transformer = transformer
        dcfg = jsonable(transformer.config)
        # in_channels: the latent channels (the VAE's); condition_channels: what an image-to-video transformer takes
        # beside them (0: text-to-video)
        self.condition_channels = self.condition_width(dcfg)
        self.zero_channels = self.zero_inputs(dcfg)
        self.in_channels = int(dcfg["in_channels"]) // self.channel_pack - self.condition_channels - self.zero_channels
        self.text_dim = int(dcfg[self.text_key])
        sizes = self.sizes(dcfg)
        self.patch: tuple[int, int, int] = tuple(sizes["patch_size"])
        self.config: dict[str, Any] = dict(family=self.family, diffusers=dcfg, in_channels=self.in_channels,
                                           text_dim=self.text_dim, prediction=self.prediction, **sizes,
                                           **{k: options[k] for k in self.option_keys})
        # the replace form's setting (model.condition=first_frame, an adapter option): its condition is the latent
        # and the mask (dit/models/condition.py)
        self.first_frame = self.replace_condition and bool(options.get("first_frame", False))
        if self.first_frame:
            self.condition_channels = self.in_channels + 1
        if self.condition_channels:
            self.config["condition_channels"] = self.condition_channels
        for name in self.unused_linears:
            self.get_submodule(name).requires_grad_(False)

    @property
    def unused_linears(self) -> list[str]:
        """The module names of ``last_text_outputs`` in the last block."""
        if not self.last_text_outputs:
            return []
        last = f"transformer.{self.blocks_attr}.{len(self.blocks) - 1}"
        return [f"{last}.{name}" for name in self.last_text_outputs]

    @property
    def condition_mask(self) -> bool:
        """Whether the image condition carries the mask channel: the replace form's does (it says where)."""
        return self.replace_condition

    def image_inputs(self, x: torch.Tensor, t: torch.Tensor,
                     condition: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """What the transformer is given for latents x, timesteps t [B] and an image condition (None: none): the
        concatenated input (CogVideoX-I2V), or the replaced frame with per-token timesteps [B, N] (Wan, LTX)."""
        if self.first_frame:
            return self.replaced(x, t, condition)
        return self.with_condition(x, condition), t

    @classmethod
    def zero_inputs(cls, dcfg: dict[str, Any]) -> int:
        """Input channels a text-to-video call fills with zeros (HunyuanVideo 1.5's image latents and mask)."""
        return 0

    @classmethod
    def random_in_channels(cls, latent: int) -> int:
        """in_channels of a random-weight text-to-video transformer for ``latent`` channels."""
        return latent * cls.channel_pack

    def with_zeros(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, t, h, w] with the ``zero_inputs`` channels after it."""
        if not self.zero_channels:
            return x
        return torch.cat([x, x.new_zeros(x.shape[0], self.zero_channels, *x.shape[2:])], dim=1)

    @classmethod
    def condition_width(cls, dcfg: dict[str, Any]) -> int:
        """Input channels beyond the output's: an image-to-video transformer's condition (0 for text-to-video)."""
        if not cls.concat_condition:
            return 0
        return int(dcfg["in_channels"]) - int(dcfg.get("out_channels") or dcfg["in_channels"])

    def replaced(self, x: torch.Tensor, t: torch.Tensor,
                 condition: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The replace form: x [B, C, t, h, w] with the condition's latent where its mask is 1 (frame 0 of the rows
        given an image), and per-token timesteps [B, N] (token order f, h, w): t, and 0 on the replaced tokens."""
        c = self.in_channels
        if condition is None:
            keep = torch.zeros_like(x[:, :1], dtype=torch.float32)  # [B, 1, t, h, w]
        else:
            if condition.shape[1] != c + 1 or condition.shape[2:] != x.shape[2:]:
                raise ValueError(f"image condition of shape {tuple(condition.shape)} does not fit latents of shape "
                                 f"{tuple(x.shape)} ({c} latent channels and the mask)")
            keep = condition[:, c:].float()
            x = (x.float() * (1 - keep) + condition[:, :c].float() * keep).to(x.dtype)
        pt, ph, pw = self.patch
        ts = t.float().view(-1, 1, 1, 1) * (1 - keep[:, 0])  # [B, t, h, w]
        return x, ts[:, ::pt, ::ph, ::pw].flatten(1)  # (a patch's tokens share its first latent's timestep)

    def finish_sample(self, z: torch.Tensor, condition: torch.Tensor | None) -> torch.Tensor:
        """The sampled latents as the family's pipeline decodes them: the replace form puts the condition back
        where it stood in for them (the sampler also moved those latents, by predictions nothing used)."""
        if not self.first_frame or condition is None:
            return z
        keep = condition[:, self.in_channels:]
        return z * (1 - keep) + condition[:, :self.in_channels] * keep

    def with_condition(self, x: torch.Tensor, condition: torch.Tensor | None) -> torch.Tensor:
        """x [B, C, t, h, w] with the image condition concatenated on channels (zeros when None: no image)."""
        if not self.condition_channels:
            if condition is not None:
                raise ValueError(f"this {self.family} model takes no image condition (a text-to-video model, trained "
                                 "with model.condition=none)")
            return x
        if condition is None:
            condition = x.new_zeros(x.shape[0], self.condition_channels, *x.shape[2:])
        if condition.shape[1] != self.condition_channels or condition.shape[2:] != x.shape[2:]:
            raise ValueError(f"image condition of shape {tuple(condition.shape)} does not fit latents of shape "
                             f"{tuple(x.shape)} ({self.condition_channels} condition channels)")
        return torch.cat([x, condition.to(x.dtype)], dim=1)  # [B, C + C_cond, t, h, w]

    @property
    def blocks(self) -> nn.ModuleList:
        """The diffusers model's own block list (checkpointing, compile and FSDP act on these modules)."""
        return getattr(self.transformer, self.blocks_attr)

    @classmethod
    def sizes(cls, dcfg: dict[str, Any]) -> dict[str, Any]:
        """hidden_size, depth, num_heads, mlp_ratio, patch_size [pt, ph, pw] from the diffusers config."""
        raise NotImplementedError

    @classmethod
    def transformer_class(cls) -> type:
        return diffusers_class(cls.class_name)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """The diffusers constructor's defaults (the full-size model) as a config dict."""
        params = inspect.signature(cls.transformer_class().__init__).parameters
        return jsonable({k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty})

    def grid(self, x: torch.Tensor) -> tuple[int, int, int]:
        """The token grid of a latent [B, C, t, h, w]; refuses one the patch does not divide."""
        _, _, t, h, w = x.shape
        pt, ph, pw = self.patch
        if t % pt or h % ph or w % pw:
            raise ValueError(f"latent grid {(t, h, w)} is not divisible by the {self.family} patch size {self.patch}")
        return t // pt, h // ph, w // pw

    def image_grid(self, x: torch.Tensor, condition: torch.Tensor | None) -> tuple[int, int, int]:
        """An image model's token grid of latents [B, C, 1, h, w]; refuses more frames and an image condition."""
        if x.shape[2] != 1:
            raise ValueError(f"{self.title} is an image model: latents of one frame, got {x.shape[2]} (sample "
                             "images, data.frames=1)")
        self.with_condition(x, condition)  # (refuses an image condition: an image model takes none)
        return self.grid(x)

    def pooled_text(self, text: torch.Tensor, text_mask: torch.Tensor,
                    states: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``split_pooled`` of the text of text.encoder=<family> (a pooled row in front of ``states``), checked
        against the transformer's pooled_projection_dim."""
        from dit.models.text_pooled import split_pooled

        pooled_dim = int(self.transformer.config.pooled_projection_dim)
        if text.shape[-1] < pooled_dim or text.shape[1] < 2:
            raise ValueError(f"{self.title} takes text.encoder={self.family}'s states (a row with the pooled "
                             f"embedding of width {pooled_dim}, then {states}), got text of shape {tuple(text.shape)}")
        return split_pooled(text, text_mask, pooled_dim)

    def dtype_in(self) -> torch.dtype:
        """The dtype the pipelines cast the transformer's inputs to (its parameters')."""
        return next(self.transformer.parameters()).dtype


class DistilledDualStream(FamilyDenoiser):
    """A transformer of dual-stream blocks, then single-stream ones, over the text and the latents together, that
    may be guidance-distilled (guidance_embeds: it takes the guidance scale as an input): HunyuanVideo, FLUX.1.

    ``guidance``: the embedded scale it is given in training (model.guidance; 1.0 as finetrainers and musubi-tuner
    fine-tune them); sampling passes its own (sample.guidance, the pipeline's by default)."""

    option_keys = ("guidance",)
    joint_text = True  # the text tokens run through every block beside the latents'

    def __init__(self, transformer: nn.Module, guidance: float = 1.0) -> None:
        super().__init__(transformer, guidance=float(guidance))
        self.guidance = float(guidance)
        self.distilled = bool(transformer.config.guidance_embeds)

    @property
    def blocks(self) -> nn.ModuleList:
        """The dual-stream blocks, then the single-stream ones: what checkpointing, compile and FSDP act on."""
        t = self.transformer
        return nn.ModuleList([*t.transformer_blocks, *t.single_transformer_blocks])

    def embedded_scale(self, guidance: float | None) -> float | None:
        """The embedded guidance scale to give the transformer (``guidance``, or the training one; None for a
        transformer without it, which refuses a scale)."""
        if not self.distilled:
            if guidance is not None:
                raise ValueError(f"this {self.title} transformer has no embedded guidance (guidance_embeds false): "
                                 "sample without sample.guidance, with sample.cfg")
            return None
        return self.guidance if guidance is None else float(guidance)


def read_folder(path: str | Path, family: str, class_name: str) -> dict[str, Any]:
    """config.json of a local diffusers transformer folder of ``class_name``, checked before any work."""
    from dit.models.families import FAMILIES

    return read_diffusers_folder(path, key="model.pretrained", class_name=class_name, subfolder="transformer",
                                 family_key="model.family", family=family,
                                 family_of_class={c.class_name: f for f, c in FAMILIES.items()})
