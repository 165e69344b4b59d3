"""The frozen image encoder of an image-to-video family (model.image_encoder): Wan 2.1 I2V's CLIP (a
CLIPVisionModel folder, a Wan 2.1 I2V Diffusers download's image_encoder/, with the CLIPImageProcessor saved beside it
in image_processor/, or CLIP's own defaults at the model's image size when there is none), or HunyuanVideo 1.5 I2V's
SigLIP (a SiglipVisionModel folder, image_encoder/, its SiglipImageProcessor in feature_extractor/ beside).
``encode`` gives what the pipelines' encode_image gives: CLIP's penultimate layer's states [B, 1 + patches, D] (Wan),
SigLIP's last layer's [B, patches, D] (HunyuanVideo 1.5), fp32.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dit.config import ConfigError

VISION_CLASSES = ("CLIPVisionModel", "CLIPVisionModelWithProjection", "SiglipVisionModel")
KEY = "model.image_encoder"


def read_image_encoder(path: str | Path) -> dict[str, Any]:
    """config.json of a CLIP vision folder, checked before any weights load (ConfigError names the problem)."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        hint = " (a diffusers pipeline folder: point at its image_encoder/)" if (folder / "image_encoder").is_dir() \
            else ""
        raise ConfigError(f"{KEY}: {str(folder)!r} is not a vision model folder: no config.json{hint}; use the "
                          "image_encoder/ folder of a Wan 2.1 I2V or HunyuanVideo 1.5 I2V Diffusers download")
    config = json.loads((folder / "config.json").read_text())
    classes = config.get("architectures") or []
    if not set(classes) & set(VISION_CLASSES):
        raise ConfigError(f"{KEY}: {folder} holds {classes or config.get('model_type')}, not a CLIP or SigLIP vision "
                          f"model ({' or '.join(VISION_CLASSES)})")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise ConfigError(f"{KEY}: {folder} has no weights (*.safetensors)")
    return config


def image_encoder_width(path: str | Path) -> int:
    """The width of the states ``encode`` gives (the vision model's hidden_size), from its config alone."""
    return int(read_image_encoder(path)["hidden_size"])


class ImageEncoder(nn.Module):
    """A frozen CLIP vision model and its image processor: images [B, 3, H, W] -> states [B, tokens, D]."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        import transformers

        folder = Path(path)
        config = read_image_encoder(folder)
        cls = next(c for c in VISION_CLASSES if c in config["architectures"])
        self.model = getattr(transformers, cls).from_pretrained(folder, dtype=torch.float32).eval()
        self.model.requires_grad_(False)
        self.last_layer = cls == "SiglipVisionModel"  # (HunyuanVideo 1.5 reads SigLIP's last_hidden_state)
        beside = next((folder.parent / name for name in ("image_processor", "feature_extractor")
                       if (folder.parent / name / "preprocessor_config.json").is_file()), None)
        if beside is not None:  # the class it names (the pipelines load CLIPImageProcessor, SiglipImageProcessor)
            kind = json.loads((beside / "preprocessor_config.json").read_text()).get("image_processor_type")
            self.processor = getattr(transformers, kind or "AutoImageProcessor").from_pretrained(beside)
        elif self.last_layer:
            raise ConfigError(f"{KEY}: no feature_extractor/ (SigLIP's image processor) beside {folder}: use the "
                              "image_encoder/ folder of a HunyuanVideo 1.5 I2V Diffusers download")
        else:  # CLIP's resize, centre crop and normalization at the model's size (Wan's processor is this at 224)
            size = int(config["image_size"])
            self.processor = transformers.CLIPImageProcessor(size={"shortest_edge": size},
                                                             crop_size={"height": size, "width": size})
        self.dim = int(config["hidden_size"])

    def train(self, mode: bool = True) -> ImageEncoder:  # always frozen in eval mode
        return super().train(False)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W], uint8 or float in [-1, 1] -> CLIP's penultimate hidden states or SigLIP's last ones
        [B, tokens, D] (fp32).
        The processor takes each image as 8-bit pixels, as it takes a PIL image in the pipeline."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
        if images.dtype != torch.uint8:
            images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        pixels = list(images.permute(0, 2, 3, 1).cpu().numpy())  # [H, W, 3] uint8 each
        inputs = self.processor(images=pixels, return_tensors="pt")
        param = next(self.model.parameters())
        out = self.model(pixel_values=inputs["pixel_values"].to(param.device, param.dtype), output_hidden_states=True)
        return (out.last_hidden_state if self.last_layer else out.hidden_states[-2]).float()


def build_image_encoder(path: str | Path | None) -> ImageEncoder | None:
    """model.image_encoder's encoder (None without one)."""
    return ImageEncoder(path) if path else None
