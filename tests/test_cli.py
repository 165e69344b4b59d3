"""The `dit` command as a user runs it (a real subprocess): make-synthetic -> train-vae -> train -> sample."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

DIT = str(Path(sys.executable).parent / "dit")
CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")


def dit(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([DIT, *args], capture_output=True, text=True, timeout=600)
    if ok and proc.returncode != 0:
        raise AssertionError(f"dit {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    dit("make-synthetic", str(root / "data"), "--num-clips", "32", "--frames", "9", "--height", "32",
        "--width", "32", "--clips-per-shard", "16")
    assert sorted(p.name for p in (root / "data").iterdir()) == ["00000.tar", "00001.tar"]
    size = ["data.frames=9", "data.height=32", "data.width=32", "train.batch_size=4"]
    dit("train-vae", "--config", CONFIG, f"data.shards={root}/data/{{00000..00001}}.tar",
        f"train.output_dir={root}/vae", "train.steps=3", *size)
    proc = dit("train", "--config", CONFIG, f"data.shards={root}/data", f"train.output_dir={root}/dit",
               f"vae.checkpoint={root}/vae/vae", "train.steps=4", "train.checkpoint_every=2", *size)
    assert "step-00000004" in proc.stdout
    return root / "dit"


def decode(path: Path) -> np.ndarray:
    import decord

    vr = decord.VideoReader(str(path))
    return vr.get_batch(list(range(len(vr)))).asnumpy()  # [T, H, W, 3]


def test_sample_mp4_at_a_size_other_than_training(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "clip.mp4"
    dit("sample", "--checkpoint", str(run_dir), "--prompt", "a red circle moving left", "--frames", "17",
        "--height", "48", "--width", "64", "--steps", "3", "--sampler", "ddim", "--cfg", "5", "--seed", "0",
        "--out", str(out))
    assert decode(out).shape == (17, 48, 64, 3)


def test_sample_is_reproducible_by_seed_and_varies_with_it(run_dir: Path, tmp_path: Path) -> None:
    from PIL import Image

    common = ["sample", "--checkpoint", str(run_dir / "checkpoints" / "step-00000004"), "--prompt", "a blue square",
              "--frames", "1", "--height", "32", "--width", "32", "--steps", "3", "--sampler", "dpm_solver"]
    for name, seed in (("a.png", "0"), ("b.png", "0"), ("c.png", "1")):
        dit(*common, "--seed", seed, "--out", str(tmp_path / name))
    a, b, c = (np.asarray(Image.open(tmp_path / n)) for n in ("a.png", "b.png", "c.png"))
    assert a.shape == (32, 32, 3)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_sample_many_prompts_from_a_file_to_gifs(run_dir: Path, tmp_path: Path) -> None:
    from PIL import Image

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving left\n\na green square moving up\na white triangle moving down\n")
    proc = dit("sample", "--checkpoint", str(run_dir), "--prompts", str(prompts), "--frames", "5", "--height", "32",
               "--width", "40", "--steps", "2", "--sampler", "ddpm", "--batch-size", "2",
               "--out", str(tmp_path / "gifs" / "x.gif"))
    paths = sorted((tmp_path / "gifs" / "x").iterdir())
    assert [p.name for p in paths] == ["0000.gif", "0001.gif", "0002.gif"]
    assert "a white triangle moving down" in proc.stdout
    gif = Image.open(paths[0])
    assert gif.n_frames == 5 and gif.size == (40, 32)


def test_invalid_size_is_refused_with_the_nearest_valid_values(run_dir: Path, tmp_path: Path) -> None:
    proc = dit("sample", "--checkpoint", str(run_dir), "--prompt", "x", "--frames", "16", "--height", "50",
               "--width", "64", "--out", str(tmp_path / "x.mp4"), ok=False)
    assert proc.returncode != 0
    assert "frames=16" in proc.stderr and "13, 17" in proc.stderr
    assert "height=50" in proc.stderr and "48, 56" in proc.stderr
    assert "width" not in proc.stderr  # 64 is fine
    assert not (tmp_path / "x.mp4").exists()


def test_unknown_key_fails_before_any_work(tmp_path: Path) -> None:
    proc = dit("train", "--config", CONFIG, "train.stesp=3", f"train.output_dir={tmp_path / 'run'}", ok=False)
    assert proc.returncode == 2
    assert "train.stesp" in proc.stderr and "train.steps" in proc.stderr  # names the key and the likely one
    assert not (tmp_path / "run").exists()


def test_missing_shards_fail_at_start(tmp_path: Path) -> None:
    proc = dit("train-vae", "--config", CONFIG, f"data.shards={tmp_path}/data/{{00000..00002}}.tar",
               f"train.output_dir={tmp_path / 'run'}", ok=False)
    assert proc.returncode == 2
    assert "3 of 3 shards" in proc.stderr and "do not exist" in proc.stderr
    assert not (tmp_path / "run").exists()
