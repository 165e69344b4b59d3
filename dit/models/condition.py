"""Image-to-video conditioning (model.condition=first_frame): what the DiT is given beside the noisy latents.

The form is Wan I2V's and CogVideoX-I2V's: channel concatenation. The condition is a latent clip of the same grid
as the noisy latents, [B, C + 1, t, h, w]: channels 0..C-1 hold the first frame's (normalized) latent at latent
frame 0 and zeros at every later frame; the last channel is a mask, 1 at latent frame 0 where a first frame is
given. The DiT concatenates it to the noisy latents ([B, 2C + 1, t, h, w]) before its patch embedding; its output
stays [B, C, t, h, w]. For our causal VAE, latent frame 0 encodes pixel frame 0 alone (dit/models/vae.py), so the
image's own latent (a 1-frame clip) is exactly what sits at t = 0 and one mask channel suffices (Wan's VAE needs
four mask channels, one per pixel frame folded into a latent frame).

A sample without a condition (training's dropped share, or text-to-video sampling) gets all zeros, the mask too:
the model tells "no image" from "a black image" by the mask. ``None`` in the DiT means that.

A pretrained CogVideoX-I2V transformer takes the same condition without the mask channel ([B, C, t, h, w]: the
image latent at frame 0, zeros after it, CogVideoXImageToVideoPipeline's ``image_latents``), so ``mask=False``
builds that form; which form a denoiser takes is its ``condition_mask`` attribute. Wan and LTX models take the form
with the mask, but put the latent in place of the noisy first frame and give its tokens timestep 0 (Wan 2.2 TI2V,
LTX's image-to-video; dit/models/families/base.py ``replaced``), so the loss leaves that frame out where an image
was given.

A Wan image-to-video transformer that takes more input channels than it gives (Wan 2.1 I2V, Wan 2.2 I2V A14B: 36 =
16 + 4 + 16) takes the third form, the code form, WanImageToVideoPipeline's without expand_timesteps: a mask of
``temporal`` channels (one per pixel frame folded into a latent frame: all 1 at latent frame 0), then the VAE code
(posterior mode, normalized) of the whole clip [image, grey, grey, ...] (zeros in [-1, 1]), [B, temporal + C, t, h,
w]. Wan 2.1's (its config has ``image_dim``) also takes the image's CLIP states (dit/models/image_encoder.py). That
code carries the image into every latent frame, so it is coded from pixels, not cut from the clip's own latents.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

CONDITIONS = ("none", "first_frame")


def _wan_config(model_cfg: Any) -> dict[str, Any] | None:
    """The diffusers config of model_cfg's Wan transformer under model.condition=first_frame, else None."""
    if getattr(model_cfg, "condition", "none") != "first_frame" or model_cfg.family != "wan":
        return None
    from dit.models.families import family_config

    return family_config("wan", model_cfg.pretrained, model_cfg.family_config)


def code_condition(model_cfg: Any) -> bool:
    """Whether model_cfg (a ModelConfig) conditions on an image in the code form (Wan 2.1 I2V, Wan 2.2 I2V A14B:
    a transformer with more input channels than output ones) under model.condition=first_frame."""
    dcfg = _wan_config(model_cfg)
    return dcfg is not None and (bool(dcfg.get("image_dim")) or
                                 int(dcfg.get("in_channels", 0)) != int(dcfg.get("out_channels") or
                                                                        dcfg.get("in_channels", 0)))


def last_frame_condition(model_cfg: Any) -> bool:
    """Whether model_cfg's code form also takes the clip's last frame (Wan 2.1 FLF2V: ``pos_embed_seq_len``, the
    CLIP states of two images): the code of [first, grey..., last], the mask on both, both images' CLIP states."""
    dcfg = _wan_config(model_cfg)
    return dcfg is not None and bool(dcfg.get("pos_embed_seq_len"))


def image_frames(model_cfg: Any) -> str:
    """Which frames a code-form condition holds, as latent shards record it: "first", or "first_last" (FLF2V)."""
    return "first_last" if last_frame_condition(model_cfg) else "first"


def clip_condition(model_cfg: Any) -> bool:
    """Whether model_cfg's image condition also takes the image's CLIP states (Wan 2.1 I2V: ``image_dim``) or
    SigLIP states (HunyuanVideo 1.5 under model.condition=first_frame)."""
    if model_cfg.family == "hunyuan15":
        return getattr(model_cfg, "condition", "none") == "first_frame"
    dcfg = _wan_config(model_cfg)
    return dcfg is not None and bool(dcfg.get("image_dim"))


def check_code_condition(cfg: Any) -> None:
    """A run (a Config) of a Wan I2V transformer of the code form has what it needs: a VAE of the mask's width; Wan
    2.1's the CLIP encoder and 512-token text; FLF2V's clips longer than one latent frame. ConfigError names what is
    missing."""
    from dit.config import ConfigError
    from dit.models.families import WAN_MASK_CHANNELS
    from dit.models.families.wan import WAN_TEXT_TOKENS

    _, temporal, _ = cfg.vae.geometry()
    if temporal != WAN_MASK_CHANNELS:
        raise ConfigError(f"vae: a Wan image-to-video transformer's mask has {WAN_MASK_CHANNELS} channels, one per "
                          f"frame a latent frame folds, but this VAE folds {temporal}; use Wan's VAE")
    d = cfg.data
    shortest = min(d.buckets.frames) if d.buckets.enabled else d.frames
    if last_frame_condition(cfg.model) and shortest <= temporal:
        raise ConfigError(f"data.frames: a Wan 2.1 FLF2V model takes a clip's first and last frames in different "
                          f"latent frames, so its clips need more than {temporal} frames (got {shortest}"
                          f"{' in data.buckets.frames' if d.buckets.enabled else ''}); train on clips of 5 or more")
    if not clip_condition(cfg.model):
        return
    _require_image_encoder(cfg)
    if cfg.text.max_length != WAN_TEXT_TOKENS:
        raise ConfigError(f"text.max_length={cfg.text.max_length}: a Wan 2.1 image-to-video transformer takes "
                          f"{WAN_TEXT_TOKENS} text tokens (its attention splits image from text by that count); "
                          f"set text.max_length={WAN_TEXT_TOKENS}")


def check_image_condition(cfg: Any) -> None:
    """What a run or `dit encode` (a Config) of an image-to-video transformer needs beyond its config's own checks
    (dit.family_rules): Wan's code form (``check_code_condition``) and the image encoder of a model that takes its
    states (HunyuanVideo 1.5's SigLIP). ConfigError names what is missing."""
    if code_condition(cfg.model):
        check_code_condition(cfg)
    elif clip_condition(cfg.model):
        _require_image_encoder(cfg)


def _require_image_encoder(cfg: Any) -> None:
    from dit.config import ConfigError
    from dit.family_rules import IMAGE_ENCODERS

    if not cfg.model.image_encoder:
        name, kind, example = IMAGE_ENCODERS[cfg.model.family]
        raise ConfigError(f"model.image_encoder is not set: a {name} image-to-video transformer takes the first "
                          f"frame's {kind} states; pass model.image_encoder={example}")


def condition_mask(model_cfg: Any) -> bool:
    """Whether model_cfg's first-frame condition has the mask channel (our DiT, Wan, LTX, HunyuanVideo 1.5) or not
    (CogVideoX-I2V): a family's has it in the replace form (its adapter's ``condition_mask``)."""
    return model_cfg.family in ("dit", "hunyuan15") or condition_replaces(model_cfg)


def condition_replaces(model_cfg: Any) -> bool:
    """Whether model_cfg's model takes the condition in place of the first latent frame (Wan as Wan 2.2 TI2V, LTX),
    so that frame is left out of the loss where an image was given (its velocity target means nothing there): the
    family adapter's ``replace_condition``, except a Wan transformer of the code form (``code_condition``)."""
    if model_cfg.family == "dit":
        return False
    from dit.models.families import FAMILIES

    return FAMILIES[model_cfg.family].replace_condition and not code_condition(model_cfg)


def condition_channels(condition: str, latent_channels: int) -> int:
    """Channels the condition adds to the DiT's input: 0 for none, C + 1 (latent + mask) for first_frame."""
    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}; expected one of {CONDITIONS}")
    return 0 if condition == "none" else latent_channels + 1


def first_frame_condition(first: Tensor, latent_frames: int, keep: Tensor | None = None,
                          mask: bool = True) -> Tensor:
    """The first-frame latent [B, C, 1, h, w] (normalized) -> the condition [B, C + 1, latent_frames, h, w]: the
    latent at t = 0 and zeros after it, then the mask channel (1 at t = 0); ``mask=False``: no mask channel
    ([B, C, t, h, w], CogVideoX-I2V's form). ``keep`` [B] bool: rows where it is False get no condition (all zeros,
    the mask too)."""
    if first.ndim != 5 or first.shape[2] != 1:
        raise ValueError(f"expected a first-frame latent [B, C, 1, h, w], got {tuple(first.shape)}")
    b, c, _, h, w = first.shape
    cond = first.new_zeros(b, c + int(mask), latent_frames, h, w)  # [B, C (+ 1), t, h, w]
    cond[:, :c, :1] = first  # the latent at t = 0
    if mask:
        cond[:, c, 0] = 1.0
    if keep is not None:
        cond = cond * keep.to(device=cond.device, dtype=cond.dtype).view(b, 1, 1, 1, 1)
    return cond


def draw_first_frame_condition(first: Tensor, latent_frames: int, prob: float, noise_std: float,
                               generator: torch.Generator, mask: bool = True) -> Tensor:
    """Training's condition for a batch: each row keeps its first frame with probability ``prob`` (else zeros, so
    the model stays a text-to-video model too), and its latent gets Gaussian noise of a std drawn uniformly from
    [0, noise_std] per row (noise augmentation, as CogVideoX-I2V draws one per sample around e^-3 ~ 0.05; the range
    includes the clean latent given at sampling). Always three draws on ``generator`` (keep, std, noise), so the
    random stream does not depend on prob."""
    b = first.shape[0]
    keep = torch.rand(b, generator=generator) < prob  # [B]
    std = torch.rand(b, generator=generator) * noise_std  # [B]
    noise = torch.randn(first.shape, generator=generator)  # [B, C, 1, h, w]
    noisy = first + (std.view(b, 1, 1, 1, 1) * noise).to(device=first.device, dtype=first.dtype)
    return first_frame_condition(noisy, latent_frames, keep, mask)


def clip_mask(latent_frames: int, h: int, w: int, temporal: int, last: bool = False) -> Tensor:
    """The code form's mask [1, temporal, t, h, w]: 1 on every channel of latent frame 0 (the given image, repeated
    once per pixel frame a latent frame folds), 0 after it; ``last`` (FLF2V): and 1 on the last channel of the last
    latent frame (the last pixel frame it folds)."""
    mask = torch.zeros(1, temporal, latent_frames, h, w)
    mask[:, :, 0] = 1.0
    if last:
        mask[:, -1, -1] = 1.0
    return mask


@torch.no_grad()
def image_code(vae: Any, first: Tensor, frames: int, last: Tensor | None = None) -> Tensor:
    """The code form's image code: first frames [B, 3, H, W] in [-1, 1] followed by zero frames to ``frames`` in
    all (the last of them ``last`` instead, FLF2V), coded by the VAE (posterior mode, normalized) -> [B, C, t, h, w]
    (fp32), as WanImageToVideoPipeline.prepare_latents."""
    b, _, h, w = first.shape
    given = [first[:, :, None].float()]
    zeros = first.new_zeros(b, 3, frames - 1 - (last is not None), h, w, dtype=torch.float32)
    clip = torch.cat([*given, zeros, *([] if last is None else [last[:, :, None].float()])], 2)
    return vae.normalize(vae.encode(clip).mode()).float()


@torch.no_grad()
def clip_states_of(image_encoder: Any, first: Tensor, last: Tensor | None = None) -> Tensor:
    """The CLIP states a Wan 2.1 I2V transformer takes: the first frames' [B, n, D], and FLF2V's the last frames'
    after them [B, 2n, D] (WanImageToVideoPipeline.encode_image([image, last_image]))."""
    states = image_encoder.encode(first)
    return states if last is None else torch.cat([states, image_encoder.encode(last)], dim=1)


def draw_code_condition(code: Tensor, temporal: int, prob: float, noise_std: float,
                        generator: torch.Generator, last: bool = False) -> tuple[Tensor, Tensor]:
    """Training's code-form condition from the image codes [B, C, t, h, w] (``image_code``) -> (condition
    [B, temporal + C, t, h, w]: the mask first, as the pipeline has it; keep [B] bool). Rows keep it with
    probability ``prob`` (else all zeros: the caller zeroes their CLIP states too) and get noise of a std drawn in
    [0, noise_std], with the same three draws as ``draw_first_frame_condition``. ``last``: FLF2V's mask."""
    b, _, t, h, w = code.shape
    keep = torch.rand(b, generator=generator) < prob  # [B]
    std = torch.rand(b, generator=generator) * noise_std  # [B]
    noise = torch.randn(code.shape, generator=generator)  # [B, C, t, h, w]
    noisy = code + (std.view(b, 1, 1, 1, 1) * noise).to(device=code.device, dtype=code.dtype)
    mask = clip_mask(t, h, w, temporal, last).to(device=code.device, dtype=code.dtype).expand(b, -1, -1, -1, -1)
    cond = torch.cat([mask, noisy], dim=1)  # [B, temporal + C, t, h, w]
    keep = keep.to(code.device)
    return cond * keep.to(cond.dtype).view(b, 1, 1, 1, 1), keep
