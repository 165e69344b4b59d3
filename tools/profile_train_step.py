"""Where a training step's time goes, by op: tools/bench_train.py's step (forward, MSE, backward, AdamW) of our DiT
or diffusers' equivalent under torch.profiler, split into GEMMs, attention kernels and everything else.

    .venv/bin/python tools/profile_train_step.py --preset DiT-S/2 --shape 17x128x128 --batch 4 --model ours \
        --threads 1 [--json OUT]

The split bounds what an eager speed-up can reach: the GEMMs and attention are the same kernels in both models.
Times are the profiler's self CPU time (it adds a little per op); compare shares, and time with bench_train.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train as bt  # noqa: E402

GEMM = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def split(events: list[Any]) -> dict[str, float]:
    """Self CPU seconds by kind: gemm, attention (any scaled-dot-product kernel, forward or backward), other."""
    out = dict(gemm=0.0, attention=0.0, other=0.0)
    for e in events:
        kind = "gemm" if e.key in GEMM else "attention" if "scaled_dot_product" in e.key else "other"
        out[kind] += e.self_cpu_time_total / 1e6
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="DiT-S/2")
    ap.add_argument("--shape", type=bt.parse_shape, default=(17, 128, 128), help="TxHxW pixels")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--model", choices=["ours", "diffusers"], default="ours")
    ap.add_argument("--steps", type=int, default=2, help="profiled steps, after --warmup steps")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--top", type=int, default=15, help="ops listed")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    defaults = bt.parse_args(["--preset", args.preset])  # latent channels, text length and width as bench_train's
    device = torch.device("cpu")
    grid = bt.clip_latent_shape(*args.shape)
    cfg = dict(bt.dit_config(args.preset, in_channels=defaults.latent_channels, text_dim=defaults.text_dim),
               attention="sdpa")
    batch = bt.synthetic_batch(args.batch, defaults.latent_channels, grid, defaults.text_len, defaults.text_dim,
                               device, 0)
    torch.manual_seed(0)
    trainer = bt.build_trainer(args.model, cfg, device, bf16=False)
    for _ in range(args.warmup):
        trainer.step(batch)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            trainer.step(batch)
    events = list(prof.key_averages())
    per_step = {k: v / args.steps for k, v in split(events).items()}
    total = sum(per_step.values())
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:args.top]
    result = dict(tool="profile_train_step", model=args.model, preset=args.preset, shape=list(args.shape),
                  batch=args.batch, threads=torch.get_num_threads(), steps=args.steps, seconds_per_step=per_step,
                  share={k: v / total for k, v in per_step.items()},
                  top=[dict(op=e.key, calls=e.count // args.steps, seconds_per_step=e.self_cpu_time_total / 1e6
                            / args.steps) for e in top])
    for row in result["top"]:
        print(f"{row['op'][:60]:<60} {row['calls']:>6} calls {row['seconds_per_step'] * 1e3:9.1f} ms/step")
    print(f"{args.model}: {total:.3f} s/step of self CPU time: "
          + ", ".join(f"{k} {per_step[k]:.3f} s ({result['share'][k]:.0%})" for k in per_step))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
