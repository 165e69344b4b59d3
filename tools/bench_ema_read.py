"""Peak memory of reading DeepSpeed's EMA (what sampling and the EMA's validation do), under torchrun:

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 tools/bench_ema_read.py --strategy zero3

A DiT of ``--hidden`` x ``--depth`` with its EMA partitioned over the ranks; rank 0 prints JSON: the peak of the
tensor bytes allocated while the EMA model runs one forward in the strategy's sampling context (over what was live
before it), beside the bytes of the whole EMA in fp32. On CPU the peak comes from torch.profiler's memory events (as
tests/training/measure_memory.py counts them), on a GPU from torch.cuda.max_memory_allocated."""

from __future__ import annotations

import argparse
import json

import torch

from dit.config import ModelConfig, TrainConfig
from dit.distributed.parallelize import parallelize
from dit.distributed.setup import setup_distributed, teardown_distributed
from dit.models.dit import build_dit
from dit.training.ema import build_ema
from dit.training.metrics import profiled_allocations
from dit.training.optim import build_optimizer


def peak_of(fn, device: torch.device) -> int:
    """The peak of tensor bytes allocated while ``fn`` runs, over those live before it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        fn()
        return torch.cuda.max_memory_allocated() - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((total for _, total in profiled_allocations(prof)), default=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--strategy", default="zero3", choices=["zero1", "zero2", "zero3"])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--depth", type=int, default=8)
    args = ap.parse_args()
    env = setup_distributed(needs_group=True)
    cfg = TrainConfig(strategy=args.strategy, batch_size=1)
    torch.manual_seed(0)
    model = build_dit(ModelConfig(hidden_size=args.hidden, depth=args.depth, num_heads=8), in_channels=4,
                      text_dim=16)
    params = sum(p.numel() for p in model.parameters())
    block = max(sum(p.numel() for p in b.parameters()) for b in model.blocks)
    ema = build_ema(model, 0.9, partitioned=True)
    strategy = parallelize(model, env, cfg, ema=ema, make_optimizer=lambda ps: build_optimizer(ps, cfg))
    x = torch.randn(1, 4, 2, 4, 4, device=env.device)
    text, mask = torch.randn(1, 6, 16, device=env.device), torch.ones(1, 6, dtype=torch.bool, device=env.device)

    def read() -> None:
        with strategy.sampling(), torch.no_grad():
            strategy.sampled(x, torch.tensor([500], device=env.device), text=text, text_mask=mask)

    peak = peak_of(read, env.device)
    if env.is_main:
        print(json.dumps({"strategy": args.strategy, "ranks": env.world_size, "params": params,
                          "ema_fp32_bytes": 4 * params, "read_peak_bytes": peak,
                          "largest_block_fp32_bytes": 4 * block}))
    teardown_distributed()


if __name__ == "__main__":
    main()
