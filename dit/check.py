"""`dit check RUN`: verify each checkpoint of a run (or one checkpoint directory) against its manifest: every file
there, with its size and sha256 (dit/export.py, integrity). One line per checkpoint, oldest first:

    step-00000002  ok    9 files, 1.4 MB
    step-00000004  torn  training_state.pt is 100 bytes, its manifest says 52344 (truncated or rewritten)
    .tmp-step-00000006  unfinished save: never loaded, removed by the next save of that step
    newest intact: step-00000002 (what train.resume=auto takes)

Exit status 0 when the newest checkpoint is intact, 1 when it is not or none is; no checkpoint at PATH is an
``error:`` line (2).
"""

from __future__ import annotations

from pathlib import Path

from dit.export import MANIFEST, NO_MANIFEST, checkpoint_dirs, checkpoint_problem, dir_bytes


def _size(ckpt: Path) -> str:
    files = sum(1 for p in ckpt.rglob("*") if p.is_file())
    return f"{files} files, {dir_bytes(ckpt) / 1e6:.1f} MB"


def check_line(ckpt: Path, width: int = 0) -> tuple[str, bool]:
    """The report line of one checkpoint directory, and whether it is intact."""
    problem = checkpoint_problem(ckpt)
    state = "ok" if problem is None else "unverified" if problem == NO_MANIFEST else "torn"
    return f"{ckpt.name:<{width}}  {state:<4}  {_size(ckpt) if problem is None else problem}", problem is None


def run_check(path: str | Path) -> int:
    """Print the report of checkpoint directory or run directory ``path``; return the exit status."""
    p = Path(path)
    if any((p / name).is_file() for name in ("model.safetensors", "training_state.pt", MANIFEST)):
        line, ok = check_line(p)
        print(line, flush=True)
        return 0 if ok else 1
    found = checkpoint_dirs(p)
    if not found:
        raise FileNotFoundError(f"no checkpoint in {str(p)!r}: pass a training output directory (train.output_dir) "
                                "or a checkpoint directory (RUN/checkpoints/step-N)")
    width = max(len(c.name) for c in found)
    intact = []
    for ckpt in found:
        line, ok = check_line(ckpt, width)
        print(line, flush=True)
        if ok:
            intact.append(ckpt)
    for tmp in sorted((p / "checkpoints").glob(".tmp-*")):
        print(f"{tmp.name}  unfinished save: never loaded, removed by the next save of that step")
    if intact:
        print(f"newest intact: {intact[-1].name} (what train.resume=auto takes)")
    else:
        print("no intact checkpoint: train.resume=auto and dit sample refuse this run")
    return 0 if intact and intact[-1] == found[-1] else 1
