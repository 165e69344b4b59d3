"""`python tests/training/hooked_cli.py ARGS...` runs `dit ARGS...` with test hooks applied first: fault injection
that lives in the tests, never in the package. ``DIT_TEST_HOOKS`` (read only here) is a JSON object
``{hook name: its argument}``; runs.py's ``dit_train(..., hooks={...})`` sets it. Add a hook with ``@hook("name")``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ENV = "DIT_TEST_HOOKS"
HOOKS: dict[str, Callable[[Any], None]] = {}


def hook(name: str) -> Callable[[Callable[[Any], None]], Callable[[Any], None]]:
    def register(fn: Callable[[Any], None]) -> Callable[[Any], None]:
        HOOKS[name] = fn
        return fn

    return register


@hook("checkpoint_pause_s")
def checkpoint_pause(seconds: float) -> None:
    """When a checkpoint's temporary directory is complete, before it is renamed into place: write
    checkpoints/.writing (the step) and sleep ``seconds``, so a test can kill the run mid-checkpoint."""
    from dit.export import CKPT_PREFIX
    from dit.training import checkpoint

    publish = checkpoint.publish

    def paused(tmp: Path, final: Path) -> None:
        marker = Path(final).parent / ".writing"
        marker.write_text(str(int(Path(final).name.removeprefix(CKPT_PREFIX))))
        time.sleep(seconds)
        marker.unlink(missing_ok=True)
        publish(tmp, final)

    checkpoint.publish = paused


@hook("disk_full")
def disk_full(arg: dict[str, Any]) -> None:
    """``{"step": N, "errno": E}``: writing checkpoint N's training_state.pt fails as a full disk (or a quota, or
    permissions) fails it: half the bytes land, then OSError(E) (default ENOSPC)."""
    import errno
    import io

    import torch

    real = torch.save

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(f, (str, Path)) and Path(f).name == "training_state.pt" and \
                Path(f).parent.name == f".tmp-step-{arg['step']:08d}":
            buf = io.BytesIO()
            real(obj, buf, *args, **kwargs)
            Path(f).write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
            code = arg.get("errno", errno.ENOSPC)
            raise OSError(code, os.strerror(code), str(f))
        real(obj, f, *args, **kwargs)

    torch.save = save


@hook("nan_loss")
def nan_loss(arg: dict[str, Any]) -> None:
    """``{"rank": R, "calls": [n, ...]}``: rank R's training loss is NaN at its n-th loss computations (1-based;
    with G micro-batches per step, step s's last micro-batch is call s * G)."""
    from dit.training import batch  # (where the step's loss is computed)

    real, calls = batch.training_loss, [0]

    def loss(*args: Any, **kwargs: Any) -> Any:
        value = real(*args, **kwargs)
        if int(os.environ.get("RANK", "0")) != arg["rank"] or not torch.is_grad_enabled():  # (not validation's)
            return value
        calls[0] += 1
        return value * float("nan") if calls[0] in arg["calls"] else value

    batch.training_loss = loss


@hook("die")
def die(arg: dict[str, Any]) -> None:
    """``{"rank": R, "step": S, "at": "step" | "save", "marker": PATH}``: rank R is SIGKILLed (as the OOM killer or
    a lost node does) in step S's loss computation, or in checkpoint S's save after its sharded model and optimizer
    files are written, before the barrier that completes the checkpoint. It writes ``marker`` (the time) first."""
    import signal

    from dit.training import batch, train

    if int(os.environ.get("RANK", "0")) != arg["rank"]:
        return

    def kill() -> None:
        Path(arg["marker"]).write_text(str(time.time()))
        os.kill(os.getpid(), signal.SIGKILL)

    if arg["at"] == "step":
        real, calls = batch.training_loss, [0]

        def loss(*args: Any, **kwargs: Any) -> Any:
            calls[0] += torch.is_grad_enabled()  # (training's loss computations, not validation's)
            if calls[0] == arg["step"] and torch.is_grad_enabled():
                kill()
            return real(*args, **kwargs)

        batch.training_loss = loss
        return
    real_parallelize = train.parallelize

    def parallelize(*args: Any, **kwargs: Any) -> Any:
        strategy = real_parallelize(*args, **kwargs)
        real_save = strategy.save

        def save(tmp: Path) -> Any:
            state = real_save(tmp)
            if Path(tmp).name == f".tmp-step-{arg['step']:08d}":
                kill()
            return state

        strategy.save = save
        return strategy

    train.parallelize = parallelize


@hook("worker_fault")
def worker_fault(arg: dict[str, Any]) -> None:
    """``{"key": K, "signal": "SIGSEGV"}``: the DataLoader worker that decodes sample K dies of that signal. Workers
    start from the loader's forkserver, which imports tests/training/worker_faults.py (it applies the fault)."""
    import multiprocessing as mp

    # the forkserver does not take this process's sys.path (Python 3.11): it finds the module by PYTHONPATH
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent),
                                                             os.environ.get("PYTHONPATH")]))
    ctx = mp.get_context("forkserver")
    real = ctx.set_forkserver_preload
    ctx.set_forkserver_preload = lambda modules: real([*modules, "worker_faults"])  # type: ignore[method-assign]


def apply_hooks(spec: str) -> None:
    for name, arg in json.loads(spec or "{}").items():
        if name not in HOOKS:
            raise SystemExit(f"{ENV}: unknown hook {name!r}; known: {sorted(HOOKS)}")
        HOOKS[name](arg)


if __name__ == "__main__":
    apply_hooks(os.environ.get(ENV, ""))
    from dit.cli import main

    main()
