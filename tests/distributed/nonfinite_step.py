"""Run under torchrun (or alone): with one strategy, ``train_step`` a clean step, then a step whose loss is finite
but whose gradients are not (rank 0's patch-embedding output gets an inf gradient in its first micro-batch), then a
clean step. Rank 0 writes what it saw to the JSON file given; tests/distributed/test_nonfinite.py asserts on it.

The same three steps without the poisoned one are the reference: a skipped step must leave no trace, so both end
with bitwise the same weights, EMA and optimizer state."""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch
import torch.distributed as dist

from dit.config import ModelConfig, TrainConfig
from dit.diffusion.objectives import training_loss
from dit.diffusion.schedules import make_schedule
from dit.distributed.parallelize import parallelize
from dit.distributed.setup import DistEnv, setup_distributed, teardown_distributed
from dit.models.dit import build_dit
from dit.training.ema import build_ema
from dit.training.optim import build_optimizer
from dit.training.step import train_step

POISON = {"on": False}


class InfGradient(torch.autograd.Function):
    """Identity forward; an inf gradient backward (while POISON is on)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("inf") if POISON["on"] else grad


def batches(rank: int, micro: int) -> list[tuple[torch.Tensor, ...]]:
    """Three steps of this rank's data: latents, text, mask, timesteps, noise for ``micro`` micro-batches of 2."""
    gen = torch.Generator().manual_seed(100 + rank)
    n = 2 * micro
    return [(torch.randn(n, 4, 2, 4, 4, generator=gen), torch.randn(n, 6, 16, generator=gen),
             torch.ones(n, 6, dtype=torch.bool), torch.randint(0, 1000, (n,), generator=gen),
             torch.randn(n, 4, 2, 4, 4, generator=gen)) for _ in range(3)]


def snapshot(strategy: Any) -> dict[str, list[torch.Tensor]]:
    """Gathered weights and EMA; this rank's optimizer parameters (ZeRO: its fp32 partitions) and state."""
    local = lambda x: (x.to_local() if hasattr(x, "to_local") else x).detach().clone()  # FSDP2: the shard
    opt = strategy.optimizer
    return {"model": [v.clone() for v in strategy.model_state_dict().values()],
            "ema": [v.clone() for v in strategy.ema_state_dict().values()],
            "optimizer": [local(p) for g in opt.param_groups for p in g["params"]]
            + [local(v) for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]}


def same(a: dict[str, list[torch.Tensor]], b: dict[str, list[torch.Tensor]]) -> dict[str, bool]:
    return {k: len(a[k]) == len(b[k]) and all(torch.equal(x, y) for x, y in zip(a[k], b[k])) for k in a}


def everywhere(flags: dict[str, bool], device: torch.device) -> dict[str, bool]:
    """A flag is True when it is True on every rank (each checked its own optimizer shard)."""
    if not dist.is_initialized():
        return flags
    t = torch.tensor([float(v) for v in flags.values()], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return {k: bool(v) for k, v in zip(flags, t.tolist())}


def run(env: DistEnv, cfg: TrainConfig, poisoned: bool) -> tuple[list[dict[str, Any]], Any]:
    torch.manual_seed(0)
    model = build_dit(ModelConfig(hidden_size=32, depth=2, num_heads=2), in_channels=4, text_dim=16)
    model.x_embed.register_forward_hook(lambda m, args, out: InfGradient.apply(out))
    strategy = parallelize(model, env, cfg, ema=build_ema(model, cfg.ema_decay),
                           make_optimizer=lambda params: build_optimizer(params, cfg))
    schedule = make_schedule("linear", 1000).to(env.device)
    accum, reports, snaps = cfg.grad_accum_steps, [], {}
    for step, data in enumerate(batches(env.rank, accum), start=1):
        if step == 2 and not poisoned:
            continue

        def micro_loss(i: int, step: int = step, data: tuple[torch.Tensor, ...] = data) -> torch.Tensor:
            POISON["on"] = step == 2 and i == 0 and env.rank == 0
            x, text, mask, t, noise = (d[2 * i:2 * i + 2].to(env.device) for d in data)
            return training_loss(strategy.model, x, schedule, model_kwargs=dict(text=text, text_mask=mask), t=t,
                                 noise=noise)

        snaps[step - 1] = snapshot(strategy)
        result = train_step(strategy, micro_loss, accum)
        if result.applied:
            strategy.update_ema(step)
        reports.append({"step": step, "loss": float(result.loss), "grad_norm": result.grad_norm,
                        "applied": result.applied})
        snaps[step] = snapshot(strategy)
    POISON["on"] = False
    return reports, snaps


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--strategy", required=True)
    p.add_argument("--accum", type=int, default=2)
    p.add_argument("--offload", action="store_true", help="ZeRO: optimizer states on the CPU")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    cfg = TrainConfig(strategy=args.strategy, grad_accum_steps=args.accum, batch_size=2, lr=1e-3,
                      warmup_steps=0, ema_decay=0.9, offload_optimizer=args.offload)
    env = setup_distributed(needs_group=args.strategy != "ddp")
    reports, snaps = run(env, cfg, poisoned=True)
    reference, ref_snaps = run(env, cfg, poisoned=False)
    result = {"reports": reports, "reference": reference, "world_size": env.world_size,
              "skipped_changed_nothing": everywhere(same(snaps[1], snaps[2]), env.device),
              "clean_step_changed_weights": not same(snaps[0], snaps[1])["model"],
              "ends_as_reference": everywhere(same(snaps[3], ref_snaps[3]), env.device)}
    if env.is_main:
        with open(args.out, "w") as f:
            json.dump(result, f)
    teardown_distributed()


if __name__ == "__main__":
    main()
