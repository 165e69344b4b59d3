"""Preemption: on SIGUSR1 or SIGTERM, finish the current step, write a checkpoint, exit with REQUEUE_EXIT_CODE.

SLURM sends a signal before it kills a preempted or time-limited job (``#SBATCH --signal=B:USR1@90`` or
``--signal=USR1@90`` for the tasks; SIGTERM on preemption/scancel). ``dit train`` then stops after the step in
progress, checkpoints, and every rank exits with ``REQUEUE_EXIT_CODE`` (42): the sbatch script turns that exit
code into ``scontrol requeue $SLURM_JOB_ID``, and the requeued job resumes from that checkpoint. Under
torchrun / accelerate launch (whose agent exits 1 when a worker fails), test for RUN_DIR/PREEMPTED instead.

The handler only sets a flag (nothing unsafe runs inside a signal handler). The ranks agree on stopping
through one tiny all-reduce per step, so a signal that reaches one rank earlier than another still makes all
of them stop after the same step (and join the same checkpoint collectives).
"""

from __future__ import annotations

import logging
import signal
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger("dit.preemption")

REQUEUE_EXIT_CODE = 42  # `dit train` exits with this after a preemption checkpoint: requeue the job
# Also written (by rank 0) as RUN_DIR/PREEMPTED = {"step": N, "exit_code": 42}, and removed when a run starts:
# launchers that wrap the workers (torchrun, accelerate launch) exit 1 when a worker exits 42, so a script
# that starts `dit train` through them should test for this file rather than the launcher's exit code.
PREEMPTED_MARKER = "PREEMPTED"
PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is written; uncaught, the process exits with REQUEUE_EXIT_CODE."""

    def __init__(self, step: int) -> None:
        super().__init__(REQUEUE_EXIT_CODE)
        self.step = step


class PreemptionHandler:
    """Catches the preemption signals while active (a context manager); ``requested()`` is collective.

        with PreemptionHandler() as preempt:
            while ...:
                train_step()
                if preempt.requested():   # every rank calls this once per step
                    save(step); raise Preempted(step)
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = PREEMPTION_SIGNALS) -> None:
        self.signals = signals
        self.received: int | None = None  # the signal number, once one arrived
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def __enter__(self) -> PreemptionHandler:
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous.clear()

    def requested(self) -> bool:
        """True on every rank when any rank received a preemption signal (an all-reduce when distributed)."""
        flag = self.received is not None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            backend = dist.get_backend()
            device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
            t = torch.tensor([1.0 if flag else 0.0], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item() > 0)
        if flag and self.received is not None:
            log.warning("received %s: finishing this step, checkpointing, then exiting with %d (requeue)",
                        signal.Signals(self.received).name, REQUEUE_EXIT_CODE)
        return flag
