"""A read-only state dict held once per node in host memory, not once per process: the node's first process builds
it and writes it to a node-local file (/dev/shm where it has room, else the temporary directory), every process of
the node maps that file (``torch.load(mmap=True)``: the page cache's pages, shared), then the file is unlinked (the
mappings keep it until they close, so a killed run leaves nothing behind after this point). For the other expert a
Wan 2.2 A14B run samples with (``train.sample_expert``): 28.6 GB in bf16, once per node instead of once per GPU."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
import tempfile
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from dit.distributed.setup import DistEnv

log = logging.getLogger(__name__)

SHM = Path("/dev/shm")


def node_dir(nbytes: int) -> Path:
    """Where a node-local file of ``nbytes`` goes: /dev/shm (memory) with 10% to spare, else the temporary
    directory (disk: its pages are shared through the page cache all the same)."""
    if SHM.is_dir() and os.access(SHM, os.W_OK) and shutil.disk_usage(SHM).free > 1.1 * nbytes:
        return SHM
    return Path(tempfile.gettempdir())


def node_shared_state(build: Callable[[], dict[str, torch.Tensor]], env: DistEnv,
                      name: str) -> dict[str, torch.Tensor]:
    """``build()``'s state dict, called by one process per node (local rank 0) and mapped by every process of the
    node; all ranks call this. One process, or a node-local file that cannot be written (no room): each process
    builds its own, as without this, and the log says why."""
    if env.world_size == 1:
        return build()
    # the others wait while a node's first process loads and writes: on a gloo group of its own, with an hour to
    # spare, not under NCCL's default 10 minutes (a 14B expert from a slow file system takes minutes)
    group = dist.new_group(backend="gloo", timeout=timedelta(hours=1))
    try:
        return _shared(build, env, name, group)
    finally:
        dist.destroy_process_group(group)


def _shared(build: Callable[[], dict[str, torch.Tensor]], env: DistEnv, name: str,
            group: object) -> dict[str, torch.Tensor]:
    # a name no other run and no other node can pick (a shared temporary directory would otherwise mix nodes)
    token = [f"dit-{name}-{os.getpid()}-{secrets.token_hex(4)}"]  # (not torch's RNG: the run's draws stay)
    dist.broadcast_object_list(token, src=0, group=group)
    path, error = None, None
    if env.local_rank == 0:
        state = build()
        nbytes = sum(v.numel() * v.element_size() for v in state.values())
        path = node_dir(nbytes) / f"{token[0]}-{socket.gethostname()}.pt"
        try:
            torch.save(state, path)
        except (OSError, RuntimeError) as e:  # (no room: torch.save raises RuntimeError from its writer)
            error = f"{path}: {e}"
            path.unlink(missing_ok=True)
        del state
    everyone: list[tuple] = [()] * env.world_size
    dist.all_gather_object(everyone, (socket.gethostname(), env.local_rank, str(path) if path else None, error),
                           group=group)
    # each process maps its node's first process's file (launchers number a node's processes consecutively)
    firsts = [everyone[r - local] for r, (_, local, _, _) in enumerate(everyone)]
    why = next((e for *_, e in everyone if e), None)
    for r, ((host, *_), (first_host, _, first_path, _)) in enumerate(zip(everyone, firsts)):
        if not why and (first_host != host or first_path is None):
            why = f"rank {r} runs on {host}, its node's first process on {first_host}"
    if why:  # (the same on every rank: they all fall back together)
        if env.is_main:
            log.warning("%s: each process holds its own copy (no node-local file to share: %s)", name, why)
        if path is not None:
            path.unlink(missing_ok=True)
        return build()
    mine = firsts[env.rank][2]
    state = torch.load(mine, mmap=True, weights_only=True, map_location="cpu")
    dist.barrier(group=group)  # every process of the node has mapped it
    if env.local_rank == 0:
        Path(mine).unlink(missing_ok=True)
    return state
