"""A small spatio-temporal causal 3D convolutional VAE (KL-regularised), after CogVideoX / HunyuanVideo.

Frame arithmetic: a clip of T = 4k + 1 frames becomes 1 + k latent frames. Frame 0 is encoded alone (so an
image, T = 1, goes through the same network) and each following group of 4 frames becomes one latent frame.
Space is compressed by 8 (three stride-2 downsamples; the first two also halve time).

Causality: no operation looks at the future.
- CausalConv3d pads time on the past side only, by replicating frame 0 (an image is seen as a still video),
  so output frame i depends only on input frames <= i.
- Normalisation is GroupNorm per frame (statistics over channels-in-group x H x W), never across time.
- Temporal downsampling keeps frame 0 alone and averages the following pairs (1 + 2k -> 1 + k); temporal
  upsampling is the inverse (frame 0 -> 1 frame, every other frame -> 2).
So the decoder can run over a long latent clip chunk by chunk with a small cache (each causal conv keeps the
last frames it needs; each temporal upsampler remembers that frame 0 has been seen) and the result equals a
full decode. There is no attention in this VAE: it is meant to train in minutes on a CPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from einops import rearrange, reduce, repeat
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

import data_pipelines.config as frame_rule
from data_pipelines.config import ConfigError
from dit.fileio import atomic_file

if TYPE_CHECKING:
    from dit.config import VAEConfig
    from dit.models.vae_families import PretrainedVAE

WEIGHTS_NAME = "vae.safetensors"
CONFIG_NAME = "vae.json"


def _num_groups(channels: int) -> int:
    """Up to 32 groups of at least 4 channels (32 -> 8, 64 -> 16, 128 -> 32)."""
    groups = min(32, max(1, channels // 4))
    while channels % groups:
        groups -= 1
    return groups


def _per_frame(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Apply a 2D op to every frame: [B, C, T, H, W] -> fn([B*T, C, H, W]) -> [B, C', T, H', W']."""
    t = x.shape[2]
    y = fn(rearrange(x, "b c t h w -> (b t) c h w"))
    return rearrange(y, "(b t) c h w -> b c t h w", t=t)


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm over each frame separately, so normalisation never mixes time (keeps the model causal)."""

    def forward(self, x: Tensor) -> Tensor:
        return _per_frame(super().forward, x)


class CausalConv3d(nn.Module):
    """k x k x k conv, 'same' in space, causal in time: k - 1 past frames are prepended (copies of frame 0).

    When streaming (see CausalVAE.streaming) the past frames come from the previous chunk instead.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.time_pad = kernel_size - 1
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, padding=(0, kernel_size // 2, kernel_size // 2))
        self.streaming = False
        self.cache: Tensor | None = None  # last `time_pad` input frames of the previous chunk

    def set_streaming(self, on: bool) -> None:
        self.streaming, self.cache = on, None

    def forward(self, x: Tensor) -> Tensor:
        if self.time_pad:
            if self.streaming and self.cache is not None:
                past = self.cache  # [B, C, k-1, H, W] from the previous chunk
            else:
                past = x[:, :, :1].expand(-1, -1, self.time_pad, -1, -1)  # [B, C, k-1, H, W] copies of frame 0
            x = torch.cat([past, x], dim=2)  # [B, C, k-1+T, H, W]
            if self.streaming:
                self.cache = x[:, :, -self.time_pad :].clone()  # clone: do not keep the whole chunk alive
        return self.conv(x)  # [B, C', T, H, W]


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> CausalConv3d, twice, plus a (1x1x1-projected) skip."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = FrameGroupNorm(_num_groups(in_channels), in_channels)
        self.conv1 = CausalConv3d(in_channels, out_channels)
        self.norm2 = FrameGroupNorm(_num_groups(out_channels), out_channels)
        self.conv2 = CausalConv3d(out_channels, out_channels)
        self.skip = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # [B, C', T, H, W]
        h = self.conv2(F.silu(self.norm2(h)))  # [B, C', T, H, W]
        return self.skip(x) + h


class Downsample(nn.Module):
    """Halve H and W with a stride-2 conv per frame; if temporal, first 1 + 2k frames -> 1 + k (frame 0 alone)."""

    def __init__(self, channels: int, temporal: bool) -> None:
        super().__init__()
        self.temporal = temporal
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        if self.temporal:
            rest = reduce(x[:, :, 1:], "b c (t two) h w -> b c t h w", "mean", two=2)  # [B, C, k, H, W]
            x = torch.cat([x[:, :, :1], rest], dim=2)  # [B, C, 1+k, H, W]
        return _per_frame(lambda f: self.conv(F.pad(f, (0, 1, 0, 1))), x)  # [B, C, t, H/2, W/2]


class Upsample(nn.Module):
    """Double H and W (nearest, then a 3x3 conv per frame); if temporal, frame 0 -> 1 frame, others -> 2.

    When streaming, only the first chunk has a frame 0: later chunks repeat every frame.
    """

    def __init__(self, channels: int, temporal: bool) -> None:
        super().__init__()
        self.temporal = temporal
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.streaming = False
        self.seen_first = False

    def set_streaming(self, on: bool) -> None:
        self.streaming, self.seen_first = on, False

    def forward(self, x: Tensor) -> Tensor:
        if self.temporal:
            n_first = 0 if self.seen_first else 1  # frames of this chunk kept alone
            rest = repeat(x[:, :, n_first:], "b c t h w -> b c (t two) h w", two=2)  # [B, C, 2(t-n), H, W]
            x = torch.cat([x[:, :, :n_first], rest], dim=2)  # [B, C, 2t-n, H, W]
            self.seen_first = self.streaming
        return _per_frame(lambda f: self.conv(F.interpolate(f, scale_factor=2.0, mode="nearest")), x)


class Encoder(nn.Module):
    def __init__(self, in_channels: int, latent_channels: int, channels: list[int], num_res_blocks: int) -> None:
        super().__init__()
        self.conv_in = CausalConv3d(in_channels, channels[0])
        blocks: list[nn.Module] = []
        ch = channels[0]
        for i, out_ch in enumerate(channels):
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(ch, out_ch))
                ch = out_ch
            if i < len(channels) - 1:
                blocks.append(Downsample(ch, temporal=i < 2))  # time is halved at the two finest levels
        blocks += [ResBlock(ch, ch), ResBlock(ch, ch)]  # middle
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = FrameGroupNorm(_num_groups(ch), ch)
        self.conv_out = CausalConv3d(ch, 2 * latent_channels)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)  # [B, c0, T, H, W]
        x = self.blocks(x)  # [B, c3, t, H/8, W/8]
        return self.conv_out(F.silu(self.norm_out(x)))  # [B, 2C, t, H/8, W/8]: mean and logvar


class Decoder(nn.Module):
    def __init__(self, out_channels: int, latent_channels: int, channels: list[int], num_res_blocks: int) -> None:
        super().__init__()
        channels = channels[::-1]
        ch = channels[0]
        self.conv_in = CausalConv3d(latent_channels, ch)
        blocks: list[nn.Module] = [ResBlock(ch, ch), ResBlock(ch, ch)]  # middle
        for i, out_ch in enumerate(channels):
            for _ in range(num_res_blocks + 1):
                blocks.append(ResBlock(ch, out_ch))
                ch = out_ch
            if i < len(channels) - 1:
                blocks.append(Upsample(ch, temporal=i > 0))  # mirror of the encoder: time doubles at the finest
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = FrameGroupNorm(_num_groups(ch), ch)
        self.conv_out = CausalConv3d(ch, out_channels)

    def forward(self, z: Tensor) -> Tensor:
        x = self.conv_in(z)  # [B, c3, t, h, w]
        x = self.blocks(x)  # [B, c0, T, 8h, 8w]
        return self.conv_out(F.silu(self.norm_out(x)))  # [B, 3, T, 8h, 8w]


class DiagonalGaussian:
    """The posterior q(z | x) = N(mean, exp(logvar)), each [B, C, t, h, w]."""

    def __init__(self, mean: Tensor, logvar: Tensor) -> None:
        self.mean = mean
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """z = mean + std * noise, the noise drawn on the generator's device (the CPU without one) and then moved to
        the mean's: the same draw on every device, and from a posterior the VAE made or one stored in latent shards."""
        device = generator.device if generator is not None else torch.device("cpu")
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)  # [B, C, t, h, w]

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) per sample, [B]: the MEAN over latent elements (not the sum), in nats per element."""
        mean, logvar = self.mean.float(), self.logvar.float()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
        return kl.flatten(1).mean(dim=1)


class CausalVAE(nn.Module):
    """Video [B, 3, T, H, W] in [-1, 1], T = 4k + 1 <-> latents [B, C, 1 + k, H/8, W/8]."""

    temporal_compression = frame_rule.TEMPORAL  # the two temporal downsamples: 4 frames per latent frame
    condition_scale = 1.0  # an image condition's latents are the normalized ones (vae_families: CogVideoX 1.5's differ)
    digest = None  # encoder_digest hashes the live weights (a cast pretrained VAE keeps its fp32 weights' digest)
    spatial_compression = frame_rule.SPATIAL  # the three spatial stride-2 downsamples

    def __init__(
        self,
        in_channels: int = 3,
        latent_channels: int = 4,
        base_channels: int = 32,
        channel_mults: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 1,
    ) -> None:
        super().__init__()
        if len(channel_mults) != 4:
            raise ValueError(f"channel_mults needs 4 entries (3 downsamples, /8 in space), got {channel_mults}")
        if num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {num_res_blocks}")
        self.config = dict(
            in_channels=in_channels,
            latent_channels=latent_channels,
            base_channels=base_channels,
            channel_mults=list(channel_mults),
            num_res_blocks=num_res_blocks,
        )
        channels = [base_channels * m for m in channel_mults]
        self.encoder = Encoder(in_channels, latent_channels, channels, num_res_blocks)
        self.decoder = Decoder(in_channels, latent_channels, channels, num_res_blocks)
        self.register_buffer("latent_mean", torch.zeros(latent_channels))  # per channel, see fit_latent_stats
        self.register_buffer("latent_std", torch.ones(latent_channels))

    @property
    def latent_channels(self) -> int:
        return self.config["latent_channels"]

    # ---- frame and shape arithmetic -------------------------------------------------------------------------
    # (the rule itself is data_pipelines/config.py's, given this VAE's compression)
    @classmethod
    def latent_frames(cls, num_frames: int) -> int:
        """1 + (T - 1) // 4; raises ValueError naming the nearest valid counts when T is not 4k + 1."""
        problem = frame_rule.frames_problem(num_frames, temporal=cls.temporal_compression)
        if problem:
            raise ValueError(problem)
        return frame_rule.latent_frames(num_frames, cls.temporal_compression)

    @classmethod
    def latent_shape(cls, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """(t, h, w) of the latent grid (channels not included); ValueError naming the nearest valid sizes."""
        return frame_rule.latent_shape(num_frames, height, width, temporal=cls.temporal_compression,
                                       spatial=cls.spatial_compression)

    # ---- encode / decode ------------------------------------------------------------------------------------
    def encode(self, x: Tensor) -> DiagonalGaussian:
        if x.ndim != 5 or x.shape[1] != self.config["in_channels"]:
            raise ValueError(f"expected [B, {self.config['in_channels']}, T, H, W], got {tuple(x.shape)}")
        self.latent_shape(*x.shape[2:])  # validates T, H, W
        mean, logvar = self.encoder(x).chunk(2, dim=1)  # [B, C, t, h, w] each
        return DiagonalGaussian(mean, logvar)

    def decode(self, z: Tensor, chunk_size: int = 0) -> Tensor:
        """Latents [B, C, t, h, w] (not normalised) -> video [B, 3, 1 + 4(t-1), 8h, 8w] (not clamped).

        chunk_size > 0 decodes that many latent frames at a time with a causal cache; the result equals the
        full decode, while the decoder's activations only ever hold one chunk.
        """
        if chunk_size <= 0:
            return self.decoder(z)
        with self.streaming():
            return torch.cat([self.decoder(chunk) for chunk in z.split(chunk_size, dim=2)], dim=2)

    @contextmanager
    def streaming(self) -> Iterator[None]:
        """Within this context, successive decoder calls continue one clip (fresh cache on entry, cleared on exit)."""
        stateful = [m for m in self.decoder.modules() if isinstance(m, CausalConv3d | Upsample)]
        for m in stateful:
            m.set_streaming(True)
        try:
            yield
        finally:
            for m in stateful:
                m.set_streaming(False)

    def forward(
        self, x: Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()  # [B, C, t, h, w]
        return self.decode(z), posterior  # [B, 3, T, H, W]

    # ---- latent normalisation for the diffusion model -------------------------------------------------------
    def _stat(self, name: str, z: Tensor) -> Tensor:
        return getattr(self, name).to(z.dtype).view(1, -1, 1, 1, 1)

    def normalize(self, z: Tensor) -> Tensor:
        return (z - self._stat("latent_mean", z)) / self._stat("latent_std", z)

    def denormalize(self, z: Tensor) -> Tensor:
        return z * self._stat("latent_std", z) + self._stat("latent_mean", z)

    @torch.no_grad()
    def fit_latent_stats(self, latents: Tensor) -> tuple[Tensor, Tensor]:
        """Set per-channel latent_mean / latent_std from raw latents [B, C, t, h, w]; returns them."""
        flat = rearrange(latents.detach().float(), "b c t h w -> c (b t h w)")
        self.latent_mean.copy_(flat.mean(dim=1))
        self.latent_std.copy_(flat.std(dim=1).clamp_min(1e-6))
        return self.latent_mean.clone(), self.latent_std.clone()



def build_vae(vae_cfg: VAEConfig) -> CausalVAE:
    """A fresh (untrained) CausalVAE of the config's sizes."""
    v = vae_cfg
    return CausalVAE(latent_channels=v.latent_channels, base_channels=v.base_channels,
                     channel_mults=tuple(v.channel_mults), num_res_blocks=v.num_res_blocks)


# Opponent colour axes (red-green, yellow-blue) for the chroma term of vae_loss; rows have unit-ish scale.
OPPONENT = torch.tensor([[0.5, -0.5, 0.0], [0.25, 0.25, -0.5]])


def chroma_error(recon: Tensor, x: Tensor) -> Tensor:
    """Mean squared error of ``recon - x`` [B, 3, ...] along the opponent colour axes (R-G)/2 and ((R+G)/2-B)/2.

    A grey error (the same in R, G and B) has none; a red drawn as olive has a large one.
    """
    err = (recon - x).movedim(1, -1)  # [..., 3]
    return (err @ OPPONENT.to(err).T).square().mean()


def vae_loss(
    recon: Tensor, x: Tensor, posterior: DiagonalGaussian, kl_weight: float, l1_weight: float = 1.0,
    chroma_weight: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """l1_weight * L1 + MSE reconstruction (means over pixels) + chroma_weight * chroma error + kl_weight * KL
    (a mean over latent elements, not SD's sum, so weights are per element). L1 keeps edges sharp, MSE pushes on
    large errors, the chroma term on hue errors that are a small share of pixel variance (README: VAE)."""
    recon, x = recon.float(), x.float()
    l1 = (recon - x).abs().mean()
    mse = F.mse_loss(recon, x)
    chroma = chroma_error(recon, x) if chroma_weight else torch.zeros((), device=recon.device)
    kl = posterior.kl().float().mean()
    loss = l1_weight * l1 + mse + chroma_weight * chroma + kl_weight * kl
    return loss, {"loss": loss.detach(), "l1": l1.detach(), "mse": mse.detach(), "chroma": chroma.detach(),
                  "kl": kl.detach()}


def encoder_digest(vae: VAE) -> str:
    """A short digest of the VAE encoder's weights: what the stored posteriors depend on (not the decoder, nor
    the latent statistics, which may be refitted). A pretrained family held in another vae.dtype than fp32 gives
    the digest of its fp32 weights, taken when it was loaded (``digest``)."""
    if vae.digest:
        return vae.digest
    h = hashlib.sha256()
    for name, tensor in sorted(vae.encoder.state_dict().items()):
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ---- save / load: safetensors weights (with the latent stats) + JSON constructor kwargs, written atomically ---
def save_vae(vae: CausalVAE, directory: str | os.PathLike) -> None:
    """Write DIR/vae.safetensors then DIR/vae.json, each atomically (dit/fileio.py)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in vae.state_dict().items()}
    with atomic_file(directory / WEIGHTS_NAME) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    with atomic_file(directory / CONFIG_NAME) as tmp:
        tmp.write_text(json.dumps(vae.config, indent=2))


class VAE(Protocol):
    """The VAE contract: CausalVAE and a pretrained family (dit/models/vae_families.py) both have it."""

    latent_channels: int
    temporal_compression: int
    spatial_compression: int
    config: dict
    encoder: nn.Module  # what the posterior depends on (encoder_digest)
    digest: str | None  # a fixed encoder_digest, or None: hash the weights

    def encode(self, x: Tensor) -> DiagonalGaussian: ...  # [B, 3, T, H, W] in [-1, 1] -> posterior [B, C, t, h, w]
    def decode(self, z: Tensor, chunk_size: int = 0) -> Tensor: ...  # not normalised [B, C, t, h, w] -> video
    def normalize(self, z: Tensor) -> Tensor: ...
    def denormalize(self, z: Tensor) -> Tensor: ...
    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]: ...


def load_vae(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> CausalVAE | PretrainedVAE:
    """The VAE a folder records, in eval mode: save_vae's CausalVAE (weights, no pickle), or export_vae's record of
    a pretrained family (vae.json {"family", "pretrained", "tiling", "dtype"}: the diffusers folder is loaded from
    there)."""
    directory = os.fspath(directory)
    config = json.loads(Path(directory, CONFIG_NAME).read_text())
    if "family" in config:
        from dit.models.vae_families import load_family_vae

        return load_family_vae(config["family"], config["pretrained"], tiling=config.get("tiling", False),
                               dtype=config.get("dtype", "fp32")).to(map_location)
    vae = CausalVAE(**config)
    vae.load_state_dict(load_file(os.path.join(directory, WEIGHTS_NAME), device="cpu"))
    return vae.to(map_location).eval()


# a download whose vae/ a vae.family names (error hints)
VAE_DOWNLOADS = {"cogvideox": "CogVideoX-2b", "hunyuan": "HunyuanVideo", "hunyuan15": "HunyuanVideo-1.5-480p_t2v",
                 "ltx": "LTX-Video", "flux": "FLUX.1-dev",
                 "sd3": "stable-diffusion-3.5-large"}


def check_vae_source(vae_cfg: VAEConfig) -> None:
    """Before any work: the experiment names its VAE's weights (vae.checkpoint for ours, vae.pretrained for a
    family's folder); ConfigError naming the key and the fix."""
    if vae_cfg.family == "ours" and not vae_cfg.checkpoint:
        raise ConfigError("vae.checkpoint is not set: train a VAE first (`dit train-vae --config ...`) and pass "
                          "vae.checkpoint=RUN_DIR/vae, or use a pretrained one (vae.family=wan vae.pretrained=DIR)")
    if vae_cfg.family != "ours" and not vae_cfg.pretrained:
        download = VAE_DOWNLOADS.get(vae_cfg.family, "Wan2.1-T2V-1.3B-Diffusers")
        raise ConfigError(f"vae.pretrained is not set: vae.family={vae_cfg.family} trains on a local diffusers VAE "
                          f"folder, e.g. vae.pretrained=/models/{download}/vae")


def load_vae_from_config(vae_cfg: VAEConfig) -> CausalVAE | PretrainedVAE:
    """The experiment's frozen VAE, in eval mode: ours from vae.checkpoint, or vae.family's from vae.pretrained."""
    if vae_cfg.family == "ours":
        if not vae_cfg.checkpoint:
            raise ValueError("vae.checkpoint is not set: train a VAE first (`dit train-vae --config ...`) and pass "
                             "vae.checkpoint=RUN_DIR/vae, or use a pretrained one (vae.family=wan "
                             "vae.pretrained=/path/to/diffusers/vae)")
        return load_vae(vae_cfg.checkpoint)
    from dit.models.vae_families import load_family_vae

    if not vae_cfg.pretrained:
        raise ConfigError(f"vae.family={vae_cfg.family} needs vae.pretrained=/path/to/a/diffusers/vae/folder "
                          "(config.json + safetensors), e.g. .../Wan2.1-T2V-1.3B-Diffusers/vae")
    return load_family_vae(vae_cfg.family, vae_cfg.pretrained, tiling=vae_cfg.tiling, dtype=vae_cfg.dtype)


def export_vae(vae_cfg: VAEConfig, directory: str | os.PathLike) -> None:
    """Record the experiment's VAE in DIRECTORY (a checkpoint's vae/) so that load_vae(DIRECTORY) gives it back:
    ours is copied (small); a family is a vae.json naming it and its absolute pretrained folder (not copied: GBs)."""
    directory = Path(directory)
    if vae_cfg.family == "ours":
        shutil.copytree(vae_cfg.checkpoint, directory)
        return
    directory.mkdir(parents=True, exist_ok=True)
    record = {"family": vae_cfg.family, "pretrained": str(Path(vae_cfg.pretrained).resolve()), "tiling": vae_cfg.tiling,
              "dtype": vae_cfg.dtype}
    with atomic_file(directory / CONFIG_NAME) as tmp:
        tmp.write_text(json.dumps(record, indent=2))
