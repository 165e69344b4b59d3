"""The denoiser families in one registry: our DiT ("dit") or a pretrained diffusers transformer behind the same contract
(Wan, CogVideoX, LTX, HunyuanVideo, HunyuanVideo 1.5; for images FLUX.1, Stable Diffusion 3, Z-Image and Qwen-Image).
``build_denoiser`` makes one from a ModelConfig (a local diffusers folder, or random weights at the family's sizes);
``denoiser_from_config`` rebuilds one from a checkpoint's config.json "dit" entry.

Every mismatch (missing folder, not a diffusers model, another class, latent channels or text width that differ
from the VAE's and the text encoder's) raises ConfigError or FileNotFoundError before any weights load."""

from __future__ import annotations

import json
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from dit.config import TEXT_OF_FAMILY, ConfigError
from dit.models.families.base import DistilledDualStream, FamilyDenoiser, jsonable, read_folder
from dit.models.families.cogvideox import CogVideoXDenoiser
from dit.models.families.flux import FluxDenoiser
from dit.models.families.hunyuan import HunyuanVideoDenoiser
from dit.models.families.hunyuan15 import HunyuanVideo15Denoiser
from dit.models.families.ltx import LTXDenoiser, rope_interpolation_scale
from dit.models.families.qwenimage import QwenImageDenoiser
from dit.models.families.sd3 import SD3Denoiser
from dit.models.families.wan import WanDenoiser
from dit.models.families.zimage import ZImageDenoiser

WAN_MASK_CHANNELS = 4  # Wan 2.1 I2V's mask: one channel per pixel frame a latent frame folds (its VAE's 4)

FAMILIES: dict[str, type[FamilyDenoiser]] = {"wan": WanDenoiser, "cogvideox": CogVideoXDenoiser, "ltx": LTXDenoiser,
                                             "hunyuan": HunyuanVideoDenoiser, "flux": FluxDenoiser,
                                             "sd3": SD3Denoiser, "zimage": ZImageDenoiser,
                                             "qwenimage": QwenImageDenoiser, "hunyuan15": HunyuanVideo15Denoiser}
FAMILY_NAMES = ("dit", *FAMILIES)  # model.family


def pads_frames(family: str) -> bool:
    """Whether a model family pads the latent frames its temporal patch does not divide, instead of refusing such
    clips (CogVideoX 1.5 at 81 frames)."""
    return family in FAMILIES and FAMILIES[family].pads_frames


def sample_guidance(family: str) -> float | None:
    """The embedded guidance scale a guidance-distilled family samples at by default (its pipeline's
    guidance_scale: HunyuanVideo 6.0, FLUX.1-dev 3.5); None for the others."""
    return getattr(FAMILIES.get(family), "sample_guidance", None)


def frame_pad(family: str, latent_frames: int, patch_t: int) -> int:
    """Latent frames a model pads at the front of a clip so its temporal patch divides them: CogVideoX 1.5's
    pipelines draw and drop that many extra frames, and its fine-tuning repeats latent frame 0 (0 for a count the
    patch divides, and for families that refuse it)."""
    return (-latent_frames) % patch_t if pads_frames(family) else 0


def family_of_class(class_name: str | None) -> str | None:
    """The family whose diffusers class is ``class_name`` (for error hints)."""
    return next((name for name, cls in FAMILIES.items() if cls.class_name == class_name), None)


def family_config(family: str, pretrained: str | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """The diffusers config of a family: the folder's config.json (checked), or the constructor's defaults with
    ``model.family_config`` overrides (unknown keys refused)."""
    cls = FAMILIES[family]
    defaults = cls.defaults()
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ConfigError(f"model.family_config: {unknown} are not {cls.class_name} arguments; valid: "
                          f"{', '.join(sorted(defaults))}")
    if pretrained:  # the folder's config.json gives the sizes; family_config (a config file's record) must agree
        config = read_folder(pretrained, family, cls.class_name)
        merged = jsonable({**defaults, **config})
        differ = {k: (v, merged.get(k)) for k, v in jsonable(overrides).items() if merged.get(k) != v}
        if differ:
            listed = ", ".join(f"{k}={want} but the folder has {have}" for k, (want, have) in differ.items())
            raise ConfigError(f"model.family_config: {listed} ({pretrained}/config.json): that folder holds another "
                              "model than the config describes; point model.pretrained at the right one, or drop "
                              "model.family_config")
        return config
    return {**defaults, **overrides, "_class_name": cls.class_name}


def family_patch(family: str, pretrained: str | None, overrides: dict[str, Any]) -> list[int]:
    """[pt, ph, pw] of a family's transformer, from its config alone (no model built)."""
    return list(FAMILIES[family].sizes(family_config(family, pretrained, overrides))["patch_size"])


def check_fit(model_cfg: Any, in_channels: int, text_dim: int) -> None:
    """model_cfg's denoiser takes latents of ``in_channels`` and text of width ``text_dim`` (from the configs alone:
    call it with the VAE folder's latent channels and the text encoder's width before loading either)."""
    family = getattr(model_cfg, "family", "dit")
    if family in FAMILIES:
        dcfg = _fill(FAMILIES[family], model_cfg, in_channels, text_dim)
        _check_fit(FAMILIES[family], dcfg, model_cfg, in_channels, text_dim)


def _where(model_cfg: Any) -> str:
    return f"model.pretrained {model_cfg.pretrained!r}" if model_cfg.pretrained else "model.family_config"


def _fill(cls: type[FamilyDenoiser], model_cfg: Any, in_channels: int, text_dim: int) -> dict[str, Any]:
    """The family's diffusers config; a random-weight one takes the VAE's channels and the text width unless
    model.family_config sets them."""
    dcfg = family_config(cls.family, model_cfg.pretrained, model_cfg.family_config)
    if not model_cfg.pretrained:
        given = model_cfg.family_config
        first_frame = getattr(model_cfg, "condition", "none") == "first_frame"
        i2v = cls.concat_condition and first_frame
        clip = bool(dcfg.get("image_dim")) and first_frame  # Wan 2.1 I2V: latents + a 4-channel mask + the code
        fill = {"in_channels": 2 * in_channels + WAN_MASK_CHANNELS if clip else 2 * in_channels if i2v
                else cls.random_in_channels(in_channels), cls.text_key: text_dim}
        if "out_channels" in dcfg:
            # (a packing family's output: the packed channels over its own patch, FLUX.1's 4C at patch 1, Qwen-Image's C
            # at patch 2)
            out = in_channels
            if cls.channel_pack > 1:
                out = in_channels * cls.channel_pack // int(dcfg.get("patch_size", 1)) ** 2
            fill["out_channels"] = in_channels if i2v or clip else given.get("in_channels", out)
        dcfg.update({k: v for k, v in fill.items() if k not in given})
    return dcfg


def _check_fit(cls: type[FamilyDenoiser], dcfg: dict[str, Any], model_cfg: Any, in_channels: int,
               text_dim: int) -> None:
    """The transformer must take the VAE's latent channels and the text encoder's width, and an image condition
    exactly when model.condition=first_frame."""
    where = _where(model_cfg)
    image_encoder = getattr(model_cfg, "image_encoder", None)
    if dcfg.get("image_dim") and image_encoder:  # Wan 2.1 I2V: its CLIP states' width
        from dit.models.image_encoder import image_encoder_width

        width = image_encoder_width(image_encoder)
        if width != int(dcfg["image_dim"]):
            raise ConfigError(f"{where}: the Wan 2.1 I2V transformer takes CLIP states of width {dcfg['image_dim']} "
                              f"(image_dim) but model.image_encoder {image_encoder!r} gives {width}; use the "
                              "image_encoder/ folder of the same Wan 2.1 I2V download")
    elif image_encoder and cls is HunyuanVideo15Denoiser:  # its SigLIP states' width
        from dit.models.image_encoder import image_encoder_width

        width = image_encoder_width(image_encoder)
        if width != int(dcfg["image_embed_dim"]):
            raise ConfigError(f"{where}: the HunyuanVideo 1.5 transformer takes SigLIP states of width "
                              f"{dcfg['image_embed_dim']} (image_embed_dim) but model.image_encoder {image_encoder!r} "
                              f"gives {width}; use the image_encoder/ folder of the same HunyuanVideo 1.5 I2V "
                              "download")
    elif image_encoder:
        raise ConfigError(f"model.image_encoder is set but {where} is not a Wan 2.1 or HunyuanVideo 1.5 "
                          "image-to-video transformer; remove model.image_encoder")
    if dcfg.get("use_meanflow"):  # HunyuanVideo 1.5's step-distilled releases: their sampler also gives the next step
        raise ConfigError(f"{where}: a step-distilled (MeanFlow: use_meanflow) HunyuanVideo 1.5 transformer takes the "
                          "next step's timestep beside each one, which neither this sampler nor flow-matching training "
                          "gives; fine-tune the download that is not step-distilled")
    if dcfg.get("image_condition_type"):  # HunyuanVideo-I2V: the image's latent concatenated or in place of frame 0
        raise ConfigError(f"{where}: a HunyuanVideo image-to-video transformer (image_condition_type "
                          f"{dcfg['image_condition_type']!r}) is not supported; fine-tune the text-to-video one")
    extra = cls.condition_width(dcfg)
    latent = int(dcfg["in_channels"]) // cls.channel_pack - extra - cls.zero_inputs(dcfg)
    if latent != in_channels:
        takes = f"{latent} latent channels (+ {extra} of an image condition)" if extra else f"{latent} latent channels"
        if cls.channel_pack > 1:
            takes += f" (in_channels {dcfg['in_channels']}: {cls.channel_pack} positions per token)"
        raise ConfigError(f"{where}: the {cls.family} transformer takes {takes} but "
                          f"the VAE gives {in_channels}; use the VAE this transformer was trained with "
                          f"(vae.family / vae.pretrained){'' if 'pretrained' in where else ' or change in_channels'}")
    if cls is WanDenoiser and extra and extra != latent + WAN_MASK_CHANNELS:
        raise ConfigError(f"{where}: a Wan image-to-video transformer takes {latent} latent channels + a "
                          f"{WAN_MASK_CHANNELS}-channel mask + {latent} of the image's code = "
                          f"{2 * latent + WAN_MASK_CHANNELS} input channels, not {dcfg['in_channels']}")
    condition = getattr(model_cfg, "condition", "none")
    if extra and condition != "first_frame":
        raise ConfigError(f"{where}: an image-to-video {cls.family} transformer (in_channels {dcfg['in_channels']} ="
                          f" {latent} latent + {extra} image-condition channels): set model.condition=first_frame")
    # (a transformer whose extra inputs a text-to-video call fills with zeros takes the condition there)
    if not extra and condition == "first_frame" and not cls.replace_condition and not cls.zero_inputs(dcfg):
        raise ConfigError(f"{where}: a text-to-video {cls.family} transformer (in_channels {dcfg['in_channels']} = "
                          f"the VAE's latent channels) cannot take model.condition=first_frame; use an image-to-video "
                          f"one (in_channels = 2 x latent channels, e.g. CogVideoX-5b-I2V's transformer folder)")
    if int(dcfg[cls.text_key]) != text_dim:
        encoder = cls.family if cls.family in TEXT_OF_FAMILY else "hf"
        raise ConfigError(f"{where}: the {cls.family} transformer takes text states of width {dcfg[cls.text_key]} "
                          f"({cls.text_key}) but the text encoder gives {text_dim}; use the text encoder it was "
                          f"trained with (text.encoder={encoder}, text.path=...)")


def _options(cls: type[FamilyDenoiser], model_cfg: Any, compression: tuple[int, int] | None) -> dict[str, Any]:
    first_frame = getattr(model_cfg, "condition", "none") == "first_frame"
    if cls is LTXDenoiser:
        return dict(rope_interpolation_scale=rope_interpolation_scale(compression, model_cfg.frame_rate),
                    first_frame=first_frame)
    if cls in (WanDenoiser, HunyuanVideo15Denoiser):
        return dict(first_frame=first_frame)
    if issubclass(cls, DistilledDualStream):  # HunyuanVideo, FLUX.1
        return dict(guidance=model_cfg.guidance)
    return {}


def build_denoiser(model_cfg: Any, in_channels: int, text_dim: int, *, compression: tuple[int, int] | None = None,
                   load_weights: bool = True) -> nn.Module:
    """The denoiser of ``model_cfg`` (a ModelConfig) for latents of ``in_channels`` and text of width ``text_dim``.

    ``compression``: the VAE's (temporal, spatial) compression (LTX scales its RoPE by it; default LTX's VAE).
    ``load_weights=False`` builds a pretrained family at its folder's sizes without reading the weights (for
    sizing on the meta device). Without model.pretrained a family gets random weights, and takes the VAE's channels
    and the text width unless model.family_config sets them."""
    family = getattr(model_cfg, "family", "dit")
    if family == "dit":
        from dit.models.dit import build_dit

        return build_dit(model_cfg, in_channels=in_channels, text_dim=text_dim)
    if family not in FAMILIES:
        raise ConfigError(f"model.family: unknown family {family!r}; choose one of {', '.join(FAMILY_NAMES)}")
    cls, pretrained = FAMILIES[family], model_cfg.pretrained
    dcfg = _fill(cls, model_cfg, in_channels, text_dim)
    _check_fit(cls, dcfg, model_cfg, in_channels, text_dim)
    tcls = cls.transformer_class()
    if pretrained and load_weights:
        transformer = tcls.from_pretrained(pretrained, torch_dtype=torch.float32)
    else:
        transformer = tcls.from_config(dcfg)
    return cls(transformer, **_options(cls, model_cfg, compression))


def meta_model_config(cfg: Any, in_channels: int, text_dim: int,
                      compression: tuple[int, int]) -> dict[str, Any]:
    """The "dit" config entry the model of ``cfg`` will have, built on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        model = build_denoiser(cfg.model, in_channels=in_channels, text_dim=text_dim, compression=compression,
                               load_weights=False)
    return json.loads(json.dumps(model.config))


def held_weights(weights: dict[str, torch.Tensor], family: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A denoiser's state dict with its floating weights in ``dtype`` (in place, one tensor at a time: no second full
    copy), except what a family's transformer keeps in fp32 under diffusers' ``from_pretrained(torch_dtype=...)``
    (its ``_keep_in_fp32_modules``: Wan's norms and modulation tables, for one)."""
    keep = (getattr(FAMILIES[family].transformer_class(), "_keep_in_fp32_modules", None) or []
            if family in FAMILIES else [])
    for key, value in weights.items():
        if value.is_floating_point() and not any(k in key.split(".") for k in keep):
            weights[key] = value.to(dtype)
    return weights


def denoiser_from_config(config: dict[str, Any], weights: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Rebuild a denoiser from its ``.config`` (a checkpoint's config.json "dit" entry); with ``weights`` (its
    state dict) the parameters are those tensors, loaded strictly without a random initialisation first."""
    family = config.get("family", "dit")
    if family != "dit" and family not in FAMILIES:
        raise ConfigError(f"checkpoint config: unknown model family {family!r}; this version knows "
                          f"{', '.join(FAMILY_NAMES)}")
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False) if weights is not None else nullcontext():
        if family == "dit":
            from dit.models.dit import DiT

            args = {k: v for k, v in config.items() if k != "family"}
            model: nn.Module = DiT(**{**args, "patch_size": tuple(config["patch_size"])})
        else:
            cls = FAMILIES[family]
            model = cls(cls.transformer_class().from_config(config["diffusers"]),
                        **{k: config[k] for k in cls.option_keys if k in config})  # (older: defaults)
    if weights is not None:
        model.load_state_dict(weights, strict=True, assign=True)
    return model

