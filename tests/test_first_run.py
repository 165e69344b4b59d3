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
from cli_errors import assert_one_error_line

from data_pipelines.synthetic import make_synthetic
from dit.models.vae import CausalVAE, save_vae

DIT = str(Path(sys.executable).parent / "dit")
CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
SMALL = ["data.frames=5", "data.height=32", "data.width=32", "train.batch_size=4", "train.steps=2",
         "text.encoder=none"]


def dit(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([DIT, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


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


def test_encode_without_vae_checkpoint_or_with_a_bad_batch_size(root: Path, tmp_path: Path, capsys) -> None:
    line = in_process(capsys, "encode", f"{root}/data", str(tmp_path / "latents"), "--config", CONFIG, *SMALL)
    assert "vae.checkpoint is not set" in line and not (tmp_path / "latents").exists()
    line = in_process(capsys, "encode", f"{root}/data", str(tmp_path / "latents"), "--config", CONFIG,
                      f"vae.checkpoint={root}/vae", "--batch-size", "0", *SMALL)
    assert "--batch-size must be >= 1, got 0" in line and not (tmp_path / "latents").exists()


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


# ----------------------------------------------------------------------------- defect 9: dit sample


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A run as the trainer writes it (random weights, 5 x 16 x 32 clips), whose sample settings are not the
    flags' old defaults: sample.cfg 4, sample.steps 2, sample.fps 6."""
    from dit.config import load_config
    from dit.export import write_export
    from dit.models.dit import build_dit

    root = tmp_path_factory.mktemp("sample")
    cfg = load_config(None, ["data.frames=5", "data.height=16", "data.width=32", "text.encoder=none",
                             "model.preset=dit-tiny", "sample.cfg=4.0", "sample.steps=2", "sample.fps=6"])
    torch.manual_seed(0)
    save_vae(CausalVAE(latent_channels=4, base_channels=8, channel_mults=(1, 1, 1, 1)), root / "vae")
    model = build_dit(cfg.model, in_channels=4, text_dim=8)
    ckpt = root / "run" / "checkpoints" / "step-00000007"
    ckpt.mkdir(parents=True)
    write_export(ckpt, weights=model.state_dict(), config={"dit": model.config, "experiment": cfg.to_dict()},
                 vae_dir=root / "vae")
    return ckpt


BAD_SAMPLE_ARGS = [  # (arguments, what the error line says)
    (["--out", "x.xyz"], "cannot write .xyz files; use .mp4, .gif or .png"),
    (["--fps", "0", "--out", "a.gif"], "--fps must be >= 1, got 0"),
    (["--fps", "0", "--out", "a.mp4"], "--fps must be >= 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--steps", "-3"], "--steps must be >= 1, got -3"),
    (["--cfg", "-1"], "--cfg must be >= 0, got -1.0"),
    (["--eta", "-0.5"], "--eta must be >= 0"),
    (["--frames", "5", "--out", "x.png"], "a .png holds one frame, but --frames 5"),
    (["--frames", "6"], "frames=6 must be 4k+1 (nearest valid: [5, 9])"),
    (["--width", "20"], "width=20 must be a multiple of 16"),
    (["--sampler", "flow_euler"], "does not fit this checkpoint"),
]


@pytest.mark.parametrize(("args", "says"), BAD_SAMPLE_ARGS, ids=[" ".join(a) for a, _ in BAD_SAMPLE_ARGS])
def test_sample_refuses_bad_arguments_before_loading_the_model(checkpoint: Path, tmp_path: Path, monkeypatch,
                                                               capsys, args: list[str], says: str) -> None:
    from dit import sample
    from dit.cli import main as dit_main

    def load_pipeline(*a: object, **k: object) -> None:
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(sample, "load_pipeline", load_pipeline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        dit_main(["sample", "--checkpoint", str(checkpoint), "--prompt", "a red circle", *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and says in errors[0], err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_sample_errors_are_one_line_as_a_subprocess(checkpoint: Path, tmp_path: Path) -> None:
    proc = dit("sample", "--checkpoint", str(checkpoint), "--prompt", "x", "--fps", "0",
               "--out", str(tmp_path / "a.gif"))
    assert_one_error_line(proc, "--fps must be >= 1")
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n  \n")
    proc = dit("sample", "--checkpoint", str(checkpoint), "--prompts", str(empty))
    assert_one_error_line(proc, str(empty), "holds no prompt")  # not "give --prompt TEXT ...", as if none was given
    assert list(tmp_path.iterdir()) == [empty]


def test_sample_takes_the_runs_settings_says_what_it_loaded_and_shows_progress(checkpoint: Path,
                                                                               tmp_path: Path) -> None:
    from PIL import Image

    proc = dit("sample", "--checkpoint", str(checkpoint), "--prompt", "a", "--prompt", "b", "--prompt", "c",
               "--batch-size", "2", "--out", str(tmp_path / "taken.gif"))
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr
    assert "sampling 3 clip(s) of 5x16x32" in err and "ddim, 2 steps, cfg 4" in err  # the run's sample.*
    assert f"loaded checkpoint {checkpoint} (step 7)" in err
    assert "batch 1/2: clips 1-2 of 3" in err and "batch 2/2: clips 3-3 of 3" in err  # not a TTY: a line per batch
    assert err.index("sampling 3 clip(s)") < err.index("loaded checkpoint") < err.index("batch 1/2")
    assert [line.split("\t")[1] for line in proc.stdout.splitlines()] == ["a", "b", "c"]

    # The run's cfg, steps and fps were used: the same first batch as with them given.
    proc = dit("sample", "--checkpoint", str(checkpoint), "--prompt", "a", "--prompt", "b", "--batch-size", "2",
               "--cfg", "4", "--steps", "2", "--fps", "6", "--out", str(tmp_path / "given.gif"))
    assert proc.returncode == 0, proc.stderr
    given, taken = Image.open(tmp_path / "given" / "0000.gif"), Image.open(tmp_path / "taken" / "0000.gif")
    assert taken.info["duration"] == given.info["duration"] > 150  # 6 fps (the flag's old default, 8: 120 ms)
    assert taken.n_frames == given.n_frames == 5
    for i in range(5):
        given.seek(i)
        taken.seek(i)
        assert list(given.getdata()) == list(taken.getdata())


def test_sample_png_without_frames_is_an_image_and_a_far_larger_size_warns(checkpoint: Path, tmp_path: Path) -> None:
    from PIL import Image

    proc = dit("sample", "--checkpoint", str(checkpoint), "--prompt", "a", "--out", str(tmp_path / "a.png"))
    assert proc.returncode == 0, proc.stderr
    assert "of 1x16x32" in proc.stderr and Image.open(tmp_path / "a.png").size == (32, 16)

    proc = dit("sample", "--checkpoint", str(checkpoint), "--prompt", "a", "--frames", "41", "--height", "32",
               "--steps", "1", "--out", str(tmp_path / "long.mp4"))
    assert proc.returncode == 0, proc.stderr
    assert "41x32x32 (frames x height x width; 44 latent tokens each)" in proc.stderr  # 11 x 4 x 4 / patch 1x2x2
    assert "warning: that is 11x the 4 tokens of the size the model was trained at (5x16x32)" in proc.stderr


# ----------------------------------------------------------------------------- defect 10: slurm submit, plan


def in_process(capsys, *args: str) -> str:
    """`dit ARGS` in this process (its main, as the console script runs it): the one error line it printed."""
    from dit.cli import main as dit_main

    with pytest.raises(SystemExit) as exit_:
        dit_main(list(args))
    assert exit_.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1
    return errors[0]


BAD_SUBMIT = [(["--nodes", "0"], "--nodes must be >= 1, got 0"),
              (["--nodes", "-1"], "--nodes must be >= 1, got -1"),
              (["--signal-seconds", "-5"], "--signal-seconds must be in [1, 65535]"),
              (["--time", "abc"], "--time 'abc' is not a SLURM time limit"),
              (["--time", "4", "--signal-seconds", "300"], "--signal-seconds 300 is not below --time 4 (240 s)"),
              (["--gpus-per-node", "-1"], "--gpus-per-node must be >= 0"),
              (["--procs-per-node", "0"], "--procs-per-node must be >= 1"),
              (["--cpus-per-task", "0"], "--cpus-per-task must be >= 1"),
              (["--sbatch", "account=abc"], "is not an sbatch option")]


@pytest.mark.parametrize(("args", "says"), BAD_SUBMIT, ids=[" ".join(a) for a, _ in BAD_SUBMIT])
def test_slurm_submit_refuses_bad_options(tmp_path: Path, capsys, args: list[str], says: str) -> None:
    line = in_process(capsys, "slurm", "submit", "--config", CONFIG, f"train.output_dir={tmp_path / 'run'}",
                      "--dry-run", *args)
    assert says in line, line
    assert not (tmp_path / "run").exists()


def test_slurm_submit_dry_run_with_bad_nodes_is_one_line_as_a_subprocess(tmp_path: Path) -> None:
    proc = dit("slurm", "submit", "--config", CONFIG, f"train.output_dir={tmp_path / 'run'}", "--nodes=0",
               "--dry-run")
    assert_one_error_line(proc, "--nodes must be >= 1, got 0")
    assert "#SBATCH" not in proc.stdout and not (tmp_path / "run").exists()
    good = dit("slurm", "submit", "--config", CONFIG, f"train.output_dir={tmp_path / 'run'}", "--nodes=2",
               "--time=2-00:00", "--dry-run")
    assert good.returncode == 0, good.stderr
    assert "#SBATCH --nodes=2" in good.stdout and "#SBATCH --time=2-00:00" in good.stdout


BAD_PLAN = [(["--gpus-per-node", "0", "train.fsdp_shard=hybrid"], "--gpus-per-node must be >= 1, got 0"),
            (["--gpus", "16", "--gpus-per-node", "3"],
             "--gpus 16 is not a whole number of nodes of --gpus-per-node 3; use --gpus 15 or 18"),
            (["--gpus", "0"], "--gpus must be >= 1"),
            (["--gpu-memory", "0"], "--gpu-memory must be > 0")]


@pytest.mark.parametrize(("args", "says"), BAD_PLAN, ids=[" ".join(a) for a, _ in BAD_PLAN])
def test_plan_refuses_a_job_shape_that_cannot_be(capsys, args: list[str], says: str) -> None:
    base = {"--gpus": "16", "--gpu-memory": "80"}
    for flag in ("--gpus", "--gpu-memory"):
        if flag in args:
            base.pop(flag)
    line = in_process(capsys, "plan", "--config", CONFIG, *(x for kv in base.items() for x in kv), *args)
    assert says in line, line


def test_plan_with_gpus_per_node_0_is_one_line_as_a_subprocess() -> None:
    proc = dit("plan", "--config", CONFIG, "--gpus", "8", "--gpu-memory", "80", "--gpus-per-node", "0",
               "train.strategy=fsdp", "train.fsdp_shard=hybrid")
    assert_one_error_line(proc, "--gpus-per-node must be >= 1")
    ok = dit("plan", "--config", CONFIG, "--gpus", "16", "--gpu-memory", "80", "--gpus-per-node", "8",
             "train.fsdp_shard=hybrid")
    assert ok.returncode == 0 and "fsdp" in ok.stdout, ok.stderr


# ----------------------------------------------------------------------------- defect 12: make-synthetic


def test_make_synthetic_refuses_no_clips_and_a_size_the_vae_cannot_code(tmp_path: Path, capsys) -> None:
    proc = dit("make-synthetic", str(tmp_path / "none"), "--num-clips", "0")
    assert_one_error_line(proc, "--num-clips", "got 0")
    assert not (tmp_path / "none").exists()  # no empty shard
    line = in_process(capsys, "make-synthetic", str(tmp_path / "odd"), "--frames", "8", "--height", "30")
    assert "--frames=8 must be 4k+1 (nearest valid: [5, 9])" in line
    assert "--height=30 must be a multiple of 8 (nearest valid: [24, 32])" in line
    assert not (tmp_path / "odd").exists()
