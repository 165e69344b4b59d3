"""A new user's first runs (issue 13, "Found as a new user"), with `dit` as a real subprocess: a mistake the user
can fix is one ``error: ...`` line on stderr and a non-zero exit, before any work; no traceback."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from data_pipelines.synthetic import make_synthetic
from dit.models.vae import CausalVAE, save_vae

DIT = str(Path(sys.executable).parent / "dit")
CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
SMALL = ["data.frames=5", "data.height=32", "data.width=32", "train.batch_size=4", "train.steps=2",
         "text.encoder=none"]


def dit(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([DIT, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def assert_one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """A user error: a non-zero exit and one ``error: ...`` line on stderr that says each of ``needles``."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Real shards (16 clips of 5 x 32 x 32 in 2 shards), a VAE (random weights), an empty folder, junk shards."""
    root = tmp_path_factory.mktemp("first_run")
    make_synthetic(root / "data", num_clips=16, frames=5, height=32, width=32, clips_per_shard=8)
    torch.manual_seed(0)
    save_vae(CausalVAE(latent_channels=4, base_channels=8, channel_mults=(1, 1, 1, 1)), root / "vae")
    (root / "empty").mkdir()
    (root / "junk").mkdir()
    (root / "junk" / "00000.tar").write_bytes(random.Random(0).randbytes(20000))
    (root / "junk" / "00001.tar").write_text("these are not tar files\n")
    return root


# ----------------------------------------------------------------------------- defect 11: user errors, one line


def test_train_without_vae_checkpoint(root: Path) -> None:
    proc = dit("train", "--config", CONFIG, f"data.shards={root}/data", f"train.output_dir={root}/r", *SMALL)
    assert_one_error_line(proc, "vae.checkpoint is not set", "dit train-vae")


@pytest.mark.parametrize("command", ["train", "train-vae"])
def test_data_shards_not_set(root: Path, command: str) -> None:
    proc = dit(command, "--config", CONFIG, f"vae.checkpoint={root}/vae", f"train.output_dir={root}/{command}",
               *SMALL)
    assert_one_error_line(proc, "data.shards is not set", "data.shards=")
    assert not (root / command).exists()


@pytest.mark.parametrize("command", ["train", "train-vae"])
def test_an_empty_shards_folder(root: Path, command: str) -> None:
    proc = dit(command, "--config", CONFIG, f"data.shards={root}/empty", f"vae.checkpoint={root}/vae",
               f"train.output_dir={root}/{command}", *SMALL)
    assert_one_error_line(proc, f"data.shards='{root}/empty' names no shards", "dit make-shards")
    assert not (root / command).exists()


def test_broken_yaml_names_the_file_and_line(root: Path) -> None:
    bad = root / "broken.yaml"
    bad.write_text("model:\n  preset: dit-tiny\ndata:\n  frames: [5\n  height: 32\n")
    proc = dit("train", "--config", str(bad))
    assert_one_error_line(proc, str(bad), "not valid YAML", "line ")


def test_too_many_bad_samples_stop_with_one_line(root: Path, tmp_path: Path) -> None:
    from data_pipelines.writer import write_shards

    write_shards(({"__key__": f"{i:04d}", "mp4": b"garbage" * 20, "txt": "a red circle"} for i in range(16)),
                 str(tmp_path / "bad" / "%05d.tar"), 8)
    proc = dit("train", "--config", CONFIG, f"data.shards={tmp_path}/bad", f"vae.checkpoint={root}/vae",
               f"train.output_dir={tmp_path}/run", *SMALL)
    assert_one_error_line(proc, "16 of 16 samples (100%) in epoch 0", "data.max_bad_fraction=0.5",
                          "'decode_error': 16")


# ----------------------------------------------------------------------------- defect 8: dit encode


def latent_samples(path: Path) -> int:
    with tarfile.open(path) as tf:
        return sum(m.name.endswith(".mean.npy") for m in tf)


def encode(root: Path, shards: str, out: Path) -> subprocess.CompletedProcess:
    return dit("encode", shards, str(out), "--config", CONFIG, f"vae.checkpoint={root}/vae", *SMALL,
               "--batch-size", "8")


def test_encode_of_unreadable_shards_fails_and_writes_nothing(root: Path, tmp_path: Path) -> None:
    out = tmp_path / "latents"
    for _ in range(2):  # a rerun does not take anything for finished: it fails the same way
        proc = encode(root, f"{root}/junk", out)
        assert_one_error_line(proc, "2 of 2 input shards gave no latent shard", f"{root}/junk/00000.tar",
                              f"{root}/junk/00001.tar", "tar_error")
        assert list(out.iterdir()) == []


def test_encode_keeps_the_good_shards_and_fails_naming_the_bad_one(root: Path, tmp_path: Path) -> None:
    out = tmp_path / "latents"
    shards = f"{root}/data/00000.tar,{root}/junk/00001.tar"
    proc = encode(root, shards, out)
    assert_one_error_line(proc, "1 of 2 input shards", f"{root}/junk/00001.tar", "The other 1 were encoded (8 samples)")
    assert sorted(p.name for p in out.iterdir()) == ["00000.tar"] and latent_samples(out / "00000.tar") == 8

    (out / "00001.tar").write_bytes(b"")  # an empty output an earlier version marked finished: not finished
    proc = encode(root, f"{root}/data", out)
    assert proc.returncode == 0, proc.stderr
    assert "encoded 1 shards (8 samples), skipped 1 finished ones" in proc.stdout
    assert latent_samples(out / "00001.tar") == 8
