"""A tiny random CLIP vision model and its image processor, saved as a Wan 2.1 I2V Diffusers download holds them
(image_encoder/ and image_processor/ side by side)."""

from __future__ import annotations

from pathlib import Path

import torch

WIDTH = 8  # the CLIP states' width (a Wan 2.1 I2V transformer's image_dim)


def save_tiny_clip(root: Path, seed: int = 0) -> Path:
    """root/image_encoder (CLIPVisionModel: 32x32 images in 8x8 patches, 17 tokens) and root/image_processor
    (CLIPImageProcessor at 32); returns the image_encoder folder."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=WIDTH, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=8)
    CLIPVisionModel(config).eval().save_pretrained(root / "image_encoder")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        root / "image_processor")
    return root / "image_encoder"
