"""Pretrained video VAEs from local diffusers folders behind our VAE contract (the one CausalVAE has).

    vae.family=wan vae.pretrained=/models/Wan2.1-T2V-1.3B-Diffusers/vae

wan: AutoencoderKLWan, cogvideox: AutoencoderKLCogVideoX, hunyuan: AutoencoderKLHunyuanVideo, hunyuan15:
AutoencoderKLHunyuanVideo15, ltx:
AutoencoderKLLTXVideo, flux and sd3: AutoencoderKL (FLUX.1's and SD3's image VAEs: each frame coded on its own).
Nothing is re-implemented: encode and decode are diffusers' own; normalize / denormalize are each pipeline's formula,
written once as (z - mean) * scale / std with
- wan, qwenimage: mean, std = config latents_mean / latents_std per channel, scale 1 (WanPipeline,
  WanImageToVideoPipeline, QwenImagePipeline);
- ltx: mean, std = the VAE's latents_mean / latents_std buffers, scale = scaling_factor (LTXPipeline);
- cogvideox, hunyuan, hunyuan15: mean 0, std 1, scale = scaling_factor (CogVideoXPipeline, HunyuanVideoPipeline,
  HunyuanVideo15Pipeline);
- flux, sd3: mean = shift_factor, std 1, scale = scaling_factor (FluxPipeline, StableDiffusion3Pipeline decode
  z / scale + shift).
The compression comes from the VAE's config (dit/models/vae_folder.py), never from a constant.

decode(z, chunk_size): CogVideoX decodes `chunk_size` latent frames at a time with its conv cache (its own
num_latent_frames_batch_size; 0 keeps diffusers' default of 2, what the pipeline does). Wan always decodes one
latent frame at a time with its causal cache, and Hunyuan (by default) and LTX (with tiling) decode long clips in
overlapping temporal tiles, so they ignore chunk_size. ``tiling=True`` turns on diffusers' enable_tiling (spatial
tiles, blended) for large frames. A timestep-conditioned LTX decoder gets decode timestep 0 without added noise,
LTXPipeline's defaults.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

import data_pipelines.config as frame_rule
from dit.models.diffusers_folder import frozen_dtype
from dit.models.vae import DiagonalGaussian, encoder_digest
from dit.models.vae_folder import FAMILIES, IMAGE_VAES, family_config, geometry_of

# diffusers 0.42's AutoencoderKLHunyuanVideo15 fails on a batch of more than one clip (its mid-block attention mask
# broadcasts [B, N, N] against [B, 1, N, N]): each clip is coded on its own
ONE_CLIP_AT_A_TIME = ("hunyuan15",)


class PretrainedVAE(nn.Module):
    """A diffusers video VAE: video [B, 3, T, H, W] in [-1, 1] <-> latents [B, C, t, h, w] (not normalised)."""

    digest: str | None = None  # encoder_digest: set when the weights are cast (below)

    def __init__(self, family: str, vae: nn.Module, pretrained: str, tiling: bool = False,
                 dtype: str = "fp32") -> None:
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        config = dict(vae.config)
        self.latent_channels, self.temporal_compression, self.spatial_compression = geometry_of(family, config)
        self.config = {"family": family, "pretrained": pretrained, "tiling": tiling, "dtype": dtype}
        c = self.latent_channels
        if family in ("wan", "qwenimage"):
            mean, std, scale = torch.tensor(config["latents_mean"]), torch.tensor(config["latents_std"]), 1.0
        elif family == "ltx":
            mean, std = vae.latents_mean.detach().clone(), vae.latents_std.detach().clone()
            scale = config["scaling_factor"]
        elif family in IMAGE_VAES:
            mean, std, scale = torch.full((c,), float(config.get("shift_factor") or 0.0)), torch.ones(c), \
                config["scaling_factor"]
        else:
            mean, std, scale = torch.zeros(c), torch.ones(c), config["scaling_factor"]
        self.register_buffer("latents_mean", mean.float().view(1, c, 1, 1, 1), persistent=False)
        self.register_buffer("latents_std", std.float().view(1, c, 1, 1, 1), persistent=False)
        self.scaling_factor = float(scale)
        # An image-to-video condition's latents over the normalized ones: CogVideoX 1.5's VAE (invert_scale_latents)
        # has CogVideoXImageToVideoPipeline divide the image latents by the scaling factor instead of multiplying.
        self.condition_scale = 1.0 / float(scale) ** 2 if config.get("invert_scale_latents") else 1.0
        if tiling:
            vae.enable_tiling()
        # Stored posteriors are the weights', whatever dtype they are held in: a cast VAE keeps its fp32 weights'
        # digest (the cast ones hash differently), so shards encoded in fp32 serve a bf16 run and the other way round.
        if dtype != "fp32":
            self.digest = encoder_digest(self)
        if next(self.vae.parameters()).dtype != frozen_dtype(dtype):  # (a no-op .to would still log diffusers' warning)
            self.vae.to(frozen_dtype(dtype))

    @property
    def family(self) -> str:
        return self.config["family"]

    @property
    def encoder(self) -> nn.Module:
        """What the posterior depends on (the encoder, and quant_conv where there is one): for encoder_digest."""
        parts = {"encoder": self.vae.encoder}
        if isinstance(getattr(self.vae, "quant_conv", None), nn.Module):
            parts["quant_conv"] = self.vae.quant_conv
        return nn.ModuleDict(parts)

    # ---- frame and shape arithmetic: data_pipelines/config.py's rule with this VAE's compression ---------------
    def latent_frames(self, num_frames: int) -> int:
        problem = frame_rule.frames_problem(num_frames, temporal=self.temporal_compression)
        if problem:
            raise ValueError(problem)
        return frame_rule.latent_frames(num_frames, self.temporal_compression)

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """(t, h, w) of the latent grid; ValueError naming the nearest valid sizes."""
        return frame_rule.latent_shape(num_frames, height, width, temporal=self.temporal_compression,
                                       spatial=self.spatial_compression)

    # ---- encode / decode: diffusers' own --------------------------------------------------------------------
    def encode(self, x: Tensor) -> DiagonalGaussian:
        if x.ndim != 5 or x.shape[1] != 3:
            raise ValueError(f"expected [B, 3, T, H, W], got {tuple(x.shape)}")
        self.latent_shape(*x.shape[2:])  # validates T, H, W against this VAE's compression
        if self.family in IMAGE_VAES:  # an image VAE: the frames in the batch, [B T, 3, H, W]
            dist = self.vae.encode(frames_in_batch(x.to(self.vae.dtype))).latent_dist
            mean, logvar = (frames_out_of_batch(v, x.shape[2]) for v in (dist.mean, dist.logvar))
            return DiagonalGaussian(mean.float(), logvar.float())
        if self.family in ONE_CLIP_AT_A_TIME and x.shape[0] > 1:
            parts = [self.encode(x[i:i + 1]) for i in range(x.shape[0])]
            return DiagonalGaussian(torch.cat([p.mean for p in parts]), torch.cat([p.logvar for p in parts]))
        dist = self.vae.encode(x.to(self.vae.dtype)).latent_dist  # mean, logvar [B, C, t, h, w]
        return DiagonalGaussian(dist.mean.float(), dist.logvar.float())  # fp32 whatever vae.dtype

    def decode(self, z: Tensor, chunk_size: int = 0) -> Tensor:
        """Latents [B, C, t, h, w] (not normalised) -> video [B, 3, 1 + temporal(t-1), spatial h, spatial w], fp32."""
        return self._decode(z.to(self.vae.dtype), chunk_size).float()

    def _decode(self, z: Tensor, chunk_size: int) -> Tensor:
        if self.family in ONE_CLIP_AT_A_TIME and z.shape[0] > 1:
            return torch.cat([self._decode(z[i:i + 1], chunk_size) for i in range(z.shape[0])])
        if self.family == "cogvideox" and chunk_size > 0:
            default, self.vae.num_latent_frames_batch_size = self.vae.num_latent_frames_batch_size, chunk_size
            try:
                return self.vae.decode(z).sample
            finally:
                self.vae.num_latent_frames_batch_size = default
        if self.family in IMAGE_VAES:  # each latent frame decoded on its own (chunk_size: frames per decode call)
            frames = frames_in_batch(z)
            step = frames.shape[0] if chunk_size <= 0 else chunk_size
            out = torch.cat([self.vae.decode(frames[i:i + step]).sample for i in range(0, frames.shape[0], step)])
            return frames_out_of_batch(out, z.shape[2])
        if self.family == "ltx" and self.vae.config.timestep_conditioning:
            temb = torch.zeros(z.shape[0], device=z.device, dtype=z.dtype)  # LTXPipeline's decode_timestep=0
            return self.vae.decode(z, temb).sample
        return self.vae.decode(z).sample

    # ---- latent normalisation for the denoiser: the family pipeline's formula ---------------------------------
    def normalize(self, z: Tensor) -> Tensor:
        mean, std = self.latents_mean.to(z), self.latents_std.to(z)
        return (z - mean) * self.scaling_factor / std

    def denormalize(self, z: Tensor) -> Tensor:
        mean, std = self.latents_mean.to(z), self.latents_std.to(z)
        return z * std / self.scaling_factor + mean


def frames_in_batch(x: Tensor) -> Tensor:
    """[B, C, T, H, W] -> [B T, C, H, W]: what an image VAE codes."""
    return x.transpose(1, 2).flatten(0, 1)


def frames_out_of_batch(x: Tensor, frames: int) -> Tensor:
    """[B T, C, H, W] -> [B, C, T, H, W]."""
    return x.unflatten(0, (-1, frames)).transpose(1, 2)


def load_family_vae(family: str, pretrained: str | os.PathLike, tiling: bool = False,
                    dtype: str = "fp32") -> PretrainedVAE:
    """The family's diffusers VAE from a local folder (safetensors only), checked first (vae_folder.family_config),
    held in ``dtype`` (vae.dtype)."""
    import diffusers

    family_config(family, pretrained)  # names the path and the fix before any weights are read
    folder = Path(pretrained).resolve()
    cls = getattr(diffusers, FAMILIES[family].class_name)
    vae = cls.from_pretrained(folder, use_safetensors=True, local_files_only=True)
    return PretrainedVAE(family, vae, str(folder), tiling=tiling, dtype=dtype).eval()
