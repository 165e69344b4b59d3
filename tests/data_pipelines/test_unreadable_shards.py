"""Shards that cannot be read at all (random bytes, text, empty tars) stop a run at once with one clear error, in
the loader's own process and in its worker processes, and through `dit train-vae` as an `error:` line; before, the
reader retried them for ever (issue 13, found as a new user 1)."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from data_pipelines.loader import build_loader
from data_pipelines.reader import NoReadableSamples
from dit.cli import error_line
from dit.config import DataConfig

ROOT = Path(__file__).resolve().parents[2]


def garbage_shards(folder: Path) -> Path:
    folder.mkdir()
    (folder / "00000.tar").write_bytes(os.urandom(20000))
    (folder / "00001.tar").write_text("this is not a tar file\n" * 100)
    return folder


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_shards_stop_the_loader_with_one_error(tmp_path: Path, workers: int) -> None:
    folder = garbage_shards(tmp_path / "bad")
    loader = build_loader(DataConfig(shards=str(folder), frames=1, height=16, width=16, num_workers=workers), 2)
    start = time.monotonic()
    with pytest.raises(NoReadableSamples) as e:
        next(iter(loader))
    loader.close()
    assert time.monotonic() - start < 60
    line = error_line(e.value)
    assert "\n" not in line and line.startswith("no readable shards: none of the"), line
    assert str(folder) in line and "dit inspect-shards" in line


def test_empty_tars_are_no_samples_not_a_loop(tmp_path: Path) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    with tarfile.open(folder / "00000.tar", "w"):  # a valid tar without any member
        pass
    loader = build_loader(DataConfig(shards=str(folder), frames=1, height=16, width=16, num_workers=0), 2)
    with pytest.raises(NoReadableSamples, match=r"no samples: the 1 shard of dataset 0 read by rank 0 hold no tar"):
        next(iter(loader))


def test_dit_train_vae_on_unreadable_shards_prints_one_error_line(tmp_path: Path) -> None:
    folder = garbage_shards(tmp_path / "bad")
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "dit.cli", "train-vae", "--config", str(ROOT / "configs/demo.yaml"),
                           f"data.shards={folder}", f"train.output_dir={tmp_path / 'run'}", "data.frames=5",
                           "data.height=16", "data.width=16", "train.steps=5"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2, done.stderr[-2000:]
    assert time.monotonic() - start < 240
    errors = [x for x in done.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "no readable shards" in errors[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert len(done.stderr) + len(done.stdout) < 200_000  # a few warnings, not megabytes of them
