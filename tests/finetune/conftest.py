"""Fixtures of the fine-tuning tests: the small shards and VAE of tests/training, and a trained base run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from runs import small_config, small_shards, small_vae  # noqa: E402, F401  (tests/training fixtures)

from dit.training import train  # noqa: E402

BASE_STEPS = 6


@pytest.fixture(scope="session")
def base_run(tmp_path_factory, small_shards: str, small_vae: Path) -> Path:  # noqa: F811
    """dit-tiny trained for a few steps: the base every fine-tune here starts from."""
    run = tmp_path_factory.mktemp("base") / "run"
    train.main(small_config(run, small_shards, small_vae, **{"train.steps": BASE_STEPS,
                                                               "train.checkpoint_every": BASE_STEPS}))
    return run
