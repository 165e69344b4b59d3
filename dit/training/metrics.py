"""Training throughput: samples/s, tokens/s, achieved FLOP/s and MFU from the analytic count, peak memory per
rank, and the fraction of step time spent waiting for data.

FLOPs per trained token = 3 x the forward count of ``dit.models.dit.flops_per_token`` (backward ~ 2 x forward);
activation checkpointing recomputes the forward, which is not counted (MFU counts useful work, as in PaLM).
"""

from __future__ import annotations

import os
import resource
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

# Dense bf16 tensor-core peaks (FLOP/s) of common training GPUs, matched against the CUDA device name.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12,
                   "L4": 121e12, "4090": 165e12, "V100": 125e12}


def peak_flops(device: torch.device) -> float | None:
    """The device's peak FLOP/s for MFU: DIT_PEAK_FLOPS if set, a known GPU's bf16 peak, else None (CPU)."""
    if os.environ.get("DIT_PEAK_FLOPS"):
        return float(os.environ["DIT_PEAK_FLOPS"])
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in PEAK_BF16_FLOPS.items():
            if key in name:
                return flops
    return None


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this rank: allocated CUDA memory on a GPU, else the process's peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux


def profiled_events(prof: Any) -> list[Any]:
    """Every event of a torch.profiler run, the nested ones too."""
    out, todo = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while todo:
        node = todo.pop()
        out.append(node)
        todo.extend(node.children)
    return out


def profiled_allocations(prof: Any) -> list[tuple[int, int]]:
    """(start ns, the allocator's running total of tensor bytes since the profiler started) at each allocation of a
    ``torch.profiler.profile(profile_memory=True)`` run, in time order: on CPU, what torch.cuda.max_memory_allocated
    counts on a GPU."""
    from torch._C._profiler import _EventType

    return sorted((n.start_time_ns, n.extra_fields.total_allocated) for n in profiled_events(prof)
                  if n.tag == _EventType.Allocation)


class Throughput:
    """Accumulates samples and time between log steps; ``report()`` gives the rates since the last report.

    Counts are per rank; multiply by the world size for the job's totals (every rank does the same work)."""

    def __init__(self, device: torch.device, world_size: int = 1) -> None:
        self.device, self.world_size, self.peak = device, world_size, peak_flops(device)
        self.reset()

    def reset(self) -> None:
        self.t0, self.samples, self.tokens, self.flops, self.data_s = time.perf_counter(), 0, 0, 0.0, 0.0

    def add(self, samples: float, tokens_per_sample: int, flops_per_token: float, data_s: float) -> None:
        """One step on this rank: ``flops_per_token`` is the trained (forward + backward) count; ``samples`` is a
        fraction of the batch under sequence parallelism (each rank of a group does its share of every clip)."""
        self.samples += samples
        self.tokens += samples * tokens_per_sample
        self.flops += samples * tokens_per_sample * flops_per_token
        self.data_s += data_s

    def report(self) -> dict[str, Any]:
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        flops_per_s = self.flops / elapsed  # per rank
        out = {
            "samples_per_s": self.samples * self.world_size / elapsed,
            "tokens_per_s": self.tokens * self.world_size / elapsed,
            "tflops_per_s_per_rank": flops_per_s / 1e12,
            "mfu": flops_per_s / self.peak if self.peak else None,
            "data_wait_fraction": min(1.0, self.data_s / elapsed),
            "peak_memory_gb": peak_memory_bytes(self.device) / 2**30,
        }
        self.reset()
        return out


def saved_tensor_bytes(fn: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()) -> tuple[Any, int]:
    """``fn()`` and the bytes of the tensors autograd saves for backward while it runs (each storage once, those of
    ``exclude``, e.g. the parameters, left out): the activation memory, whatever the allocator and the machine."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip and t.device.type != "meta":
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())
