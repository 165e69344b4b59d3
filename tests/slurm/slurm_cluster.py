"""A real SLURM on localhost for the system tests: munged, slurmctld and slurmd from Debian's slurm-wlm.

One node named after this host, or several node names on this host (one slurmd each, ``slurmd -N NAME``), which
is how a multi-node job is tried on one machine.

Everything the daemons write (key, sockets, pid files, logs, state, spool) lives in one temporary directory that
`stop()` removes; the daemons are stopped by the pids this process started. Clients find the cluster through
``SLURM_CONF`` (``LocalSlurm.env``).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

# A requeued job waits this long before it starts again (SLURM's default: 120 s), until the credential the
# first run's revocation left behind expires; scontrol update StartTime=now cannot skip that safely.
CRED_EXPIRE = 10

PACKAGES = ["munge", "slurmctld", "slurmd", "slurm-client"]
COMMANDS = ["munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "srun"]


def missing_commands() -> list[str]:
    return [c for c in COMMANDS if shutil.which(c) is None and not Path("/usr/sbin", c).exists()]


def install_packages() -> str | None:
    """apt-get install the daemons and clients when missing; returns why they cannot be had, or None."""
    if not missing_commands():
        return None
    if os.geteuid() != 0:
        return f"not root: cannot apt-get install {' '.join(PACKAGES)}"
    if shutil.which("apt-get") is None:
        return f"no apt-get to install {' '.join(PACKAGES)}"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "-o", "DPkg::Lock::Timeout=300", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:  # stale lists: update once, retry
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=True)
        subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    still = missing_commands()
    assert not still, f"apt-get installed {PACKAGES} but {still} are still missing"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sbin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class LocalSlurm:
    """``nodes`` CPU nodes of ``cpus`` CPUs each, in one partition; start() and stop() own every daemon.

    One node is this host under its own name; with several, they are HOST-1, HOST-2, ... (all at 127.0.0.1, which
    a job must use as the main address: those names do not resolve)."""

    def __init__(self, cpus: int = 2, nodes: int = 1) -> None:
        self.cpus = cpus
        self.root = Path(tempfile.mkdtemp(prefix="dit-slurm-"))  # short: a unix socket path must be < 108 chars
        self.conf = self.root / "slurm.conf"
        self._procs: dict[str, subprocess.Popen] = {}
        host = socket.gethostname()
        self.nodes = [host] if nodes == 1 else [f"{host}-{i}" for i in range(1, nodes + 1)]
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    def _write_conf(self) -> None:
        r = self.root
        for d in ("state", "spool", "munge"):
            (r / d).mkdir(mode=0o700)
        host = socket.gethostname()
        node_lines = "\n".join(f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={free_port()} "
                               f"CPUs={self.cpus} State=UNKNOWN" for n in self.nodes)
        self.conf.write_text(f"""\
ClusterName=dittest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={r}/munge/munge.socket.2,cred_expire={CRED_EXPIRE}
CredType=cred/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
InactiveLimit=0
KillWait=30
MinJobAge=600
{node_lines}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def _spawn(self, name: str, cmd: list[str]) -> None:
        with open(self.root / f"{name}.out", "w") as log:  # the daemon keeps its own copy of the descriptor
            self._procs[name] = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                                 start_new_session=True)

    def start(self, timeout: float = 60.0) -> None:
        self._write_conf()
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        m = self.root / "munge"
        self._spawn("munged", [sbin("munged"), "--foreground", "--force", f"--socket={m}/munge.socket.2",
                               f"--key-file={key}", f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log",
                               f"--seed-file={m}/munged.seed"])
        self._wait(lambda: (m / "munge.socket.2").exists(), timeout, "munged to open its socket")
        self._spawn("slurmctld", [sbin("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._wait(lambda: self.run("scontrol", "ping", check=False).stdout.count("UP") >= 1, timeout,
                   "slurmctld to answer scontrol ping")
        for node in self.nodes:
            (self.root / "spool" / node).mkdir(mode=0o700)
            self._spawn(f"slurmd-{node}", [sbin("slurmd"), "-D", "-N", node, "-f", str(self.conf)])
        self._wait(lambda: len(re.findall(r"State=(?:IDLE|MIXED|ALLOCATED)\b",
                                          self.run("scontrol", "-o", "show", "node", check=False).stdout))
                   == len(self.nodes), timeout, f"nodes {self.nodes} to become IDLE")

    def _wait(self, ok, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited ({proc.returncode}) while waiting for {what}:\n{self.logs()}")
            if ok():
                return
            time.sleep(0.5)
        raise TimeoutError(f"timed out waiting for {what}:\n{self.logs()}")

    def logs(self) -> str:
        parts = []
        for p in [self.root / "munged.out", self.root / "slurmctld.out", self.root / "slurmctld.log",
                  *sorted(self.root.glob("slurmd-*"))]:
            if p.is_file():
                parts.append(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-30:]))
        return "\n".join(parts)

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict of its Key=Value fields ({} once the job is forgotten)."""
        out = self.run("scontrol", "-o", "show", "job", job_id, check=False).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out.splitlines()[0])) if out.strip() else {}

    def wait_state(self, job_id: str, states: set[str], timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(1)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout}s: {info}\n{self.logs()}")

    def stop(self) -> None:
        """Cancel every job, SIGTERM each daemon this object started (by pid), SIGKILL what is left, remove
        every file."""
        procs = self._procs
        if "slurmctld" in procs and procs["slurmctld"].poll() is None:
            jobs = self.run("squeue", "-h", "-o", "%A", check=False).stdout.split()
            if jobs:
                self.run("scancel", *jobs, check=False)
                deadline = time.monotonic() + 60
                while self.run("squeue", "-h", check=False).stdout.strip() and time.monotonic() < deadline:
                    time.sleep(1)
        for name in [*(f"slurmd-{n}" for n in self.nodes), "slurmctld", "munged"]:
            proc = procs.get(name)
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)
