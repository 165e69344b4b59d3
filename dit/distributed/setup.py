"""Processes, ranks and devices in one place: read what the launcher (torchrun, accelerate launch, SLURM via
`dit slurm launch`) set, start the process group (NCCL on GPUs, gloo on CPU), and give the rest of the code a
``DistEnv``. Nothing else reads RANK / WORLD_SIZE from the environment: the loader is told its data-parallel rank
and size by the training loop."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed(needs_group: bool = False) -> DistEnv:
    """The process group of this job (idempotent). ``needs_group``: start one even for a single process without a
    launcher (DeepSpeed and FSDP need one); a plain 1-process run gets none."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
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
    return DistEnv(rank, world, local_rank, device)


def teardown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
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
