"""Tiny random diffusers video VAEs of each family (sizes after diffusers' own VAE tests), saved into local folders."""

from __future__ import annotations

from pathlib import Path

import torch

# Constructor arguments: a few thousand parameters each. The LTX one keeps LTX-Video's 8x time / 32x space
# (patch 4, three spatio-temporal downscalings) so that its 8k+1 / multiple-of-32 rule is the one tested.
TINY: dict[str, dict] = {
    "wan": dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]),
    "cogvideox": dict(block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2,
                      down_block_types=("CogVideoXDownBlock3D",) * 4, up_block_types=("CogVideoXUpBlock3D",) * 4),
    "hunyuan": dict(latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                    down_block_types=("HunyuanVideoDownBlock3D",) * 4, up_block_types=("HunyuanVideoUpBlock3D",) * 4),
    "ltx": dict(latent_channels=8, block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1),
                spatio_temporal_scaling=(True, True, True, False),
                decoder_spatio_temporal_scaling=(True, True, True, False), decoder_inject_noise=(False,) * 5,
                upsample_residual=(False,) * 4, upsample_factor=(1,) * 4, patch_size=4, patch_size_t=1,
                scaling_factor=0.8),
    # FLUX.1's image VAE in small: 8x space, no quant convs, a shift and scale of its own
    "flux": dict(latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                 use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.12, scaling_factor=0.4),
    "sd3": dict(latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.06, scaling_factor=1.5),
    # HunyuanVideo 1.5's: 16x in space (four downsamples), 4x in time
    "hunyuan15": dict(latent_channels=4, block_out_channels=(8, 8, 8, 8, 8), layers_per_block=1, scaling_factor=1.2),
    # Qwen-Image's (Wan 2.1's kind) with its per-channel latent statistics
    "qwenimage": dict(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                      temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
                      latents_std=[1.5, 0.8, 2.0, 1.1]),
}
CLASSES = {"wan": "AutoencoderKLWan", "cogvideox": "AutoencoderKLCogVideoX", "hunyuan": "AutoencoderKLHunyuanVideo",
           "ltx": "AutoencoderKLLTXVideo", "flux": "AutoencoderKL", "sd3": "AutoencoderKL",
           "qwenimage": "AutoencoderKLQwenImage", "hunyuan15": "AutoencoderKLHunyuanVideo15"}


def tiny_vae(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A random tiny diffusers VAE; LTX's latent statistics (buffers, zeros and ones by default) are drawn too."""
    import diffusers

    torch.manual_seed(seed)
    vae = getattr(diffusers, CLASSES[family])(**{**TINY[family], **overrides}).eval()
    if family == "ltx":
        with torch.no_grad():
            vae.latents_mean.copy_(torch.randn(vae.latents_mean.shape))
            vae.latents_std.copy_(torch.rand(vae.latents_std.shape) + 0.5)
    return vae


def save_tiny_vae(family: str, folder: Path, seed: int = 0, **overrides) -> torch.nn.Module:
    """tiny_vae(...) saved with save_pretrained (config.json + diffusion_pytorch_model.safetensors) into folder;
    returned frozen, as a training script holds its VAE and as PretrainedVAE does: CPU convolutions take another
    kernel for weights that require grad, even under no_grad (hunyuan decode 1.2e-5 off at values ~1.3, 0 frozen)."""
    vae = tiny_vae(family, seed, **overrides)
    vae.save_pretrained(folder)
    return vae.requires_grad_(False)
