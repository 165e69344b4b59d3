"""The tiny family transformers saved with save_pretrained into local folders once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_families import tiny_transformer


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """family -> a local diffusers folder (config.json + diffusion_pytorch_model.safetensors) of its tiny model."""
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            made[family] = tmp_path_factory.mktemp(family) / "transformer"
            tiny_transformer(family).save_pretrained(made[family])
        return made[family]

    return get
