"""Helpers for the training and distributed tests: small synthetic shards, a briefly trained VAE, `dit train` runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dit.config import Config, load_config

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "demo.yaml"
HOOKED_CLI = Path(__file__).resolve().parent / "hooked_cli.py"
SMALL = ["data.frames=5", "data.height=16", "data.width=16", "train.batch_size=4", "data.shuffle_buffer=8",
         "train.sample_prompts=[]", "train.warmup_steps=2", "train.log_every=1"]


def small_overrides(out: Path, shards: str, vae: Path | None, **extra: object) -> list[str]:
    items = [f"data.shards={shards}", f"train.output_dir={out}", *SMALL]
    if vae is not None:
        items.append(f"vae.checkpoint={vae}")
    return items + [f"{k}={v}" for k, v in extra.items()]


def small_config(out: Path, shards: str, vae: Path | None, **extra: object) -> Config:
    return load_config(DEMO, small_overrides(out, shards, vae, **extra))


def entry(hooks: dict[str, object] | None) -> tuple[list[str], dict[str, str]]:
    """How to start `dit` (after the Python executable or the launcher), and the environment for ``hooks``: with
    hooks, tests/training/hooked_cli.py, which applies them (fault injection) and then runs `dit`."""
    if not hooks:
        return ["-m", "dit.cli"], {}
    return [str(HOOKED_CLI)], {"DIT_TEST_HOOKS": json.dumps(hooks)}


def dit_train(out: Path, shards: str, vae: Path | None, *, extra_args: tuple[str, ...] = (), wait: bool = True,
              hooks: dict[str, object] | None = None, config: Path = DEMO,
              **overrides: object) -> subprocess.Popen | subprocess.CompletedProcess:
    """`dit train` in a real subprocess (single process, 1 thread so parallel tests share the CPU fairly);
    ``hooks``: test hooks by name (tests/training/hooked_cli.py), e.g. {"checkpoint_pause_s": 60}."""
    start, hook_env = entry(hooks)
    cmd = [sys.executable, *start, "train", "--config", str(config), *extra_args,
           *small_overrides(out, shards, vae, **overrides)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **hook_env}
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory) -> str:
    from data_pipelines.synthetic import make_synthetic

    out = tmp_path_factory.mktemp("small_shards")
    make_synthetic(out, num_clips=64, frames=5, height=16, width=16, clips_per_shard=16, seed=3)
    return str(out)


@pytest.fixture(scope="session")
def small_vae(tmp_path_factory, small_shards: str) -> Path:
    from dit.training import train_vae

    run = tmp_path_factory.mktemp("small_vae")
    return train_vae.main(small_config(run, small_shards, None, **{"train.steps": 3}))


def dit_torchrun(nproc: int, out: Path, shards: str, vae: Path | None, *, hooks: dict[str, object] | None = None,
                 config: Path = DEMO, extra_args: tuple[str, ...] = (),
                 **overrides: object) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node N -m dit.cli train ...` on CPU (gloo), 1 thread per process
    (``hooks`` as in ``dit_train``, applied in every process)."""
    start, hook_env = entry(hooks)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           *start, "train", "--config", str(config), *extra_args, *small_overrides(out, shards, vae, **overrides)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "DS_ACCELERATOR": "cpu", **hook_env}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
