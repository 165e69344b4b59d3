"""dit/slurm.py without a SLURM: the filled train.sbatch, and the per-node launcher with real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dit.distributed.preemption import REQUEUE_EXIT_CODE
from dit.slurm import TrainJob, node_exit_code, render_train, set_directives

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "configs" / "demo.yaml")


def directives(script: str) -> list[str]:
    return [line.split(None, 1)[1] for line in script.splitlines() if line.startswith("#SBATCH ")]


def test_set_directives_replaces_adds_and_removes_in_place() -> None:
    script = "#!/bin/bash\n# about\n#SBATCH --nodes=1\n#SBATCH --exclusive\n#SBATCH --requeue\nset -e\necho hi\n"
    out = set_directives(script, {"--nodes": "4", "--exclusive": None, "--time": "1:00:00"})
    assert out == ("#!/bin/bash\n# about\n#SBATCH --nodes=4\n#SBATCH --requeue\n#SBATCH --time=1:00:00\n"
                   "set -e\necho hi\n")


def test_render_train_for_gpu_nodes(tmp_path: Path) -> None:
    job = TrainJob(config=DEMO, overrides=[f"train.output_dir={tmp_path / 'run'}", "train.steps=10"], nodes=4,
                   gpus_per_node=8, time="24:00:00", partition="gpu", sbatch_args=["--account=abc"])
    path, script, command = render_train(job)
    assert path == tmp_path / "run" / "slurm" / "train.sbatch"
    d = directives(script)
    for want in ("--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--exclusive", "--requeue",
                 "--signal=B:USR1@300", "--time=24:00:00", "--partition=gpu", "--account=abc",
                 f"--output={tmp_path / 'run' / 'slurm'}/%x-%j.out"):
        assert want in d
    assert "DIT_PROCS_PER_NODE=8" in next(x for x in d if x.startswith("--export="))
    assert command == ["sbatch", "--parsable", str(path), "--config", DEMO, *job.overrides]
    path.parent.mkdir(parents=True)
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0


def test_render_train_for_a_cpu_partition(tmp_path: Path) -> None:
    job = TrainJob(config=DEMO, overrides=[f"train.output_dir={tmp_path}"], gpus_per_node=0, procs_per_node=2,
                   cpus_per_task=2)
    d = directives(render_train(job)[1])
    assert not any(x.startswith("--gpus") for x in d) and "--exclusive" not in d
    assert "--cpus-per-task=2" in d and "DIT_PROCS_PER_NODE=2" in next(x for x in d if x.startswith("--export="))


def test_submit_checks_the_config_before_writing_anything(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "dit.cli", "slurm", "submit", "--config", DEMO,
                           f"train.output_dir={tmp_path / 'run'}", "train.stesp=3", "--dry-run"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "train.steps" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_node_exit_code() -> None:
    assert node_exit_code([42, 42]) == 42
    assert node_exit_code([42, -15]) == 42  # torchrun stopped the other process once the first exited 42
    assert node_exit_code([42, 1]) == 1  # a real failure is not a preemption
    assert node_exit_code([1, -15]) == 1 and node_exit_code([-9, -15]) == 143


WORKER = """
import os, signal, sys, time
from pathlib import Path
if sys.argv[1] == "fail":
    sys.exit(3)
if sys.argv[1] == "wait" or os.environ["RANK"] == "0":  # "first": only rank 0 leaves; torchrun stops rank 1
    signal.signal(signal.SIGUSR1, lambda *_: sys.exit(int(sys.argv[2])))
else:
    signal.signal(signal.SIGUSR1, lambda *_: None)
Path(sys.argv[3], os.environ["RANK"]).touch()
time.sleep(300)
"""


def launch(tmp_path: Path, *args: str) -> subprocess.Popen:
    (tmp_path / "worker.py").write_text(WORKER)
    cmd = [sys.executable, "-m", "dit.cli", "slurm", "launch", "--", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", "0", str(tmp_path / "worker.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("mode,code", [("wait", REQUEUE_EXIT_CODE), ("wait", 1), ("first", REQUEUE_EXIT_CODE)])
def test_launch_passes_usr1_to_the_processes_and_keeps_their_exit_code(tmp_path: Path, mode: str, code: int) -> None:
    ready = tmp_path / "ready"
    ready.mkdir()
    proc = launch(tmp_path, mode, str(code), str(ready))
    deadline = time.monotonic() + 120
    while sorted(p.name for p in ready.iterdir()) != ["0", "1"]:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)  # to the launcher only: it must survive and pass it on
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == code, out


def test_launch_returns_a_failing_process_exit_code(tmp_path: Path) -> None:
    proc = launch(tmp_path, "fail")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 3, out
