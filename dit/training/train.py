"""`dit train`: the DiT training loop, one function that reads top to bottom (helpers above it).

shards -> pixel clips -> frozen VAE -> latents; captions -> frozen text encoder (prompt dropout for CFG); or, with
data.latents, latent shards from `dit encode` -> a draw from the stored posterior (+ the stored text states);
training_loss(model, latents, ...) -> AdamW with warmup and clipping -> EMA -> logs, checkpoints, samples.

The same loop runs on 1 process or N (train.strategy: ddp | zero1 | zero2 | zero3 | fsdp, wired in
dit/distributed/strategies.py). It never loses work: checkpoints are atomic and hold the full state (model,
optimizer, LR schedule, EMA, every rank's RNG and data position, step), so ``train.resume=auto`` continues
bit for bit; SIGUSR1 / SIGTERM checkpoint and exit with REQUEUE_EXIT_CODE; a step with a non-finite loss or
gradient is skipped and counted, and train.max_nonfinite of them in a row stop the run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate.utils import set_seed
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from data_pipelines.loader import build_loader

try:
    from data_pipelines.state import merge_states
except ImportError:  # an older data_pipelines without resumable loader state: resume replays batches instead
    merge_states = None  # type: ignore[assignment]
from dit.config import Config, save_config
from dit.diffusion.objectives import training_loss
from dit.distributed.parallelize import parallelize
from dit.distributed.preemption import PREEMPTED_MARKER, REQUEUE_EXIT_CODE, Preempted, PreemptionHandler
from dit.distributed.strategies import build_strategy, make_accelerator, single_process_env, world_size_from_env
from dit.distributed.watchdog import Watchdog
from dit.encode import check_latent_shards
from dit.models.dit import build_dit, flops_per_token
from dit.models.text import build_text_encoder
from dit.models.vae import DiagonalGaussian, load_vae
from dit.sample import Pipeline, generate, schedule_from_config, to_uint8
from dit.training.checkpoint import (
    atomic_checkpoint,
    list_checkpoints,
    load_training_state,
    rank_state_path,
    resume_checkpoint,
    rng_state,
    set_rng_state,
    write_export,
)
from dit.training.metrics import Throughput

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


def posterior_sample(mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """z ~ N(mean, exp(logvar)), [B, C, t, h, w], the noise drawn on the CPU from ``generator`` (so the same draw on
    every device, and the same whether the posterior comes from the VAE or from latent shards)."""
    posterior = DiagonalGaussian(mean, logvar)
    noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
    return posterior.mean + posterior.std * noise


@torch.no_grad()
def encode_latents(vae: torch.nn.Module, video: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Pixels [B, 3, T, H, W] -> normalised latents [B, C, t, h, w] (a posterior sample)."""
    posterior = vae.encode(video)
    return vae.normalize(posterior_sample(posterior.mean, posterior.logvar, generator))


@torch.no_grad()
def stored_text(batch: dict[str, Any], captions: list[str], text: torch.nn.Module,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Text states from latent shards (stored without their padding) -> [B, L, D] + mask [B, L], padded to the
    encoder's length; a dropped prompt ("") takes the encoder's unconditional states, as ``text.encode`` gives."""
    uncond, uncond_mask = text.encode([""])  # [1, L, D], [1, L]
    stored, stored_mask = batch["text"].to(device), batch["text_mask"].to(device)  # [B, n, D], [B, n]
    (b, n, _), length = stored.shape, uncond.shape[1]
    if n > length:
        raise ValueError(f"latent shards hold text states of {n} tokens, more than the text encoder's {length} "
                         "(text.max_length): set text.* as when the shards were encoded")
    states = torch.zeros(b, length, uncond.shape[2], device=device, dtype=uncond.dtype)  # [B, L, D]
    mask = torch.zeros(b, length, dtype=torch.bool, device=device)  # [B, L]
    states[:, :n], mask[:, :n] = stored, stored_mask
    dropped = torch.tensor([c == "" for c in captions], device=device)  # [B]
    states[dropped], mask[dropped] = uncond[0], uncond_mask[0]
    return states, mask


def checkpoint_config(cfg: Config, model: torch.nn.Module) -> dict[str, Any]:
    return {"dit": model.config, "experiment": cfg.to_dict()}


def log_samples(writer: SummaryWriter | None, pipe: Pipeline, cfg: Config, step: int, rank: int = 0,
                world: int = 1) -> None:
    """Sample the configured prompts with the EMA model, each rank its share, and log each clip (on rank 0) as a
    strip of frames. Every rank makes the same number of model calls, so sharded (FSDP) weights can gather."""
    prompts = cfg.train.sample_prompts[:4]
    if not prompts:
        return
    share = math.ceil(len(prompts) / world)
    mine = list(range(rank * share, min(len(prompts), (rank + 1) * share)))
    video = generate(pipe, [prompts[i] for i in mine or [0]], frames=cfg.data.frames, height=cfg.data.height,
                     width=cfg.data.width, steps=min(cfg.sample.steps, 25), sampler=cfg.sample.sampler,
                     cfg=cfg.sample.cfg, seed=0)
    clips = list(zip(mine, to_uint8(video)[:len(mine)]))
    if world > 1:
        everyone: list[Any] = [None] * world
        dist.all_gather_object(everyone, clips)
        clips = [c for part in everyone for c in part]
    if writer is None:
        return
    for i, clip in clips:  # clip: [T, H, W, 3]
        clip = torch.as_tensor(clip)
        strip = clip.permute(3, 1, 0, 2).reshape(3, clip.shape[1], -1)  # [3, H, T*W]
        writer.add_image(f"samples/{i}", strip, step)
        writer.add_text(f"samples/{i}/prompt", prompts[i], step)


def build_train_loader(cfg: Config) -> Any:
    """The data loader; with train.parity_batch every rank reads the whole global batch as one process would."""
    world, per_rank = world_size_from_env(), cfg.train.batch_size * cfg.train.grad_accum_steps
    if not cfg.train.parity_batch or world == 1:
        return build_loader(cfg.data, per_rank, seed=cfg.train.seed)
    saved = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE")}
    os.environ.update(RANK="0", WORLD_SIZE="1")  # the loader reads its rank from the environment
    try:
        return build_loader(cfg.data, per_rank * world, seed=cfg.train.seed)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def draw_batch(batch: dict[str, Any], vae: torch.nn.Module, text: torch.nn.Module, num_timesteps: int,
               gen: torch.Generator, py_rng: random.Random, prompt_dropout: float, device: torch.device,
               keep: slice | None) -> tuple[torch.Tensor, ...]:
    """Latents, text states + mask, timesteps and noise for a batch; ``keep`` slices a global batch to this rank.
    A batch from latent shards (``mean``/``logvar``, maybe ``text``) skips the VAE encoder (and the text encoder)
    but draws the same random numbers in the same order, so it trains exactly as the raw shards it came from."""
    if "mean" in batch:  # the stored posterior: a draw from it, normalised as the VAE's own would be
        latents = vae.normalize(posterior_sample(batch["mean"].to(device), batch["logvar"].to(device), gen))
    else:
        latents = encode_latents(vae, batch["video"].to(device), gen)  # [B, C, t, h, w]
    captions = drop_prompts(batch["caption"], prompt_dropout, py_rng)
    if "text" in batch:
        states, mask = stored_text(batch, captions, text, device)  # [B, L, D], [B, L]
    else:
        states, mask = text.encode(captions)  # [B, L, D], [B, L]
    t = torch.randint(0, num_timesteps, (latents.shape[0],), generator=gen).to(device)  # [B]
    noise = torch.randn(latents.shape, generator=gen).to(device)  # [B, C, t, h, w]
    drawn = (latents, states, mask, t, noise)
    return drawn if keep is None else tuple(x[keep] for x in drawn)


def mean_over_ranks(values: list[float], device: torch.device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def gather_over_ranks(value: float, device: torch.device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    out = [torch.zeros(1, dtype=torch.float64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(out, torch.tensor([value], dtype=torch.float64, device=device))
    return [float(x.item()) for x in out]


def all_finite(tensors: dict[str, torch.Tensor]) -> bool:
    return all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point())


def trim_metrics(path: Path, step: int) -> None:
    """Drop metric lines after ``step`` (written after the checkpoint we resume from, or cut off by a crash)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError):
            pass  # a line cut off by a kill
    path.write_text("".join(line + "\n" for line in keep))


def main(cfg: Config) -> Path:
    """Train a DiT as the config says; returns the newest checkpoint directory."""
    out = Path(cfg.train.output_dir)
    if not cfg.vae.checkpoint:
        raise ValueError("vae.checkpoint is not set: train a VAE first (`dit train-vae --config ...`) and pass "
                         "vae.checkpoint=RUN_DIR/vae")
    if not cfg.data.shards and not getattr(cfg.data, "datasets", None):
        raise ValueError("data.shards is not set: pass data.shards='data/{00000..00003}.tar' (or a directory)")
    resume_from = resume_checkpoint(out, cfg.train.resume)  # fails now on a bad train.resume path
    single_process_env(cfg.train)  # zero*/fsdp without a launcher: a 1-process group
    loader = build_train_loader(cfg)  # fails now on a missing shard
    set_seed(cfg.train.seed)
    # The frozen encoders load before the Accelerator exists: under ZeRO-3 transformers would shard them.
    vae = load_vae(cfg.vae.checkpoint).eval().requires_grad_(False)
    text = build_text_encoder(cfg.text)
    check_latent_shards(cfg, vae, text)  # data.latents: shards of this VAE and text encoder, else a clear error now
    accelerator = make_accelerator(cfg.train, mixed_precision(cfg.train.mixed_precision))
    rank, world, is_main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    device = accelerator.device
    vae, text = vae.to(device), text.to(device)
    out.mkdir(parents=True, exist_ok=True)
    if is_main:
        save_config(cfg, out / "config.yaml")
        (out / PREEMPTED_MARKER).unlink(missing_ok=True)

    model = build_dit(cfg.model, in_channels=vae.latent_channels, text_dim=text.dim)
    model = parallelize(model, gradient_checkpointing=cfg.model.gradient_checkpointing, compile=cfg.model.compile)
    strategy = build_strategy(accelerator, model, cfg.train)  # DDP / ZeRO / FSDP; EMA copy made before sharding
    sched = torch.optim.lr_scheduler.LambdaLR(strategy.base_opt, lr_lambda(cfg.train.warmup_steps, cfg.train.steps,
                                                                           cfg.train.lr_schedule))
    schedule = schedule_from_config(cfg.diffusion)
    schedule_dev = schedule.to(device) if hasattr(schedule, "to") else schedule

    # Randomness: each rank its own stream; with parity_batch all ranks draw the global batch and keep a slice.
    parity = cfg.train.parity_batch and world > 1
    accum, micro = cfg.train.grad_accum_steps, cfg.train.batch_size
    keep = slice(rank * micro * accum, (rank + 1) * micro * accum) if parity else None
    stream_seed = cfg.train.seed + (0 if parity else rank)
    step, py_rng = 0, random.Random(stream_seed)
    gen = torch.Generator(device="cpu").manual_seed(stream_seed)
    replay = 0  # batches to skip when the loader cannot restore its position itself
    if resume_from is not None:  # the full state: model, optimizer, schedule, EMA, RNG, data position, step
        state = load_training_state(resume_from)
        strategy.load(resume_from, state)
        strategy.load_ema(state["ema"])
        sched.load_state_dict(state["scheduler"])
        step = state["step"]
        ranks = {int(p.stem.split("-")[1]): torch.load(p, map_location="cpu", weights_only=True)
                 for p in sorted(resume_from.glob("rank-*.pt"))}
        rs = ranks.get(rank, state if "generator" in state else None)  # (older checkpoints: rank 0 in state)
        if rs is not None:
            gen.set_state(rs["generator"])
            py_rng.setstate((rs["py_rng"][0], tuple(rs["py_rng"][1]), rs["py_rng"][2]))
            set_rng_state(rs["rng"])
        else:
            log.warning("rank %d has no RNG state in %s (more ranks than it was saved with): fresh seeds", rank,
                        resume_from)
        loader_states = [r["loader"] for r in ranks.values() if r.get("loader") is not None]
        if loader_states and hasattr(loader, "load_state_dict"):
            if parity or len(loader_states) == 1:
                loader.load_state_dict(rs["loader"] if rs is not None else loader_states[0])
            else:  # every rank's position: the loader itself handles a changed world size
                loader.load_state_dict(merge_states(loader_states))
        else:
            replay = step
        if is_main:
            trim_metrics(out / "metrics.jsonl", step)
        log.info("resumed from %s at step %d", resume_from, step)

    def save(at: int) -> Path:
        ema_weights = strategy.ema_state_dict()  # gathered (a collective under sharding)
        if strategy.any_rank(is_main and not all_finite(ema_weights)):
            raise RuntimeError(f"step {at}: the EMA weights are not finite; not writing a checkpoint")
        with atomic_checkpoint(out, at, keep_last=cfg.train.keep_last, is_main=is_main,
                               barrier=accelerator.wait_for_everyone) as tmp:
            training_state = strategy.save(tmp)  # every rank: sharded model + optimizer where there are shards
            if is_main:
                write_export(tmp, weights=ema_weights, config=checkpoint_config(cfg, strategy.ema.module),
                             vae_dir=cfg.vae.checkpoint)
                training_state.update(scheduler=sched.state_dict(), ema=ema_weights, step=at,
                                      strategy=cfg.train.strategy, world_size=world)
                torch.save(training_state, tmp / "training_state.pt")
            torch.save({"rng": rng_state(), "generator": gen.get_state(), "py_rng": py_rng.getstate(),
                        "loader": loader.state_dict() if hasattr(loader, "state_dict") else None,
                        "params": strategy.local_params()}, rank_state_path(tmp, rank))
        return out / "checkpoints" / f"step-{at:08d}"

    writer = SummaryWriter(str(out / "tensorboard")) if is_main else None
    pipe = Pipeline(strategy.ema.module, vae, text, schedule, cfg.diffusion.prediction, {})
    tokens_per_sample, flops_per_sample_token = None, 0.0
    bad_total: dict[str, int] = {}
    nonfinite_total, nonfinite_run = 0, 0
    data_iter = iter(loader)
    for _ in range(replay):  # the loader's position, by reading (deterministically) what was already trained on
        next(data_iter)
    bar = tqdm(total=cfg.train.steps, initial=step, desc="train", disable=not is_main)
    meter = Throughput(device, world)
    strategy.model.train()
    # SIGUSR1 / SIGTERM: finish the step, checkpoint, exit REQUEUE_EXIT_CODE; a phase that hangs gets reported.
    with PreemptionHandler() as preempt, Watchdog(cfg.train.watchdog_timeout, rank) as watchdog:
        while step < cfg.train.steps:
            watchdog.mark("data")
            t_data = time.perf_counter()
            batch = next(data_iter)
            data_time = time.perf_counter() - t_data
            for reason, n in batch.get("bad_counts", {}).items():
                bad_total[reason] = bad_total.get(reason, 0) + n
            watchdog.mark("forward/backward/optimizer step")
            latents, states, mask, t, noise = draw_batch(batch, vae, text, schedule.num_timesteps, gen, py_rng,
                                                         cfg.diffusion.prompt_dropout, device, keep)
            # train.grad_accum_steps micro-batches of train.batch_size rows; gradients sync after the last only.
            # A non-finite loss or gradient norm on any rank: every rank skips the update (weights, optimizer
            # state and EMA stay as they were); the data and the LR schedule move on.
            losses, nonfinite, grad_norm = [], False, None
            for i in range(accum):
                rows = slice(i * micro, (i + 1) * micro) if accum > 1 else slice(None)
                with strategy.no_sync(i < accum - 1):
                    with accelerator.autocast():
                        loss = training_loss(strategy.model, latents[rows], schedule_dev,
                                             model_kwargs=dict(text=states[rows], text_mask=mask[rows]),
                                             prediction=cfg.diffusion.prediction, t=t[rows], noise=noise[rows],
                                             min_snr_gamma=cfg.diffusion.min_snr_gamma)
                    # test hook: one rank's loss goes bad, on the step's last micro-batch (after the others' backward)
                    if step + 1 in cfg.train.debug_nan_steps and rank == 0 and i == accum - 1:
                        loss = loss * float("nan")
                    losses.append(loss.detach())
                    nonfinite = strategy.any_rank(not bool(torch.isfinite(loss.detach())))
                    if nonfinite:
                        break
                    strategy.backward(loss / accum if accum > 1 else loss)
            if not nonfinite:
                grad_norm = strategy.clip_and_norm()
                nonfinite = grad_norm is not None and not math.isfinite(grad_norm)
            loss = losses[0] if accum == 1 else torch.stack(losses).mean()
            if nonfinite:
                strategy.skip()
                nonfinite_total, nonfinite_run = nonfinite_total + 1, nonfinite_run + 1
                log.warning("step %d: non-finite loss or gradients, update skipped (%d in a row, %d in all)",
                            step + 1, nonfinite_run, nonfinite_total)
                if nonfinite_run >= cfg.train.max_nonfinite:
                    raise RuntimeError(
                        f"stopping at step {step + 1}: {nonfinite_run} steps in a row had a non-finite loss or "
                        f"gradient norm (train.max_nonfinite={cfg.train.max_nonfinite}). The last checkpoint holds "
                        "finite weights; lower train.lr, raise train.warmup_steps, or check the data, then resume.")
            else:
                strategy.step()
                nonfinite_run = 0
            sched.step()
            step += 1
            if not nonfinite:
                strategy.update_ema(step)
            if tokens_per_sample is None:
                pt, ph, pw = strategy.raw.patch
                tokens_per_sample = math.prod(s // p for s, p in zip(latents.shape[2:], (pt, ph, pw)))
                flops_per_sample_token = 3 * flops_per_token(strategy.raw, tokens_per_sample, states.shape[1])
            meter.add(latents.shape[0], tokens_per_sample, flops_per_sample_token, data_time)
            bar.update(1)
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                watchdog.mark("logging (loss all-reduce)")
                (mean_loss,) = mean_over_ranks([float(loss.detach())], device)  # every rank, same steps
                norm = grad_norm if grad_norm is not None else strategy.last_grad_norm
                perf = meter.report()
                peaks = gather_over_ranks(perf.pop("peak_memory_gb"), device)
                bar.set_postfix(loss=f"{mean_loss:.4f}")
                if writer is not None:
                    record = dict(step=step, loss=mean_loss, lr=sched.get_last_lr()[0], grad_norm=norm, **perf,
                                  peak_memory_gb_per_rank=peaks, data_wait_s=data_time, bad=dict(bad_total),
                                  nonfinite_skipped=nonfinite_total)
                    with open(out / "metrics.jsonl", "a") as f:
                        f.write(json.dumps(record) + "\n")
                    writer.add_scalar("train/loss", mean_loss, step)
                    writer.add_scalar("train/lr", sched.get_last_lr()[0], step)
                    if norm is not None:
                        writer.add_scalar("train/grad_norm", float(norm), step)
                    writer.add_scalar("train/nonfinite_skipped", nonfinite_total, step)
                    for key, value in perf.items():
                        if value is not None:
                            writer.add_scalar(f"perf/{key}", value, step)
                    writer.add_scalar("perf/peak_memory_gb_max_rank", max(peaks), step)
                    for reason, n in bad_total.items():
                        writer.add_scalar(f"data/bad_{reason}", n, step)
            if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps:
                watchdog.mark("checkpoint")
                log.info("checkpoint %s", save(step))
            if cfg.train.sample_every and step % cfg.train.sample_every == 0:
                watchdog.mark("sampling")
                log_samples(writer, pipe, cfg, step, rank, world)
            watchdog.mark("preemption check (all-reduce)")
            if step < cfg.train.steps and preempt.requested():  # every rank stops after this same step
                if step % cfg.train.checkpoint_every != 0:
                    log.info("preemption checkpoint %s", save(step))
                if is_main:
                    (out / PREEMPTED_MARKER).write_text(json.dumps({"step": step, "exit_code": REQUEUE_EXIT_CODE}))
                bar.close()
                if writer is not None:
                    writer.close()
                log.warning("rank %d: preempted after step %d, checkpointed; exiting with %d", rank, step,
                            REQUEUE_EXIT_CODE)
                raise Preempted(step)
    bar.close()
    log_samples(writer, pipe, cfg, step, rank, world)
    if writer is not None:
        writer.close()
    if bad_total:
        log.warning("skipped bad samples by reason: %s", bad_total)
    if nonfinite_total:
        log.warning("skipped %d steps with a non-finite loss or gradient norm", nonfinite_total)
    accelerator.wait_for_everyone()
    return list_checkpoints(out)[-1]
