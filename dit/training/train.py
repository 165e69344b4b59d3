"""`dit train`: the DiT training loop, one function that reads top to bottom (helpers above it).

shards -> pixel clips -> frozen VAE -> latents; captions -> frozen text encoder (prompt dropout for CFG);
training_loss(model, latents, ...) -> AdamW with warmup and clipping -> EMA -> logs, checkpoints, samples.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from timm.utils import ModelEmaV3
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from data_pipelines.loader import build_loader
from dit.config import Config, save_config
from dit.diffusion.objectives import training_loss
from dit.distributed.parallelize import parallelize, unwrap_state_dict
from dit.distributed.preemption import Preempted, PreemptionHandler
from dit.models.dit import build_dit, flops_per_token
from dit.models.text import build_text_encoder
from dit.models.vae import load_vae
from dit.sample import Pipeline, generate, schedule_from_config, to_uint8
from dit.training.checkpoint import (
    list_checkpoints,
    load_training_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)

log = logging.getLogger("dit.train")


def mixed_precision(setting: str) -> str:
    """'auto' -> bf16 where the device supports it (CUDA with bf16), else full fp32."""
    if setting == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    if setting == "fp16":
        log.warning("fp16 training uses dynamic loss scaling; prefer bf16 where the hardware has it")
    return setting


def lr_lambda(warmup: int, total: int, schedule: str = "constant", floor: float = 0.05) -> Any:
    """LR multiplier per step: linear warmup over `warmup` steps, then constant or cosine down to `floor`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def drop_prompts(captions: list[str], p: float, rng: random.Random) -> list[str]:
    """Replace each caption by the empty (unconditional) prompt with probability p, for classifier-free guidance."""
    return ["" if rng.random() < p else c for c in captions]


@torch.no_grad()
def encode_latents(vae: torch.nn.Module, video: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Pixels [B, 3, T, H, W] -> normalised latents [B, C, t, h, w] (a posterior sample)."""
    return vae.normalize(vae.encode(video).sample(generator=generator))


def checkpoint_config(cfg: Config, model: torch.nn.Module) -> dict[str, Any]:
    return {"dit": model.config, "experiment": cfg.to_dict()}


def log_samples(writer: SummaryWriter, pipe: Pipeline, cfg: Config, step: int) -> None:
    """Sample the configured prompts with the EMA model and log each clip as a strip of frames."""
    prompts = cfg.train.sample_prompts[:4]
    if not prompts:
        return
    video = generate(pipe, prompts, frames=cfg.data.frames, height=cfg.data.height, width=cfg.data.width,
                     steps=min(cfg.sample.steps, 25), sampler=cfg.sample.sampler, cfg=cfg.sample.cfg, seed=0)
    for i, clip in enumerate(to_uint8(video)):  # clip: [T, H, W, 3]
        strip = torch.from_numpy(clip).permute(3, 1, 0, 2).reshape(3, clip.shape[1], -1)  # [3, H, T*W]
        writer.add_image(f"samples/{i}", strip, step)
        writer.add_text(f"samples/{i}/prompt", prompts[i], step)


def main(cfg: Config) -> Path:
    """Train a DiT as the config says; returns the newest checkpoint directory."""
    out = Path(cfg.train.output_dir)
    if not cfg.vae.checkpoint:
        raise ValueError("vae.checkpoint is not set: train a VAE first (`dit train-vae --config ...`) and pass "
                         "vae.checkpoint=RUN_DIR/vae")
    if not cfg.data.shards:
        raise ValueError("data.shards is not set: pass data.shards='data/{00000..00003}.tar' (or a directory)")
    loader = build_loader(cfg.data, cfg.train.batch_size, seed=cfg.train.seed)  # fails now on a missing shard
    accelerator = Accelerator(mixed_precision=mixed_precision(cfg.train.mixed_precision))
    set_seed(cfg.train.seed)
    device = accelerator.device
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")

    vae = load_vae(cfg.vae.checkpoint).to(device).eval().requires_grad_(False)
    text = build_text_encoder(cfg.text).to(device)
    model = build_dit(cfg.model, in_channels=vae.latent_channels, text_dim=text.dim)
    ema = ModelEmaV3(model, decay=cfg.train.ema_decay, use_warmup=True)
    model = parallelize(model, gradient_checkpointing=cfg.model.gradient_checkpointing)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.train.warmup_steps, cfg.train.steps,
                                                               cfg.train.lr_schedule))
    model, opt = accelerator.prepare(model, opt)
    schedule = schedule_from_config(cfg.diffusion)
    schedule_dev = schedule.to(device) if hasattr(schedule, "to") else schedule

    step, py_rng = 0, random.Random(cfg.train.seed)
    gen = torch.Generator(device="cpu").manual_seed(cfg.train.seed)
    done = list_checkpoints(out)
    if done and (done[-1] / "training_state.pt").is_file():  # resume from the newest complete checkpoint
        state = load_training_state(done[-1])
        accelerator.unwrap_model(model).load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        ema.module.load_state_dict(state["ema"])
        step, gen_state = state["step"], state["generator"]
        gen.set_state(gen_state)
        py_rng.setstate((state["py_rng"][0], tuple(state["py_rng"][1]), state["py_rng"][2]))
        set_rng_state(state["rng"])
        log.info("resumed from %s at step %d", done[-1], step)

    def save(at: int) -> Path:
        unwrapped = accelerator.unwrap_model(model)
        training_state = {"model": unwrap_state_dict(unwrapped), "optimizer": opt.state_dict(),
                          "scheduler": sched.state_dict(), "ema": ema.module.state_dict(), "step": at,
                          "generator": gen.get_state(), "py_rng": py_rng.getstate(), "rng": rng_state()}
        return save_checkpoint(out, at, weights=ema.module.state_dict(), config=checkpoint_config(cfg, ema.module),
                               vae_dir=cfg.vae.checkpoint, training_state=training_state, keep_last=cfg.train.keep_last)

    writer = SummaryWriter(str(out / "tensorboard")) if accelerator.is_main_process else None
    pipe = Pipeline(ema.module, vae, text, schedule, cfg.diffusion.prediction, {})
    tokens_per_sample = None
    bad_total: dict[str, int] = {}
    data_iter = iter(loader)
    bar = tqdm(total=cfg.train.steps, initial=step, desc="train", disable=not accelerator.is_main_process)
    t_last, samples_since = time.perf_counter(), 0
    model.train()
    with PreemptionHandler() as preempt:  # SIGUSR1 / SIGTERM: finish the step, checkpoint, exit REQUEUE_EXIT_CODE
        while step < cfg.train.steps:
            t_data = time.perf_counter()
            batch = next(data_iter)
            data_time = time.perf_counter() - t_data
            for reason, n in batch.get("bad_counts", {}).items():
                bad_total[reason] = bad_total.get(reason, 0) + n
            latents = encode_latents(vae, batch["video"].to(device), gen)  # [B, C, t, h, w]
            states, mask = text.encode(drop_prompts(batch["caption"], cfg.diffusion.prompt_dropout, py_rng))
            t = torch.randint(0, schedule.num_timesteps, (latents.shape[0],), generator=gen).to(device)
            noise = torch.randn(latents.shape, generator=gen).to(device)
            with accelerator.autocast():
                loss = training_loss(model, latents, schedule_dev, model_kwargs=dict(text=states, text_mask=mask),
                                     prediction=cfg.diffusion.prediction, t=t, noise=noise,
                                     min_snr_gamma=cfg.diffusion.min_snr_gamma)
            accelerator.backward(loss)
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            ema.update(accelerator.unwrap_model(model), step=step)
            samples_since += latents.shape[0]
            if tokens_per_sample is None:
                pt, ph, pw = accelerator.unwrap_model(model).patch
                tokens_per_sample = math.prod(s // p for s, p in zip(latents.shape[2:], (pt, ph, pw)))
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if writer is not None and (step % cfg.train.log_every == 0 or step == cfg.train.steps):
                elapsed = time.perf_counter() - t_last
                sps = samples_since / max(elapsed, 1e-9)
                flops = 3 * flops_per_token(accelerator.unwrap_model(model), tokens_per_sample, states.shape[1])
                record = dict(step=step, loss=loss.item(), lr=sched.get_last_lr()[0], samples_per_s=sps,
                              tokens_per_s=sps * tokens_per_sample, data_wait_s=data_time, bad=dict(bad_total))
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
                writer.add_scalar("train/loss", loss.item(), step)
                writer.add_scalar("train/lr", sched.get_last_lr()[0], step)
                writer.add_scalar("train/grad_norm", float(grad_norm), step)
                writer.add_scalar("perf/samples_per_s", sps, step)
                writer.add_scalar("perf/tokens_per_s", sps * tokens_per_sample, step)
                writer.add_scalar("perf/train_tflops", sps * tokens_per_sample * flops / 1e12, step)
                writer.add_scalar("perf/data_wait_s", data_time, step)
                for reason, n in bad_total.items():
                    writer.add_scalar(f"data/bad_{reason}", n, step)
                t_last, samples_since = time.perf_counter(), 0
            if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps:
                path = save(step)
                log.info("checkpoint %s", path)
            if writer is not None and cfg.train.sample_every and step % cfg.train.sample_every == 0:
                log_samples(writer, pipe, cfg, step)
            if step < cfg.train.steps and preempt.requested():  # every rank stops after this same step
                if step % cfg.train.checkpoint_every != 0 and step != cfg.train.steps:
                    log.info("preemption checkpoint %s", save(step))
                bar.close()
                if writer is not None:
                    writer.close()
                raise Preempted(step)
    bar.close()
    if writer is not None:
        log_samples(writer, pipe, cfg, step)
        writer.close()
    if bad_total:
        log.warning("skipped bad samples by reason: %s", bad_total)
    return list_checkpoints(out)[-1]
