"""Processes, ranks and devices in one place: read what the launcher (torchrun, accelerate launch, SLURM via
`dit slurm launch`) set, start the process group (NCCL on GPUs, gloo on CPU), and give the rest of the code a
``DistEnv``. Nothing else reads RANK / WORLD_SIZE from the environment: the loader is told its data-parallel rank
and size by the training loop.

Groups: with train.sequence_parallel=SP, consecutive ranks form sequence-parallel groups of SP (ranks 0..SP-1, ...;
within a node on GPUs, where all-to-all is fast); the world is DP x SP, and rank // SP is the data-parallel rank."""

from __future__ import annotations

import gc
import os
import socket
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from dit.config import ConfigError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    sequence_parallel: int = 1  # ranks per sequence-parallel group (consecutive ranks share each clip's tokens)
    sp_group: Any = field(default=None, compare=False, repr=False)  # this rank's group (None when 1)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        """This rank's data-parallel rank: the ranks of one sequence-parallel group read the same samples."""
        return self.rank // self.sequence_parallel

    @property
    def dp_size(self) -> int:
        return self.world_size // self.sequence_parallel

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_sequence_parallel(sequence_parallel: int, world: int) -> None:
    """train.sequence_parallel must divide the job's processes (it is checked here: only the launcher knows them)."""
    if sequence_parallel > 1 and world % sequence_parallel:
        fit = [n for n in range(1, world + 1) if world % n == 0]
        raise ConfigError(f"train.sequence_parallel={sequence_parallel} does not divide the {world} processes of "
                          f"this job: launch a multiple of {sequence_parallel} processes (torchrun --nproc-per-node "
                          f"{sequence_parallel}) or set train.sequence_parallel to one of {fit}")


def setup_distributed(needs_group: bool = False, sequence_parallel: int = 1) -> DistEnv:
    """The process group of this job (idempotent). ``needs_group``: start one even for a single process without a
    launcher (DeepSpeed and FSDP need one); a plain 1-process run gets none. ``sequence_parallel`` > 1: also the
    sequence-parallel groups (consecutive ranks), after checking that it divides the world size."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    check_sequence_parallel(sequence_parallel, world)
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if (world > 1 or needs_group) and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:  # no launcher: a 1-process group on this host, described as a launcher
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", LOCAL_RANK="0",
                              WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")  # would (DeepSpeed reads LOCAL_RANK itself)
        dist.init_process_group("nccl" if cuda else "gloo", init_method="env://", rank=rank, world_size=world,
                                device_id=device if cuda else None)
    if sequence_parallel == 1:
        return DistEnv(rank, world, local_rank, device)
    group, _ = dist.new_subgroups(group_size=sequence_parallel)  # every rank makes every group; keeps its own
    return DistEnv(rank, world, local_rank, device, sequence_parallel, group)


def teardown_distributed() -> None:
    """Free what still holds the group (DDP reducers and hooks kept alive by reference cycles), then destroy it: a
    gloo group, or a reducer, torn down during interpreter shutdown aborts the process (SIGABRT, 'terminate called
    without an active exception') after a finished run. Call it on success only: a rank that failed mid-step
    would wait here for peers that never come."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is True on any (a collective)."""
    if not _initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def mean_over_ranks(values: list[float], device: torch.device) -> list[float]:
    if not _initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def gather_floats(value: float, device: torch.device) -> list[float]:
    """Every rank's ``value``, in rank order (a collective)."""
    if not _initialized():
        return [value]
    out = [torch.zeros(1, dtype=torch.float64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(out, torch.tensor([value], dtype=torch.float64, device=device))
    return [float(x.item()) for x in out]
