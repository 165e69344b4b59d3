import sys
from pathlib import Path

import pytest
from runs import small_shards, small_vae  # noqa: F401  (session fixtures shared with tests/distributed)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_vaes import save_tiny_vae  # noqa: E402


@pytest.fixture(scope="module")
def wan_vae(tmp_path_factory) -> Path:
    """A tiny Wan VAE folder (16 latent channels, 4x time, 8x space)."""
    folder = tmp_path_factory.mktemp("wan_vae")
    save_tiny_vae("wan", folder)
    return folder
