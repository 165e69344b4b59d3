"""What the pretrained-family training tests share: a config file for a tiny download (configs/demo.yaml with the
family's sections), the configs of its small runs, their losses, and the check that a run on `dit encode`'s latent
shards trains as the run on the raw shards did."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import yaml
from runs import DEMO, small_overrides

from dit.config import Config, load_config
from dit.encode import encode_shards
from dit.training import train

STEPS = 4


def write_config(path: Path, **sections: dict) -> Path:
    """configs/demo.yaml with ``sections`` (model, vae, text, diffusion, sample) in place of its own, at ``path``."""
    data = yaml.safe_load(DEMO.read_text())
    data.update(sections)
    path.write_text(yaml.safe_dump(data))
    return path


def run_config(config_file: Path, run: Path, shards: str, *more: str, **extra: object) -> Config:
    """A small run (4 steps, one checkpoint) of ``config_file`` on ``shards``; ``more``: overrides after the rest."""
    common = {"train.steps": STEPS, "train.checkpoint_every": STEPS, **extra}
    return load_config(config_file, [*small_overrides(run, shards, None, **common), *more])


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def first_latent_sample(latents: Path) -> dict[str, np.ndarray]:
    """The arrays of the first sample of the first latent shard, by name (text, text_mask, mean, ...)."""
    with tarfile.open(sorted(latents.glob("*.tar"))[0]) as tar:
        key = tar.getnames()[0].split(".")[0]
        return {m.name.split(".")[1]: np.load(io.BytesIO(tar.extractfile(m).read()))
                for m in tar.getmembers() if m.name.startswith(key + ".") and m.name.endswith(".npy")}


def raw_then_latent(config_file: Path, shards: str, tmp_path: Path, *more: str,
                    check_shards: Callable[[Path], None] | None = None, raw: dict[str, object] | None = None,
                    **extra: object) -> tuple[Path, Path]:
    """A run on the raw ``shards`` (``raw``: overrides of its own), `dit encode` of them (64 samples; then
    ``check_shards`` on the folder), and a run on those latent shards, all three with ``more`` and ``extra``: the
    same 4 losses, which differ from step to step (1e-5). Returns the raw run's last checkpoint and the latent
    shards' folder."""
    ckpt = train.main(run_config(config_file, tmp_path / "raw", shards, *more, **{**extra, **(raw or {})}))
    latents = tmp_path / "latents"
    assert encode_shards(shards, latents, run_config(config_file, tmp_path / "enc", shards, *more, **extra),
                         batch_size=8)["samples"] == 64
    if check_shards is not None:
        check_shards(latents)
    train.main(run_config(config_file, tmp_path / "latent", str(latents), *more, **{**extra, "data.latents": "true"}))
    a, b = losses(tmp_path / "raw"), losses(tmp_path / "latent")
    assert len(a) == STEPS and len({round(x, 6) for x in a}) == STEPS
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-5, atol=1e-6)
    return ckpt, latents
