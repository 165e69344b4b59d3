"""The validation loss (data.val_shards): the training loss of the live model (and, with train.val_ema, of the EMA
model) on held-out clips, with everything random fixed, so that its curve moves only when the model does.

The first train.val_samples clips of data.val_shards (read in order, as the training data is read: size, buckets,
raw or latent shards) are drawn once, each clip with its own fixed random stream: latents, text (no prompt
dropout), noise and any image condition. Each validation then runs them at train.val_levels noise levels spread
evenly over the range the run trains (σ = (k + 1/2) / K for flow, within [sigma_min, sigma_max] for one expert of
two; the same fractions of the timesteps for diffusion), every batch at every level, without gradients, in eval mode
(no dropout), under the run's autocast. The loss is the training one (its weighting, its loss mask); the mean over
levels and clips is ``val_loss``, each level's beside it.

Every rank takes the batches ``j`` with ``j % data-parallel size == its data-parallel rank`` (a sequence-parallel
group the same ones) and runs as many as the others (a rank short of one repeats a batch with weight 0), so sharded
weights and sequence-parallel all-to-alls meet; the sums are all-reduced.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from data_pipelines.config import ConfigError
from data_pipelines.loader import build_loader
from dit.config import Config
from dit.distributed.setup import DistEnv
from dit.distributed.strategies import Strategy
from dit.training.batch import RandomStreams, draw_batch, micro_loss
from dit.training.checkpoint import prune, read_best, write_best

VAL_SEED = 1_000_003  # the validation clips' random streams: VAL_SEED + clip index
log = logging.getLogger("dit.train")


@dataclass
class Validation:
    batches: list[tuple[torch.Tensor, ...]]  # this rank's drawn batches, on the CPU (draw_batch's tuples)
    weights: list[float]  # 1, or 0 for a batch run only to keep the ranks' calls equal
    levels: list[float]  # σ in (0, 1) for flow, integer timesteps for diffusion
    clips: int  # clips in all ranks' batches together


def noise_levels(cfg: Config) -> list[float]:
    """K levels evenly over the range the run trains: σ in [sigma_min, sigma_max] for flow (one expert's range),
    the timesteps for diffusion."""
    k, d = cfg.train.val_levels, cfg.diffusion
    if d.objective == "flow":
        return [d.sigma_min + (i + 0.5) / k * (d.sigma_max - d.sigma_min) for i in range(k)]
    return [float(int((i + 0.5) / k * d.num_timesteps)) for i in range(k)]


def one_clip(batch: dict[str, Any], i: int) -> dict[str, Any]:
    """Clip ``i`` of a loader batch, as a batch of one."""
    rows = len(batch["caption"])
    return {k: (v[i:i + 1] if isinstance(v, (torch.Tensor, list)) and len(v) == rows else v)
            for k, v in batch.items()}


@torch.no_grad()
def prepare_validation(cfg: Config, env: DistEnv, vae: torch.nn.Module, text: torch.nn.Module,
                       patch: tuple[int, int, int], code: str = "",
                       image_encoder: torch.nn.Module | None = None) -> Validation | None:
    """Read the first train.val_samples clips and draw each with its own random stream (VAL_SEED + its index, so
    a clip's inputs do not depend on the batch size or the ranks), grouped as the loader batched them; every rank
    reads the same clips and keeps its share of the batches. None without data.val_shards; ConfigError when the
    shards give no clip."""
    if not cfg.data.val_shards:
        return None
    loader = build_loader(cfg.data.validation(), cfg.train.batch_size, seed=cfg.train.seed, infinite=False,
                          drop_last=False)
    groups: list[list[dict[str, Any]]] = []
    clips = 0
    for batch in loader:
        take = min(len(batch["caption"]), cfg.train.val_samples - clips)
        groups.append([one_clip(batch, i) for i in range(take)])
        clips += take
        if clips >= cfg.train.val_samples:
            break
    if not clips:
        raise ConfigError(f"data.val_shards={cfg.data.val_shards!r} gave no clip (every sample was unreadable or "
                          "too short): point it at shards like data.shards")
    diffusion = dataclasses.replace(cfg.diffusion, prompt_dropout=0.0)
    per_rank = math.ceil(len(groups) / env.dp_size)
    mine = [j for j in range(len(groups)) if j % env.dp_size == env.dp_rank]
    weights = [1.0] * len(mine) + [0.0] * (per_rank - len(mine))
    mine += [0] * (per_rank - len(mine))
    first = [sum(len(g) for g in groups[:j]) for j in range(len(groups))]  # each group's first clip index
    drawn = []
    for j in mine:
        each = [draw_batch(clip, vae, text, diffusion, patch, RandomStreams(VAL_SEED + first[j] + i), env.device,
                           None, cfg.model, code, image_encoder) for i, clip in enumerate(groups[j])]
        drawn.append(tuple(torch.cat(parts).cpu() for parts in zip(*each)))
    return Validation(drawn, weights, noise_levels(cfg), clips)


@torch.no_grad()
def run_validation(val: Validation, strategy: Strategy, noise_schedule: Any, cfg: Config,
                   env: DistEnv, ema: bool = False) -> tuple[float, list[float]]:
    """The mean validation loss and each level's (every rank calls it: the sums are all-reduced). ``cfg``: the
    run's, with train.grad_accum_steps=1 (each batch whole: ``Validator`` makes it once). ``ema``: of the EMA model
    (the plain copy, or FSDP's shards of it), in the strategy's sampling context (ZeRO-3 gathers a LoRA run's
    shared base there), under the same autocast."""
    sums = torch.zeros(len(val.levels) + 1, dtype=torch.float64)
    model = strategy.sampled if ema else strategy.model
    was_training = model.training
    model.eval()
    try:
        with strategy.sampling() if ema else nullcontext():
            for drawn, weight in zip(val.batches, val.weights):
                drawn = tuple(x.to(env.device) for x in drawn)
                rows = drawn[0].shape[0]
                for k, level in enumerate(val.levels):
                    t = torch.full((rows,), level, dtype=drawn[3].dtype, device=env.device)
                    with strategy.autocast():
                        loss = micro_loss(strategy, (*drawn[:3], t, *drawn[4:]), noise_schedule, cfg, model)(0)
                    sums[k] += weight * rows * float(loss)
                sums[-1] += weight * rows
    finally:
        model.train(was_training)
    if dist.is_available() and dist.is_initialized():
        sums = sums.to(env.device)
        dist.all_reduce(sums)  # (a sequence-parallel group counts its clips once per rank: the ratio holds)
        sums = sums.cpu()
    per_level = (sums[:-1] / sums[-1]).tolist()
    return sum(per_level) / len(per_level), per_level


class Validator:
    """When the loop validates (step 0 of a fresh run, every train.val_every steps, 0: each checkpoint, and the
    last step) and, with train.keep_best, which checkpoint it keeps: the one of the lowest validation loss (the EMA's
    with train.val_ema: the weights the checkpoint exports), named in RUN/best.json (``checkpointed`` records it
    after each save, rank 0 prunes the former one)."""

    def __init__(self, val: Validation | None, cfg: Config, env: DistEnv, out: Path, start_step: int,
                 write: Callable[..., None]) -> None:
        self.val, self.cfg, self.env, self.out, self.write = val, cfg, env, out, write
        t = cfg.train
        self.every, self.start = t.val_every or t.checkpoint_every, start_step
        self.ema = t.val_ema and t.ema  # (train.ema=false: the live weights are the exported ones)
        self.ranked = "ema" if self.ema else "live"  # which loss keep_best ranks by
        self.best = read_best(out, start_step, self.ranked) if t.keep_best else None
        self.last: tuple[int, float] | None = None
        # (the loss of a whole batch: a bucket's batch can hold more than train.batch_size rows)
        self.loss_cfg = dataclasses.replace(cfg, train=dataclasses.replace(t, grad_accum_steps=1)) if val else cfg

    def due(self, step: int) -> bool:
        if self.val is None:
            return False
        return step == 0 if step == self.start else step % self.every == 0 or step == self.cfg.train.steps

    def run(self, step: int, strategy: Strategy, noise_schedule: Any) -> None:
        loss, per_level = run_validation(self.val, strategy, noise_schedule, self.loss_cfg, self.env)
        ema = (run_validation(self.val, strategy, noise_schedule, self.loss_cfg, self.env, ema=True)
               if self.ema else None)
        self.last = (step, ema[0] if ema else loss)
        self.write(step, loss, per_level, self.val.levels, ema)
        if self.env.is_main:
            log.info("step %d: validation loss %.5f%s (%d clips x %d noise levels)", step, loss,
                     f", EMA {ema[0]:.5f}" if ema else "", self.val.clips, len(self.val.levels))

    def kept(self) -> tuple[int, ...]:
        """The checkpoint steps pruning spares: the best so far."""
        return (self.best["step"],) if self.best else ()

    def checkpointed(self, step: int) -> None:
        """After checkpoint ``step``: it becomes the best when its validation loss is the lowest."""
        if not self.cfg.train.keep_best or self.last is None or self.last[0] != step:
            return
        if self.best is not None and self.last[1] >= self.best["val_loss"]:
            return
        if self.env.is_main:
            self.best = write_best(self.out, step, self.last[1], self.ranked)
            prune(self.out, self.cfg.train.keep_last, (step,))  # (the former best, spared by that save, goes now)
        else:
            self.best = {"step": step, "val_loss": self.last[1]}
