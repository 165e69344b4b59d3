"""What a training run writes for people to read: RUN/metrics.jsonl and RUN/val.jsonl with the same curves in
TensorBoard (``RunLog``, rank 0), and the clips it samples as it trains (``log_samples``, every rank its share)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.tensorboard import SummaryWriter

from dit.config import Config
from dit.distributed.setup import DistEnv
from dit.experts import expert_on, one_expert
from dit.pipeline import Pipeline, generate, read_image, to_uint8


class RunLog:
    """Rank 0's metrics: one JSON line per logged step in RUN/metrics.jsonl and the same numbers in TensorBoard."""

    def __init__(self, out: Path, start_step: int, enabled: bool) -> None:
        self.path, self.val_path = out / "metrics.jsonl", out / "val.jsonl"
        self.writer = SummaryWriter(str(out / "tensorboard")) if enabled else None
        for path in (self.path, self.val_path):
            if enabled and path.is_file():  # drop lines after the checkpoint we resume from (or cut by a kill)
                lines = [line for line in path.read_text().splitlines() if self._step(line) <= start_step]
                path.write_text("".join(line + "\n" for line in lines))

    @staticmethod
    def _step(line: str) -> float:
        try:
            return json.loads(line)["step"]
        except (ValueError, KeyError):
            return math.inf  # a line cut off by a kill

    def write(self, record: dict[str, Any]) -> None:
        if self.writer is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        step = record["step"]
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != "step":
                section = "train" if key in ("loss", "lr", "grad_norm", "nonfinite_skipped") else "perf"
                self.writer.add_scalar(f"{section}/{key}", value, step)
        self.writer.add_scalar("perf/peak_memory_gb_max_rank", max(record["peak_memory_gb_per_rank"]), step)
        for reason, n in record["bad"].items():
            self.writer.add_scalar(f"data/bad_{reason}", n, step)

    def write_val(self, step: int, loss: float, per_level: list[float], levels: list[float],
                  ema: tuple[float, list[float]] | None = None) -> None:
        """A validation loss (dit/training/validation.py), and the EMA's: one line of RUN/val.jsonl, val/ in
        TensorBoard."""
        if self.writer is None:
            return
        record: dict[str, Any] = {"step": step}
        for suffix, mean, values in [("", loss, per_level)] + ([("_ema", *ema)] if ema else []):
            by_level = {f"{level:g}": value for level, value in zip(levels, values)}
            record.update({f"val_loss{suffix}": mean, f"by_level{suffix}": by_level})
            self.writer.add_scalar(f"val/loss{suffix}", mean, step)
            for level, value in by_level.items():
                self.writer.add_scalar(f"val/loss{suffix}_at_{level}", value, step)
        with open(self.val_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def log_samples(writer: SummaryWriter | None, pipe: Pipeline, cfg: Config, step: int, env: DistEnv,
                dtype: str = "fp32", around: Callable[[], AbstractContextManager] = nullcontext) -> None:
    """Sample the configured prompts with the EMA model (the live one with train.ema=false), each rank its share,
    and log each clip (on rank 0) as a strip of frames. Every rank makes the same number of model calls, so sharded
    (FSDP) weights can gather; in a sequence-parallel run the model splits each clip over its group, so a group
    samples its prompts together. ``dtype``: bf16 in a bf16 run (the denoiser under autocast: less activation memory
    at the sampling step); ``around``: the context the sampling runs in (the strategy's: ZeRO-3 gathers a LoRA run's
    shared base)."""
    prompts, images = cfg.train.sample_prompts[:4], cfg.train.sample_images[:4]
    alone = one_expert(cfg.diffusion) and pipe.experts is None
    if (not prompts or alone or (getattr(pipe.model, "code_condition", False) and not images)
            or getattr(pipe.model, "last_frame", False)):
        return  # (one expert of two cannot sample alone; Wan's code form samples from an image only; FLF2V from two)
    together = env.sequence_parallel > 1  # (the sampled model splits each clip over the group)
    ranks, rank = (env.dp_size, env.dp_rank) if together else (env.world_size, env.rank)
    share = math.ceil(len(prompts) / ranks)
    mine = list(range(rank * share, min(len(prompts), (rank + 1) * share)))
    d = cfg.data
    # train.sample_images: each prompt's first frame, at the training size
    first = torch.cat([read_image(images[i], d.height, d.width) for i in mine or [0]]) if images else None
    with around(), expert_on(pipe.experts, env.device):  # (train.sample_expert: the other expert of a pair)
        video = generate(pipe, [prompts[i] for i in mine or [0]], frames=d.frames, height=d.height, width=d.width,
                         steps=min(cfg.sample.steps, 25), sampler=cfg.sample.sampler, cfg=cfg.sample.cfg,
                         shift=cfg.sample.shift, seed=0, dtype=dtype, image=first, guidance=cfg.sample.guidance,
                         dynamic_cfg=cfg.sample.dynamic_cfg, cfg_low=cfg.sample.cfg_low if pipe.experts else None)
    clips = list(zip(mine, to_uint8(video)[:len(mine)]))
    if env.world_size > 1:
        everyone: list[Any] = [None] * env.world_size
        dist.all_gather_object(everyone, clips)
        clips = sorted(dict(c for part in everyone for c in part).items())  # (a group's clips once)
    if writer is None:
        return
    for i, clip in clips:  # clip: [T, H, W, 3]
        clip = torch.as_tensor(clip)
        strip = clip.permute(3, 1, 0, 2).reshape(3, clip.shape[1], -1)  # [3, H, T*W]
        writer.add_image(f"samples/{i}", strip, step)
        writer.add_text(f"samples/{i}/prompt", prompts[i], step)
