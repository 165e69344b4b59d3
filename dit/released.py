"""A released model sampled straight from its diffusers folders, with no training run
(`dit sample --config configs/wan2.1-t2v-1.3b.yaml model.pretrained=... vae.pretrained=... text.path=...`):
the config.json a checkpoint of it would hold, built from the experiment config alone, and its weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from data_pipelines.config import ConfigError
from dit.config import Config


def check_release(cfg: Config) -> None:
    """Before any weights load: a pretrained family with its transformer and VAE folders (the text encoder's are
    checked by text_width)."""
    from dit.models.vae import check_vae_source

    m = cfg.model
    if m.family == "dit":
        raise ConfigError("dit sample --config samples a released model from its diffusers folders: set model.family "
                          "(e.g. configs/wan2.1-t2v-1.3b.yaml); a model trained with dit samples with --checkpoint RUN")
    if not m.pretrained:
        raise ConfigError(f"model.pretrained is not set: give the {m.family} transformer folder, e.g. "
                          f"model.pretrained=/models/<release>-Diffusers/transformer")
    check_vae_source(cfg.vae)


def release_config(cfg: Config) -> dict[str, Any]:
    """{"dit": the denoiser's constructor config, "experiment": the config} as a checkpoint's config.json holds them,
    read from the folders' config.json files (no weights loaded)."""
    from dit.models.families import check_fit, meta_model_config
    from dit.models.text import text_width

    check_release(cfg)
    channels, temporal, spatial = cfg.vae.geometry()
    width = text_width(cfg.text)
    check_fit(cfg.model, channels, width)
    return {"dit": meta_model_config(cfg, channels, width, (temporal, spatial)), "experiment": cfg.to_dict()}


def release_weights(cfg: Config) -> dict[str, torch.Tensor]:
    """The transformer folder's weights as our state dict (``transformer.<diffusers name>``)."""
    from dit.weights import folder_weights

    return folder_weights(Path(cfg.model.pretrained))
