"""Checkpoint integrity and run folders: every checkpoint carries a manifest (sizes + sha256) written last, after every
rank's files; resume and `dit sample` take the newest intact checkpoint and say which newer one they skipped and
why; a torn or corrupt one is never loaded; a run folder is never mixed with another run or another model.

The unit tests build checkpoints by hand; the rest run `dit train` / `dit sample` as real processes on one small
run (6 steps, a checkpoint every 2) that each test copies before changing it."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml
from runs import DEMO, ROOT, dit_train

from dit.check import run_check as check_run
from dit.cli import main as dit_main
from dit.export import (
    MANIFEST,
    NO_MANIFEST,
    CheckpointError,
    checkpoint_dirs,
    checkpoint_problem,
    load_weights,
    resolve_checkpoint,
)
from dit.training.checkpoint import atomic_checkpoint, load_training_state, resume_checkpoint

STEPS = {"train.steps": 6, "train.checkpoint_every": 2, "train.keep_last": 5}


# ---- by hand: manifests, verification, pruning, the resume choice --------------------------------------------------


def fake_save(run: Path, step: int, *, keep_last: int = 5, ranks: int = 1) -> Path:
    """A checkpoint as training writes it (the files' contents do not matter here), for ``ranks`` ranks run as
    threads that meet at the checkpoint's barriers; rank 1 writes its file late."""
    barrier = threading.Barrier(ranks)
    errors: list[BaseException] = []

    def rank(r: int) -> None:
        try:
            with atomic_checkpoint(run, step, keep_last=keep_last, is_main=r == 0, barrier=barrier.wait,
                                   world_size=ranks) as tmp:
                if r == 0:
                    (tmp / "model.safetensors").write_bytes(b"w" * 100)
                    (tmp / "config.json").write_text("{}")
                    (tmp / "training_state.pt").write_bytes(b"s" * 1000)
                    (tmp / "vae").mkdir()
                    (tmp / "vae" / "vae.json").write_text("{}")
                else:
                    threading.Event().wait(0.3)  # the slow rank: rank 0 must wait for it at the barrier
                (tmp / f"rank-{r:05d}.pt").write_bytes(bytes([r]) * 50)
        except BaseException as e:  # noqa: BLE001  (reported by the test)
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return run / "checkpoints" / f"step-{step:08d}"


def test_the_manifest_is_written_last_and_lists_every_rank_s_file(tmp_path: Path) -> None:
    ckpt = fake_save(tmp_path, 2, ranks=2)
    files = json.loads((ckpt / MANIFEST).read_text())["files"]
    assert sorted(files) == ["config.json", "model.safetensors", "rank-00000.pt", "rank-00001.pt",
                             "training_state.pt", "vae/vae.json"]
    assert files["rank-00001.pt"]["size"] == 50 and len(files["rank-00001.pt"]["sha256"]) == 64
    assert checkpoint_problem(ckpt) is None
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith(".")) == []  # no temporary file left


def test_a_rank_s_missing_file_stops_the_save_before_any_checkpoint_exists(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"missing \['rank-00001.pt'\]"), \
            atomic_checkpoint(tmp_path, 4, world_size=2) as tmp:  # one process that says the job has two ranks
        (tmp / "model.safetensors").write_bytes(b"w")
        (tmp / "config.json").write_text("{}")
        (tmp / "rank-00000.pt").write_bytes(b"r")
    assert checkpoint_dirs(tmp_path) == []


def test_what_verification_catches(tmp_path: Path) -> None:
    ckpt = fake_save(tmp_path, 2)
    state = ckpt / "training_state.pt"
    flipped = bytearray(state.read_bytes())
    flipped[500] ^= 1
    state.write_bytes(bytes(flipped))  # same size, other bytes
    assert checkpoint_problem(ckpt, digests=False) is None
    assert checkpoint_problem(ckpt) == ("training_state.pt does not match the sha256 in its manifest "
                                        "(changed after it was written)")
    assert checkpoint_problem(ckpt, only=lambda name: name != "training_state.pt") is None  # what sampling reads
    state.write_bytes(b"s" * 10)
    assert checkpoint_problem(ckpt, digests=False) == ("training_state.pt is 10 bytes, its manifest says 1000 "
                                                       "(truncated or rewritten)")
    state.unlink()
    assert checkpoint_problem(ckpt) == "training_state.pt is missing"
    (ckpt / MANIFEST).write_text('{"files": ')
    assert checkpoint_problem(ckpt).startswith("manifest.json is unreadable (JSONDecodeError")
    (ckpt / MANIFEST).unlink()
    assert checkpoint_problem(ckpt) == NO_MANIFEST


def test_a_torn_newest_checkpoint_never_pushes_out_an_intact_one(tmp_path: Path) -> None:
    for step in (2, 4):
        fake_save(tmp_path, step, keep_last=2)
    (tmp_path / "checkpoints" / "step-00000004" / "training_state.pt").write_bytes(b"")  # torn after its save
    fake_save(tmp_path, 6, keep_last=2)
    fake_save(tmp_path, 8, keep_last=2)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-00000006", "step-00000008"]  # 2 and torn 4 pruned
    (tmp_path / "checkpoints" / "step-00000008" / "rank-00000.pt").unlink()
    fake_save(tmp_path, 10, keep_last=2)
    (tmp_path / "checkpoints" / "step-00000010" / "model.safetensors").write_bytes(b"")
    fake_save(tmp_path, 12, keep_last=2)  # intact: 6 and 12; 8 and 10 are torn, so 6 stays
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-00000006", "step-00000008", "step-00000010",
                                                           "step-00000012"]


def test_the_resume_choice(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert resume_checkpoint(tmp_path, "auto") is None  # nothing there: a fresh run
    two, four = fake_save(tmp_path, 2), fake_save(tmp_path, 4)
    (four / "rank-00000.pt").unlink()
    with caplog.at_level(logging.WARNING, "dit.checkpoint"):
        assert resume_checkpoint(tmp_path, "auto") == two
    assert f"skipping checkpoint {four}: rank-00000.pt is missing" in caplog.text
    with pytest.raises(CheckpointError, match=r"train.resume=.*step-00000004' is torn: rank-00000.pt is missing"):
        resume_checkpoint(tmp_path, str(four))  # named itself: an error, not a fall-back
    (two / "training_state.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no intact checkpoint in .*step-00000004: rank-00000.pt is missing; "
                                              r"step-00000002: training_state.pt is 0 bytes"):
        resume_checkpoint(tmp_path, "auto")  # never a silent fresh start over a run's torn checkpoints
    old = fake_save(tmp_path / "old", 2)
    (old / MANIFEST).unlink()  # written before manifests
    with pytest.raises(CheckpointError, match="no manifest.json: unverified"):
        resume_checkpoint(tmp_path / "old", "auto")
    caplog.clear()
    with caplog.at_level(logging.WARNING, "dit.checkpoint"):
        assert resume_checkpoint(tmp_path / "old", str(old)) == old  # named itself: used, with a warning
    assert "unverified" in caplog.text and "resuming from it as asked" in caplog.text


def test_the_ranks_share_the_hashing_and_agree(tmp_path: Path) -> None:
    """2 gloo processes: only rank 1 hashes the damaged file, and both skip that checkpoint."""
    two, four = fake_save(tmp_path, 2, ranks=2), fake_save(tmp_path, 4, ranks=2)
    names = sorted(json.loads((four / MANIFEST).read_text())["files"])
    victim = four / names[1::2][0]  # in rank 1's share of the hashing
    data = bytearray(victim.read_bytes())
    data[0] ^= 1
    victim.write_bytes(bytes(data))
    script = tmp_path / "pick.py"
    script.write_text("\n".join([
        "from pathlib import Path",
        "from dit.distributed.setup import setup_distributed, teardown_distributed",
        "from dit.training.checkpoint import agreed_problem, pick_resume, resume_candidates",
        "env = setup_distributed()",
        f"cands, explicit = resume_candidates(Path({str(tmp_path)!r}), 'auto')",
        "got = pick_resume(cands, explicit, 'run', lambda c: agreed_problem(c, env), quiet=env.rank != 0)",
        "print(f'rank {env.rank} picks {got.name}', flush=True)",
        "teardown_distributed()"]))  # as dit train ends: exiting with a live gloo group can abort (1 run in 8)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 0 picks step-00000002" in done.stdout and "rank 1 picks step-00000002" in done.stdout
    assert done.stderr.count(f"skipping checkpoint {four}: {victim.name} does not match the sha256") == 1
    assert two.is_dir()


# ---- real runs ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run6(tmp_path_factory, small_shards: str, small_vae: Path) -> Path:
    """`dit train` to step 6 with checkpoints 2, 4, 6. The YAML's VAE sizes are wrong on purpose (the VAE loaded
    has 8 latent channels of base 8): the run must record the VAE's own."""
    run = tmp_path_factory.mktemp("integrity") / "run"
    done = dit_train(run, small_shards, small_vae, **STEPS, **{"vae.latent_channels": 3, "vae.base_channels": 99})
    assert done.returncode == 0, done.stderr[-3000:]
    return run


def copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


def ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:08d}"


def snapshot(run: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(run)): (p.stat().st_size, p.stat().st_mtime_ns) for p in run.rglob("*")}


def losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def test_the_run_records_the_vae_it_loaded_and_every_checkpoint_verifies(run6: Path) -> None:
    for recorded in (yaml.safe_load((run6 / "config.yaml").read_text())["vae"],
                     json.loads((ckpt(run6, 6) / "config.json").read_text())["experiment"]["vae"]):
        assert (recorded["latent_channels"], recorded["base_channels"]) == (8, 8)  # not the YAML's 3 and 99
    for step in (2, 4, 6):
        assert checkpoint_problem(ckpt(run6, step)) is None
        listed = json.loads((ckpt(run6, step) / MANIFEST).read_text())["files"]
        assert {"model.safetensors", "config.json", "training_state.pt", "rank-00000.pt"} <= set(listed)


def test_torn_newest_checkpoints_are_skipped_and_the_resume_equals_an_intact_run(run6: Path, tmp_path: Path,
                                                                                 small_shards: str,
                                                                                 small_vae: Path) -> None:
    """Step 6's training state truncated and step 4's rank-00000.pt deleted: `dit check` names both, and
    ``--resume auto`` falls back to step 2, says why, and ends bit for bit where the intact run did (an intact
    resume equals the uninterrupted run: tests/training/test_resume.py)."""
    torn = copy_run(run6, tmp_path / "torn")
    state = ckpt(torn, 6) / "training_state.pt"
    with open(state, "r+b") as f:  # truncated, as a copy or a full disk on a shared filesystem leaves it
        f.truncate(state.stat().st_size // 2)
    (ckpt(torn, 4) / "rank-00000.pt").unlink()

    check = subprocess.run([sys.executable, "-m", "dit.cli", "check", str(torn)], capture_output=True, text=True,
                           timeout=120, cwd=ROOT)
    assert check.returncode == 1, check.stdout + check.stderr
    lines = check.stdout.splitlines()
    assert lines[0].startswith("step-00000002  ok ")
    assert lines[1] == "step-00000004  torn  rank-00000.pt is missing"
    assert lines[2].startswith("step-00000006  torn  training_state.pt is ") and "its manifest says" in lines[2]
    assert lines[3] == "newest intact: step-00000002 (what train.resume=auto takes)"

    done = dit_train(torn, small_shards, small_vae, **STEPS)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"skipping checkpoint {ckpt(torn, 6)}: training_state.pt is " in done.stderr
    assert f"skipping checkpoint {ckpt(torn, 4)}: rank-00000.pt is missing" in done.stderr
    assert f"resumed from {ckpt(torn, 2)} at step 2" in done.stderr

    assert losses(torn) == losses(run6) and [s for s, _ in losses(torn)] == list(range(1, 7))
    a, b = load_training_state(ckpt(torn, 6)), load_training_state(ckpt(run6, 6))
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert all(checkpoint_problem(ckpt(torn, s)) is None for s in (2, 4, 6))  # the torn ones were rewritten
    assert check_run(torn) == 0


def test_a_full_disk_stops_the_run_and_keeps_the_last_checkpoint(run6: Path, tmp_path: Path, small_shards: str,
                                                                 small_vae: Path) -> None:
    """Checkpoint 4's write fails half-way (a full disk, a quota): the run stops with one error line naming the path,
    the bytes a checkpoint takes and the bytes free; step 2 stays intact, no temporary directory is left, and
    ``--resume auto`` continues from step 2 bit for bit as the uninterrupted run."""
    run = tmp_path / "full"
    done = dit_train(run, small_shards, small_vae, hooks={"disk_full": {"step": 4}}, **STEPS)
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [x for x in done.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert f"could not write checkpoint step 4 in {run / 'checkpoints'}: No space left on device [ENOSPC] " \
           f"({run / 'checkpoints' / '.tmp-step-00000004' / 'training_state.pt'})" in errors[0]
    assert "A checkpoint of this run takes about" in errors[0] and "are free there" in errors[0]
    assert "the last complete checkpoint, step-00000002, is intact and `--resume auto` continues from it" in errors[0]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002"]  # no .tmp- left
    assert checkpoint_problem(ckpt(run, 2)) is None
    assert [s for s, _ in losses(run)] == [1, 2, 3, 4]  # it stopped at the failed save

    done = dit_train(run, small_shards, small_vae, **STEPS)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {ckpt(run, 2)} at step 2" in done.stderr
    a, b = load_training_state(ckpt(run, 6)), load_training_state(ckpt(run6, 6))
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])


@pytest.mark.parametrize("code", ["EDQUOT", "EACCES"])
def test_a_failed_write_removes_the_temporary_directory_and_names_the_cause(tmp_path: Path, code: str) -> None:
    import errno

    from dit.training.checkpoint import CheckpointWriteError

    two = fake_save(tmp_path, 2)
    with pytest.raises(CheckpointWriteError) as e:
        with atomic_checkpoint(tmp_path, 4) as tmp:
            (tmp / "model.safetensors").write_bytes(b"w" * 5000)
            raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)), str(tmp / "config.json"))
    where = tmp_path / "checkpoints" / ".tmp-step-00000004" / "config.json"
    assert f"could not write checkpoint step 4 in {tmp_path / 'checkpoints'}: {os.strerror(getattr(errno, code))} " \
           f"[{code}] ({where})" in str(e.value)
    assert "step-00000002, is intact" in str(e.value)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [two.name]
    assert checkpoint_problem(two) is None


def sample_cli(checkpoint: Path, out: Path, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """`dit sample` in this process (its main, as the command runs it): exit status and stderr."""
    with pytest.raises(SystemExit) as stop:
        dit_main(["sample", "--checkpoint", str(checkpoint), "--prompt", "a red circle", "--steps", "1",
                  "--out", str(out)])
    return stop.value.code, capsys.readouterr().err


def test_sample_refuses_corrupt_weights_before_sampling(run6: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    run = copy_run(run6, tmp_path / "run")
    out = tmp_path / "clip.mp4"
    weights = ckpt(run, 6) / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 3)

    # The command itself: one error line, no traceback, nothing written.
    cmd = [sys.executable, "-m", "dit.cli", "sample", "--checkpoint", str(ckpt(run, 6)), "--prompt", "a red circle",
           "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: corrupt checkpoint {ckpt(run, 6)}: model.safetensors is {size // 3} bytes, its manifest says "
        f"{size} (truncated or rewritten). Use an older checkpoint of its run (`dit check {run}` lists the intact "
        "ones)")
    assert not out.exists()

    # The run directory: the newest intact one, the torn one named.
    with caplog.at_level(logging.WARNING, "dit.checkpoint"):
        assert resolve_checkpoint(run) == ckpt(run, 4)
    assert f"skipping checkpoint {ckpt(run, 6)}: model.safetensors is {size // 3} bytes" in caplog.text

    # Zero bytes, and no manifest to tell: the file itself cannot be read.
    weights.write_bytes(b"")
    (ckpt(run, 6) / MANIFEST).unlink()
    code, err = sample_cli(ckpt(run, 6), out, capsys)
    assert code == 2 and err.strip().splitlines()[-1].startswith(
        f"error: corrupt checkpoint {ckpt(run, 6)}: model.safetensors cannot be read")

    # 4 KB overwritten inside (the weights there become NaN): the digest tells; without a manifest, the values do.
    weights = ckpt(run, 4) / "model.safetensors"
    header = 8 + int.from_bytes(weights.read_bytes()[:8], "little")
    with open(weights, "r+b") as f:
        f.seek(header + 1024)
        f.write(b"\xff" * 4096)
    code, err = sample_cli(ckpt(run, 4), out, capsys)
    assert code == 2 and "model.safetensors does not match the sha256 in its manifest" in err
    (ckpt(run, 4) / MANIFEST).unlink()
    code, err = sample_cli(ckpt(run, 4), out, capsys)
    assert code == 2 and err.strip().splitlines()[-1].startswith(
        f"error: corrupt checkpoint {ckpt(run, 4)}: non-finite weights (NaN or inf)")
    assert not out.exists()
    weights_ok, _ = load_weights(ckpt(run, 2))  # the intact one still loads
    assert all(torch.isfinite(w).all() for w in weights_ok.values())


def dit_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dit.cli", *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def train_args(run: Path, shards: str, vae: Path, *extra: str) -> list[str]:
    from runs import small_overrides

    return ["train", "--config", str(DEMO), *small_overrides(run, shards, vae, **STEPS), *extra]


def train_cli(*args: str) -> int:
    """`dit train` in this process (its main, as the command runs it); the exit status."""
    try:
        dit_main(list(args))
    except SystemExit as stop:
        return stop.code
    return 0


def test_a_used_run_folder_is_refused_for_a_fresh_run_and_cleared_only_with_overwrite(
        run6: Path, tmp_path: Path, small_shards: str, small_vae: Path, capsys: pytest.CaptureFixture) -> None:
    run = copy_run(run6, tmp_path / "run")
    before = snapshot(run)
    assert train_cli(*train_args(run, small_shards, small_vae, "train.seed=7"), "--resume", "never") == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: run folder {run} holds the checkpoints of another run (step-00000002, step-00000004, "
        "step-00000006), and this run would start from scratch (train.resume=never) and mix with them: continue "
        "that run with --resume auto, pick a new train.output_dir, or pass --overwrite to delete its checkpoints "
        "and logs and start over")
    assert snapshot(run) == before  # nothing written, nothing deleted

    (run / "notes.txt").write_text("mine")
    done = dit_cli(*train_args(run, small_shards, small_vae, "train.seed=7", "train.steps=2"), "--resume", "never",
                   "--overwrite")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--overwrite: deleted checkpoints, tensorboard, metrics.jsonl, config.yaml of the earlier run" in done.stderr
    assert [p.name for p in checkpoint_dirs(run)] == ["step-00000002"]
    assert [s for s, _ in losses(run)] == [1, 2]
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["seed"] == 7
    assert (run / "notes.txt").read_text() == "mine"  # only what dit train writes is deleted


def test_another_model_into_the_same_folder_is_refused_before_anything_is_written(
        run6: Path, tmp_path: Path, small_shards: str, small_vae: Path, capsys: pytest.CaptureFixture) -> None:
    run = copy_run(run6, tmp_path / "run")
    before, config = snapshot(run), (run / "config.yaml").read_text()
    assert train_cli(*train_args(run, small_shards, small_vae, "model.preset=DiT-S/2", "train.steps=8")) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: this run folder holds a dit-tiny run (model.preset='dit-tiny' there, 'DiT-S/2' "
                           "here): resume it with its own model settings"), line
    assert (run / "config.yaml").read_text() == config and snapshot(run) == before


def test_fewer_steps_than_the_run_has_done_says_so_and_writes_nothing(
        run6: Path, tmp_path: Path, small_shards: str, small_vae: Path, capsys: pytest.CaptureFixture,
        caplog: pytest.LogCaptureFixture) -> None:
    run = copy_run(run6, tmp_path / "run")
    before = snapshot(run)
    with caplog.at_level(logging.WARNING, "dit.train"):
        assert train_cli(*train_args(run, small_shards, small_vae, "train.steps=3")) == 0
    assert (f"the run in {run} is already at step 6 >= train.steps=3: nothing to do (raise train.steps to train on)"
            in caplog.text)
    assert f"checkpoint: {ckpt(run, 6)}" in capsys.readouterr().out
    assert snapshot(run) == before
