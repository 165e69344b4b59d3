"""SLURM jobs: fill slurm/train.sbatch and submit it, and the per-node launcher that script runs.

    dit slurm submit --config configs/x.yaml --nodes 4 --gpus-per-node 8 --time 24:00:00 --partition gpu
    dit slurm submit --config configs/x.yaml --nodes 4 --gpus-per-node 8 --dry-run   # print, submit nothing

``submit`` checks the experiment config, writes the filled script to TRAIN.OUTPUT_DIR/slurm/train.sbatch (its
``#SBATCH`` lines set from the arguments) and runs ``sbatch SCRIPT --config X OVERRIDES...``.

``launch`` (``dit slurm launch -- ACCELERATE-LAUNCH-ARGS``) is what train.sbatch runs once per node: Accelerate's
launcher (torchrun inside) run in this process, which (1) survives SIGUSR1 and passes it on to the training
processes, where plain ``accelerate launch`` would die of it and leave them to be killed mid-checkpoint, and
(2) exits with the training's own exit code (REQUEUE_EXIT_CODE after a preemption checkpoint), which
``accelerate launch`` turns into 1.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from dit.config import ConfigError
from dit.distributed.preemption import REQUEUE_EXIT_CODE

log = logging.getLogger("dit.slurm")

SLURM_DIR = Path(__file__).resolve().parents[1] / "slurm"


# ----------------------------------------------------------------------------- the per-node launcher


def child_pids(pid: int) -> list[int]:
    """The direct children of ``pid`` (from /proc)."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # field 4, after "pid (comm) state"
            children.append(int(entry.name))
    return children


def _forward(signum: int, frame: FrameType | None) -> None:
    # The training processes are this process's children (torchrun starts them). Under srun they usually got
    # the signal already (SLURM signals every process of the step); the handler there only sets a flag.
    for pid in child_pids(os.getpid()):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def node_exit_code(codes: list[int]) -> int:
    """One exit code for a node from its failed processes' codes (torchrun's: -N for killed by signal N).

    Once one process exits, torchrun stops the others with SIGTERM (SIGKILL after a while), so a preemption
    shows as 42 from the first process and maybe SIGTERM/SIGKILL for the rest; a process exits 42 only after
    the collective preemption checkpoint is written, so that is still a requeue. Likewise a failure is the
    failing process's code, not the SIGTERM that torchrun then sent to the others."""
    codes = [c if c >= 0 else 128 - c for c in codes]
    teardown = {128 + signal.SIGTERM, 128 + signal.SIGKILL}
    failures = [c for c in codes if c != REQUEUE_EXIT_CODE and c not in teardown]  # the processes' own failures
    if REQUEUE_EXIT_CODE in codes and not failures:
        return REQUEUE_EXIT_CODE
    return max(failures or codes)


def launch(argv: list[str]) -> int:
    """Run ``accelerate launch ARGV`` in this process; return the training's exit code (0, 42, ...)."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(argv)
    log.info("accelerate launch %s", shlex.join(argv))
    signal.signal(signal.SIGUSR1, _forward)
    try:
        launch_command(args)
    except ChildFailedError as e:  # torchrun: one or more training processes exited non-zero
        codes = {rank: f.exitcode for rank, f in sorted(e.failures.items())}
        log.warning("training processes exited with %s (rank: code; -N: signal N)", codes)
        return node_exit_code(list(codes.values()))
    except subprocess.CalledProcessError as e:  # accelerate's single-process launcher
        return e.returncode
    except SignalException as e:  # SIGTERM/SIGINT/...: torchrun passed it on and stopped the processes
        return 128 + int(e.sigval)
    return 0


# ----------------------------------------------------------------------------- submit


@dataclass
class TrainJob:
    """What ``dit slurm submit`` puts into train.sbatch's ``#SBATCH`` lines and environment."""

    config: str
    overrides: list[str] = field(default_factory=list)
    nodes: int = 1
    gpus_per_node: int = 8  # 0: a CPU partition (gloo)
    procs_per_node: int | None = None  # training processes per node; default: gpus_per_node (1 on CPU)
    cpus_per_task: int | None = None  # CPUs for each node's processes; default: the whole node (--exclusive)
    time: str | None = None
    partition: str | None = None
    job_name: str | None = None
    signal_seconds: int = 300  # SIGUSR1 this long before the time limit: finish the step, checkpoint, requeue
    sbatch_args: list[str] = field(default_factory=list)  # more sbatch options, e.g. --account=X --qos=Y
    python: str = sys.executable

    def __post_init__(self) -> None:
        """Every option is checked before the config is read or a script written: ``ConfigError`` naming the flag."""
        for flag, value, least in (("--nodes", self.nodes, 1), ("--gpus-per-node", self.gpus_per_node, 0),
                                   ("--procs-per-node", self.procs_per_node, 1),
                                   ("--cpus-per-task", self.cpus_per_task, 1)):
            if value is not None and value < least:
                raise ConfigError(f"{flag} must be >= {least}, got {value}")
        if not 1 <= self.signal_seconds <= MAX_SIGNAL_SECONDS:  # sbatch --signal=B:USR1@N: 0 <= N <= 65535
            raise ConfigError(f"--signal-seconds must be in [1, {MAX_SIGNAL_SECONDS}] (SIGUSR1 this many seconds "
                              f"before the time limit, to checkpoint and requeue), got {self.signal_seconds}")
        limit = time_limit_seconds(self.time) if self.time is not None else None
        if limit is not None and self.signal_seconds >= limit:
            raise ConfigError(f"--signal-seconds {self.signal_seconds} is not below --time {self.time} ({limit} s): "
                              "the job would be told to stop before it starts; lower --signal-seconds or raise --time")
        for extra in self.sbatch_args:
            if not extra.startswith("-"):
                raise ConfigError(f"--sbatch {extra!r} is not an sbatch option; write it as --sbatch=--account=abc")


MAX_SIGNAL_SECONDS = 65535
# sbatch --time: minutes, minutes:seconds, hours:minutes:seconds, days-hours, days-hours:minutes,
# days-hours:minutes:seconds (or UNLIMITED / INFINITE)
TIME_FORMS = re.compile(r"(?:(\d+)-(\d+)(?::(\d+)(?::(\d+))?)?|(\d+)(?::(\d+)(?::(\d+))?)?)")


def time_limit_seconds(value: str) -> int | None:
    """An sbatch ``--time`` in seconds (None: no limit), or ``ConfigError`` listing the forms sbatch accepts."""
    if value.strip().upper() in ("UNLIMITED", "INFINITE"):
        return None
    m = TIME_FORMS.fullmatch(value.strip())
    if m is None:
        raise ConfigError(f"--time {value!r} is not a SLURM time limit; use minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM "
                          "or D-HH:MM:SS (e.g. 24:00:00 or 2-00:00:00)")
    days, hours, minutes, seconds, a, b, c = (int(g) if g is not None else None for g in m.groups())
    if days is not None:  # D-HH[:MM[:SS]]
        total = ((days * 24 + hours) * 60 + (minutes or 0)) * 60 + (seconds or 0)
    elif c is not None:  # HH:MM:SS
        total = (a * 60 + b) * 60 + c
    else:  # MM[:SS]
        total = a * 60 + (b or 0)
    if total == 0:
        return None  # sbatch: a time limit of 0 means none
    return total


def set_directives(script: str, options: dict[str, str | None]) -> str:
    """Set the script's ``#SBATCH`` options: ``{"--nodes": "4", "--requeue": "", "--exclusive": None}`` gives
    ``--nodes=4``, a bare ``--requeue``, and no ``--exclusive``; options not named keep the script's line.
    The directives stay where the script has its first one."""
    lines = script.splitlines()
    idx = [i for i, line in enumerate(lines) if line.startswith("#SBATCH ")]
    if not idx:
        raise ValueError("the template has no #SBATCH lines")
    merged: dict[str, str | None] = {}
    for i in idx:
        key, _, value = lines[i].split(None, 1)[1].strip().partition("=")
        merged[key] = value
    merged.update(options)
    directives = [f"#SBATCH {k}={v}" if v else f"#SBATCH {k}" for k, v in merged.items() if v is not None]
    rest = [line for line in lines if not line.startswith("#SBATCH ")]
    return "\n".join(rest[: idx[0]] + directives + rest[idx[0]:]) + "\n"


def train_directives(job: TrainJob, log_dir: Path) -> dict[str, str | None]:
    procs = job.procs_per_node or max(job.gpus_per_node, 1)
    env = {"DIT_PYTHON": job.python, "DIT_PROCS_PER_NODE": str(procs), "DIT_LOG_DIR": str(log_dir)}
    options: dict[str, str | None] = {  # (--ntasks-per-node=1, --requeue, --open-mode=append: as in the template)
        "--nodes": str(job.nodes), "--signal": f"B:USR1@{job.signal_seconds}", "--output": f"{log_dir}/%x-%j.out",
        "--export": "ALL," + ",".join(f"{k}={v}" for k, v in env.items()),
        "--gpus-per-node": str(job.gpus_per_node) if job.gpus_per_node else None,  # none on a CPU partition
    }
    if job.cpus_per_task:  # a share of each node instead of the whole node
        options.update({"--cpus-per-task": str(job.cpus_per_task), "--exclusive": None})
    for key, value in (("--time", job.time), ("--partition", job.partition), ("--job-name", job.job_name)):
        if value:
            options[key] = value
    for extra in job.sbatch_args:
        key, _, value = extra.partition("=")
        options[key] = value
    return options


def render_train(job: TrainJob) -> tuple[Path, str, list[str]]:
    """(where the filled script goes, its text, the sbatch command). Checks the config first."""
    from dit.config import load_config

    cfg = load_config(job.config, job.overrides)  # a bad key or value stops here, before anything is queued
    run_dir = Path(cfg.train.output_dir).resolve()
    script = set_directives((SLURM_DIR / "train.sbatch").read_text(), train_directives(job, run_dir / "slurm"))
    path = run_dir / "slurm" / "train.sbatch"
    command = ["sbatch", "--parsable", str(path), "--config", str(Path(job.config).resolve()), *job.overrides]
    return path, script, command


def submit(job: TrainJob, dry_run: bool = False) -> str | None:
    """Write the filled train.sbatch and submit it; returns the job id (None on a dry run, which only prints)."""
    path, script, command = render_train(job)
    if dry_run:
        print(f"# {path}\n{script}\n# command:\n{shlex.join(command)}")
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: sbatch failed ({proc.returncode}): {proc.stderr.strip()}")
    job_id = proc.stdout.strip().split(";")[0]
    print(f"submitted job {job_id}: {shlex.join(command)}\nlogs: {path.parent}/")
    return job_id
