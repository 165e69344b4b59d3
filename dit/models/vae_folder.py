"""What a pretrained VAE folder is, read from its config.json alone (no weights): the family's diffusers class, the
latent channels and the temporal / spatial compression that every frame and size rule derives from.

    vae_geometry("ltx", "/models/LTX-Video/vae")  ->  VAEGeometry(latent_channels=128, temporal=8, spatial=32)

The config is merged over the diffusers constructor's defaults, so a key the file leaves out reads as the loaded
VAE will have it; each family's formula is the one its diffusers pipeline uses. Torch-free at import (dit.config
calls this); diffusers is imported only to read a constructor's defaults.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from typing import Any, NamedTuple

from dit.models.diffusers_folder import read_diffusers_folder


class VAEGeometry(NamedTuple):
    latent_channels: int
    temporal: int  # frames per latent frame after the first: clips of temporal*k + 1 frames
    spatial: int  # pixels per latent position along H and W


def _ltx(c: dict[str, Any]) -> tuple[int, int]:
    """AutoencoderKLLTXVideo.__init__: patch sizes times 2 per spatio-temporal downscaling, unless given."""
    scale = 2 ** sum(bool(s) for s in c["spatio_temporal_scaling"])
    return (c["temporal_compression_ratio"] or c["patch_size_t"] * scale,
            c["spatial_compression_ratio"] or c["patch_size"] * scale)


class Family(NamedTuple):
    class_name: str  # diffusers' VAE class
    channels_key: str  # its config key for the latent channels
    compression: Callable[[dict[str, Any]], tuple[int, int]]  # (temporal, spatial) as its pipeline reads them
    # the released model's config over the constructor's defaults, where these are another model's (AutoencoderKL's
    # are a tiny SD 1.x one): FLUX.1's vae/config.json
    released: dict[str, Any] = {}


FAMILIES: dict[str, Family] = {
    "wan": Family("AutoencoderKLWan", "z_dim",  # WanPipeline: vae.config.scale_factor_temporal / _spatial
                  lambda c: (c["scale_factor_temporal"], c["scale_factor_spatial"])),
    "cogvideox": Family("AutoencoderKLCogVideoX", "latent_channels",  # CogVideoXPipeline: 2**(levels - 1) in space
                        lambda c: (c["temporal_compression_ratio"], 2 ** (len(c["block_out_channels"]) - 1))),
    "hunyuan": Family("AutoencoderKLHunyuanVideo", "latent_channels",
                      lambda c: (c["temporal_compression_ratio"], c["spatial_compression_ratio"])),
    # HunyuanVideo 1.5's: 32 channels, 16x in space (HunyuanVideo15Pipeline: the config's compression ratios)
    "hunyuan15": Family("AutoencoderKLHunyuanVideo15", "latent_channels",
                        lambda c: (c["temporal_compression_ratio"], c["spatial_compression_ratio"])),
    "ltx": Family("AutoencoderKLLTXVideo", "latent_channels", _ltx),
    # an image VAE (AutoencoderKL): each frame coded on its own, no temporal compression; FluxPipeline: 2**(levels - 1)
    "flux": Family("AutoencoderKL", "latent_channels", lambda c: (1, 2 ** (len(c["block_out_channels"]) - 1)),
                   released=dict(latent_channels=16, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                                 down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                                 scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                                 use_post_quant_conv=False, sample_size=1024)),
    # Stable Diffusion 3 / 3.5's (the same class and sizes, its own weights and normalisation)
    "sd3": Family("AutoencoderKL", "latent_channels", lambda c: (1, 2 ** (len(c["block_out_channels"]) - 1)),
                  released=dict(latent_channels=16, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                                scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                                use_post_quant_conv=False, sample_size=1024)),
}
# Qwen-Image's: a Wan 2.1-like causal 3D VAE (per-channel latent mean and std), used on single frames
FAMILIES["qwenimage"] = Family("AutoencoderKLQwenImage", "z_dim",
                               lambda c: (2 ** sum(c["temperal_downsample"]), 2 ** len(c["temperal_downsample"])))
IMAGE_VAES = ("flux", "sd3")  # AutoencoderKL: each frame coded on its own


def _defaults(family: str, released: bool = False) -> dict[str, Any]:
    """The keyword defaults of a family's diffusers VAE constructor; ``released``: with its released model's config
    over them (what a folder is read over is the constructor's own defaults, as from_pretrained fills them)."""
    import diffusers

    spec = FAMILIES[family]
    params = inspect.signature(getattr(diffusers, spec.class_name).__init__).parameters.values()
    defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    return {**defaults, **spec.released} if released else defaults


def family_config(family: str, path: str | os.PathLike) -> dict[str, Any]:
    """PATH/config.json over the constructor's defaults, after checking that PATH is a local diffusers folder of the
    family's class with safetensors weights; ValueError (FileNotFoundError) naming the path and the fix."""
    if family not in FAMILIES:
        raise ValueError(f"unknown VAE family {family!r}; choose one of {sorted(FAMILIES)} (or ours)")
    spec = FAMILIES[family]
    config = read_diffusers_folder(path, key="vae.pretrained", class_name=spec.class_name, subfolder="vae",
                                   family_key="vae.family", family=family,
                                   family_of_class={s.class_name: f for f, s in FAMILIES.items() if f != "sd3"})
    return {**_defaults(family), **config}


def geometry_of(family: str, config: dict[str, Any]) -> VAEGeometry:
    """Latent channels and compression of a (merged or loaded) config of this family."""
    spec = FAMILIES[family]
    temporal, spatial = spec.compression(config)
    return VAEGeometry(int(config[spec.channels_key]), int(temporal), int(spatial))


def vae_geometry(family: str, path: str | os.PathLike | None,
                 overrides: dict[str, Any] | None = None) -> VAEGeometry:
    """The latent channels and compression of the family's VAE in PATH, from its config.json (no weights read);
    PATH None: of the diffusers constructor's defaults, which are the released model's (Wan 2.1, CogVideoX, LTX),
    with ``overrides`` (vae.family_config: another release's sizes, e.g. Wan 2.2's VAE), which a folder must agree
    with. ValueError naming an unknown key or a disagreement."""
    overrides = overrides or {}
    defaults = _defaults(family, released=True)
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ValueError(f"vae.family_config: {unknown} are not {FAMILIES[family].class_name} arguments; valid: "
                         f"{', '.join(sorted(defaults))}")
    if path is None:
        return geometry_of(family, {**defaults, **overrides})
    config = family_config(family, path)
    differ = {k: (v, config.get(k)) for k, v in overrides.items() if config.get(k) != v}
    if differ:
        listed = ", ".join(f"{k}={want} but the folder has {have}" for k, (want, have) in differ.items())
        raise ValueError(f"vae.family_config: {listed} ({path}/config.json): that folder holds another VAE than the "
                         "config describes; point vae.pretrained at the right one, or drop vae.family_config")
    return geometry_of(family, config)
