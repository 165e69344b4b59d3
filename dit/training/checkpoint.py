"""Atomic checkpoints: written to a temporary directory, flushed, then renamed; a half-written one is never used.

    RUN_DIR/checkpoints/step-00000200/
        model.safetensors, config.json, vae/    the inference export (dit/export.py)
        training_state.pt      raw weights, optimizer, LR scheduler, EMA, RNG, step (tensors and plain data only,
                               loaded with weights_only=True)
        rank-00000.pt ...      each rank's RNG states and data-loader position
        deepspeed/ | fsdp/     the sharded model + optimizer state of those strategies (one file per rank)

        manifest.json          every file's size and sha256, written last (dit/export.py: integrity)

With several processes every rank writes its own files into the same temporary directory; after a barrier rank 0
checks that every rank's rank-XXXXX.pt is there, writes the manifest (hashing everything once) and renames the
directory, so a checkpoint directory exists only once all ranks' files are in it and listed.

Resume takes the newest *intact* checkpoint (its manifest verifies: sizes and sha256 of every file, the ranks
sharing the hashing); a newer torn one is skipped with a log line naming it and why, never loaded. A checkpoint
without manifest (written before manifests) is unverified: ``train.resume=auto`` skips it; naming its directory in
``train.resume`` loads it (with a warning). And a run folder is never mixed with another run (``refuse_mixed_runs``):
starting from scratch (or from another folder's checkpoint) where checkpoints exist, or resuming them with another
model, is refused before anything is written, unless ``--overwrite`` first clears the folder (``clear_run``).
"""

from __future__ import annotations

import errno
import json
import logging
import math
import random
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from data_pipelines.config import ConfigError
from dit.distributed.preemption import PREEMPTED_MARKER
from dit.distributed.setup import DistEnv
from dit.export import (
    CKPT_PREFIX,
    EXPORT_FILES,
    MANIFEST,
    NO_MANIFEST,
    CheckpointError,
    checkpoint_dirs,
    checkpoint_problem,
    checkpoint_step,
    dir_bytes,
    first_intact,
    write_manifest,
)
from dit.fileio import atomic_file, publish

log = logging.getLogger("dit.checkpoint")
RESUME_FILES = (*EXPORT_FILES, "training_state.pt")  # what a resumable checkpoint's manifest must list
# The keys of the model config that shape its weights: a run resumed with another value of one cannot load them.
ARCHITECTURE = ("family", "preset", "hidden_size", "depth", "num_heads", "patch_size", "mlp_ratio", "qk_norm",
                "abs_pos", "family_config", "condition")
# Model settings that change the training state's parameter layout (the optimizer's state follows it), with the value
# runs recorded before the key existed had.
STATE_LAYOUT = {"fused_qkv": False}
# What `dit train` writes into a run folder (what --overwrite deletes; nothing else there is touched).
RUN_OUTPUTS = ("checkpoints", "tensorboard", "metrics.jsonl", "config.yaml", PREEMPTED_MARKER)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(tuple(state["python"][:1]) + (tuple(state["python"][1]),) + tuple(state["python"][2:]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _noop() -> None:
    pass


@contextmanager
def atomic_checkpoint(run_dir: str | Path, step: int, *, keep_last: int = 3, is_main: bool = True,
                      barrier: Callable[[], None] = _noop, world_size: int = 0,
                      keep: tuple[int, ...] = ()) -> Iterator[Path]:
    """Yield a temporary directory for checkpoint ``step`` that every rank writes into; on a clean exit rank 0
    checks that each of the ``world_size`` ranks' rank-XXXXX.pt is there, writes the manifest (last), flushes the
    directory and renames it to RUN_DIR/checkpoints/step-NNNNNNNN, then keeps only the newest ``keep_last`` intact
    (and the steps in ``keep``).

    An exception (or a crash) inside the block leaves only the ``.tmp-`` directory, which is never loaded and
    is removed by the next save of that step. Every rank must enter and leave the block (it has barriers).
    """
    root = Path(run_dir) / "checkpoints"
    final = root / f"{CKPT_PREFIX}{step:08d}"
    tmp = root / f".tmp-{final.name}"
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    try:
        yield tmp
        barrier()  # every rank's files are in tmp
        if is_main:
            write_manifest(tmp, expected=[rank_state_path(".", r).as_posix() for r in range(world_size)])
            if final.exists():  # re-saving the same step (e.g. final == periodic, or over a torn one): replace it
                shutil.rmtree(final)
            publish(tmp, final)  # flushed, then renamed in one step
            prune(run_dir, keep_last, keep)
    except OSError as e:  # a full disk, a quota, permissions: the user's to fix; the earlier checkpoints stand
        written = dir_bytes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(write_failure(Path(run_dir), step, e, written)) from e
    barrier()


class CheckpointWriteError(ConfigError):
    """A checkpoint could not be written (ENOSPC, EDQUOT, EACCES, ...): its temporary directory is removed, the
    earlier checkpoints are intact, and the run stops (one ``error:`` line) at the state of the last one."""


def write_failure(run_dir: Path, step: int, e: OSError, written: int) -> str:
    """The message for a failed checkpoint write: what failed, where, the bytes a checkpoint takes and the bytes
    free, which checkpoint a resume continues from, and what to do."""
    intact = [p for p in checkpoint_dirs(run_dir) if checkpoint_problem(p, digests=False) is None]
    need = max(dir_bytes(intact[-1]) if intact else 0, written)
    root = run_dir / "checkpoints"
    free = shutil.disk_usage(root if root.is_dir() else run_dir).free
    code = errno.errorcode.get(e.errno or 0, "")
    where = f" ({e.filename})" if e.filename else ""
    last = (f"the last complete checkpoint, {intact[-1].name}, is intact and `--resume auto` continues from it"
            if intact else "no earlier checkpoint exists, so a rerun starts from step 0")
    return (f"could not write checkpoint step {step} in {root}: {e.strerror or e}{f' [{code}]' if code else ''}"
            f"{where}. A checkpoint of this run takes about {gib(need)} ({need} bytes) and {gib(free)} are free "
            f"there. The unfinished checkpoint was removed and {last}. Free space (fewer checkpoints: "
            "train.keep_last), raise the quota or fix the permissions of the folder, then run again")


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def prune(run_dir: str | Path, keep_last: int, keep: tuple[int, ...] = ()) -> None:
    """Delete the checkpoints older than the newest ``keep_last`` intact ones (sizes checked, not digests), except
    the steps in ``keep`` (train.keep_best's); a torn checkpoint never pushes an intact one out, and one newer than
    those kept stays for `dit check` to report."""
    intact = [p for p in checkpoint_dirs(run_dir) if checkpoint_problem(p, digests=False) is None]
    if len(intact) < keep_last:
        return
    oldest_kept = checkpoint_step(intact[-keep_last])
    for old in checkpoint_dirs(run_dir):
        if checkpoint_step(old) < oldest_kept and checkpoint_step(old) not in keep:
            shutil.rmtree(old, ignore_errors=True)


BEST_FILE = "best.json"  # train.keep_best: the checkpoint of the lowest validation loss so far


def read_best(run_dir: str | Path, start_step: int, weights: str = "ema") -> dict[str, Any] | None:
    """RUN/best.json as of ``start_step`` (a record from after it belongs to steps a resume takes again: None), if
    it ranks the same ``weights`` (ema or live: a record of the other's loss does not compare)."""
    path = Path(run_dir) / BEST_FILE
    try:
        best = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(best, dict) or best.get("weights", "live") != weights:
        return None
    return best if best.get("step", math.inf) <= start_step else None


def write_best(run_dir: str | Path, step: int, val_loss: float, weights: str = "ema") -> dict[str, Any]:
    """Record checkpoint ``step`` as the best (rank 0), whole or not at all; ``weights``: whose validation loss
    ranks (ema or live)."""
    best = {"step": step, "val_loss": val_loss, "weights": weights,
            "checkpoint": f"checkpoints/{CKPT_PREFIX}{step:08d}"}
    with atomic_file(Path(run_dir) / BEST_FILE) as tmp:
        tmp.write_text(json.dumps(best) + "\n")
    return best


def rank_state_path(ckpt: str | Path, rank: int) -> Path:
    return Path(ckpt) / f"rank-{rank:05d}.pt"


def resume_problem(ckpt: str | Path, share: tuple[int, int] = (0, 1)) -> str | None:
    """Why checkpoint ``ckpt`` cannot be resumed from (None: intact), every file's size and sha256 checked
    (``share``: this rank's part of the hashing, see checkpoint_problem)."""
    return checkpoint_problem(ckpt, required=RESUME_FILES, share=share)


def on_main(env: DistEnv, fn: Callable[[], Any]) -> Any:
    """``fn()`` run on rank 0 only; every rank returns its result, or raises the error it raised (so no rank is left
    waiting alone, and all stop with the same message)."""
    if env.world_size == 1:
        return fn()
    box: list[Any] = [None]
    if env.is_main:
        try:
            box = [(fn(), None)]
        except Exception as e:  # handed to every rank, raised there
            box = [(None, e)]
    dist.broadcast_object_list(box, src=0)
    result, error = box[0]
    if error is not None:
        raise error
    return result


def agreed_problem(ckpt: Path, env: DistEnv) -> str | None:
    """Why ``ckpt`` cannot be resumed (None: intact), the hashing split over the ranks; every rank gets the same
    answer (the first problem any rank found), so all resume from the same checkpoint."""
    mine = resume_problem(ckpt, share=(env.rank, env.world_size))
    if env.world_size == 1:
        return mine
    everyone: list[Any] = [None] * env.world_size
    dist.all_gather_object(everyone, mine)
    return next((p for p in everyone if p is not None), None)


def clear_run(out: str | Path, resume: str) -> None:
    """``--overwrite``: delete what `dit train` wrote into run folder ``out`` (checkpoints, logs, config.yaml),
    nothing else. Refused when ``resume`` names a checkpoint inside it (it would be deleted)."""
    out = Path(out)
    if resume not in ("auto", "never") and Path(resume).resolve().is_relative_to(out.resolve()):
        raise CheckpointError(f"--overwrite would delete train.resume={resume!r}, which is inside the run folder "
                              f"{out}: drop --overwrite to continue from it, or train.resume to start over")
    gone = [name for name in RUN_OUTPUTS if (out / name).exists()]
    for name in gone:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if gone:
        log.warning("--overwrite: deleted %s of the earlier run in %s", ", ".join(gone), out)


def resume_candidates(run_dir: str | Path, resume: str) -> tuple[list[Path], bool]:
    """The checkpoints ``train.resume`` may start from, newest first, and whether it names one checkpoint directory
    itself (then it is the only one, and is used unverified if it has no manifest): ``never`` none, ``auto`` every
    checkpoint of RUN_DIR, a run directory its checkpoints, a checkpoint directory that one (with a training state)."""
    if resume == "never":
        return [], False
    if resume == "auto":
        return checkpoint_dirs(run_dir)[::-1], False
    path = Path(resume)
    if any((path / name).is_file() for name in (*RESUME_FILES, MANIFEST)):
        if not (path / "training_state.pt").is_file():
            raise FileNotFoundError(f"train.resume={resume!r}: {path} holds weights only (no training_state.pt); "
                                    "use it as a starting point for sampling, not for resuming")
        return [path], True
    found = checkpoint_dirs(path)[::-1]
    if not found:
        raise FileNotFoundError(f"train.resume={resume!r}: no checkpoint in {str(path)!r}: pass a training output "
                                "directory or a checkpoint directory (RUN/checkpoints/step-N)")
    return found, False


def pick_resume(candidates: list[Path], explicit: bool, where: str | Path,
                problem_of: Callable[[Path], str | None] = resume_problem, quiet: bool = False) -> Path | None:
    """The checkpoint to resume from among ``candidates`` (resume_candidates): the newest intact one, each newer one
    skipped being logged with its reason (``quiet``: not logged, on the ranks other than 0); a CheckpointError when
    there are candidates and none is intact. ``explicit`` (one named directory): torn is an error, no manifest a
    warning. ``problem_of``: resume_problem, or a version whose hashing the ranks share (train.py)."""
    if not candidates:
        return None
    if explicit:
        ckpt = candidates[0]
        problem = problem_of(ckpt)
        if problem is not None and problem != NO_MANIFEST:
            raise CheckpointError(f"train.resume={str(ckpt)!r} is torn: {problem}. Resume from an older checkpoint "
                                  f"of its run (`dit check {ckpt.parent.parent}` lists the intact ones)")
        if problem is not None and not quiet:
            log.warning("train.resume=%s: %s; resuming from it as asked", ckpt, problem)
        return ckpt
    return first_intact(candidates, problem_of, where, quiet=quiet)


def resume_checkpoint(run_dir: str | Path, resume: str) -> Path | None:
    """The checkpoint to resume from in one process: ``auto`` the newest intact one in RUN_DIR (None if it has no
    checkpoint at all), ``never`` None, anything else a checkpoint directory (or run directory) with a training state.
    """
    candidates, explicit = resume_candidates(run_dir, resume)
    return pick_resume(candidates, explicit, run_dir if resume == "auto" else resume)


def refuse_mixed_runs(out: str | Path, resume_from: Path | None, model: dict[str, Any]) -> None:
    """A CheckpointError, before anything is written, when this run would mix with another in run folder ``out``:
    it holds checkpoints but this run does not continue from one of them (train.resume=never, or another folder's
    checkpoint), or the checkpoint it resumes holds another model (``model``: this config's model section)."""
    out = Path(out)
    own = checkpoint_dirs(out)
    continuing = resume_from is not None and resume_from.resolve().parent == (out / "checkpoints").resolve()
    if own and not continuing:
        start = "from scratch (train.resume=never)" if resume_from is None else f"from {resume_from}"
        raise CheckpointError(
            f"run folder {out} holds the checkpoints of another run ({', '.join(p.name for p in own[-3:])}), and this "
            f"run would start {start} and mix with them: continue that run with --resume auto, pick a new "
            "train.output_dir, or pass --overwrite to delete its checkpoints and logs and start over")
    if resume_from is None:
        return
    recorded = json.loads((resume_from / "config.json").read_text()).get("experiment", {}).get("model", {})
    changed = [f"model.{k}={recorded[k]!r} there, {model.get(k)!r} here" for k in ARCHITECTURE
               if k in recorded and recorded[k] != model.get(k)]
    changed += [f"model.{k}={recorded.get(k, old)!r} there, {model.get(k, old)!r} here"
                for k, old in STATE_LAYOUT.items() if recorded.get(k, old) != model.get(k, old)]
    if changed:
        name = recorded.get("preset") if recorded.get("family", "dit") == "dit" else recorded["family"]
        where, fix = ("this run folder", "pick a new train.output_dir, or pass --overwrite to delete it and start "
                      "over") if continuing else (f"checkpoint {resume_from}", "resume from a checkpoint of this model")
        raise CheckpointError(f"{where} holds a {name} run ({'; '.join(changed)}): resume it with its own model "
                              f"settings (the run's config.yaml), {fix}")


def load_training_state(ckpt: str | Path) -> dict[str, Any]:
    return torch.load(Path(ckpt) / "training_state.pt", map_location="cpu", weights_only=True)
