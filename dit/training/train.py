"""`dit train`: the DiT training loop, one function that reads top to bottom, with its helpers above it (what a
step draws and its loss: batch.py).

shards -> pixel clips -> frozen VAE -> latents; captions -> frozen text encoder (prompt dropout for CFG); or, with
data.latents, latent shards from `dit encode` -> a draw from the stored posterior (+ the stored text states);
training_loss(model, latents, ...) -> AdamW with warmup and clipping -> EMA -> logs, checkpoints, samples.

The same loop runs on 1 process or N under every train.strategy (parallelism is applied from outside:
dit/distributed/parallelize.py). It never loses work: checkpoints are atomic and hold the full state (model,
optimizer, LR schedule, EMA, every rank's RNG and data position, step), so ``train.resume=auto`` continues bit for
bit; SIGUSR1 / SIGTERM checkpoint and exit with REQUEUE_EXIT_CODE; a step with a non-finite loss or gradient is
skipped and counted (dit/training/step.py), and train.max_nonfinite of them in a row stop the run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed

from data_pipelines.latents import check_latent_shards
from data_pipelines.loader import build_loader
from data_pipelines.shards import expand_shards
from data_pipelines.state import merge_states
from dit.config import Config, ConfigError, ModelConfig, VAEConfig, save_config
from dit.distributed.parallelize import parallelize
from dit.distributed.preemption import PREEMPTED_MARKER, REQUEUE_EXIT_CODE, Preempted, PreemptionHandler
from dit.distributed.sequence import apply_sequence_parallel
from dit.distributed.setup import DistEnv, any_rank, gather_floats, mean_over_ranks, setup_distributed
from dit.distributed.strategies import Strategy
from dit.distributed.watchdog import Watchdog
from dit.experts import check_expert, load_expert, one_expert
from dit.export import checkpoint_step, list_checkpoints, write_export
from dit.models.attention import resolve_backend
from dit.models.condition import (
    check_image_condition,
    clip_condition,
    code_condition,
    image_frames,
    last_frame_condition,
)
from dit.models.dit import flops_per_token, unfused_state_dict
from dit.models.families import build_denoiser, check_fit, meta_model_config
from dit.models.image_encoder import build_image_encoder, image_encoder_width
from dit.models.lora import is_lora_key
from dit.models.text import build_text_encoder, text_device, text_width
from dit.models.vae import CausalVAE, check_vae_source, encoder_digest, export_vae, load_vae_from_config
from dit.pipeline import Pipeline, schedule_from_config
from dit.training.batch import RandomStreams, draw_batch, micro_loss
from dit.training.checkpoint import (
    agreed_problem,
    atomic_checkpoint,
    clear_run,
    load_training_state,
    on_main,
    pick_resume,
    rank_state_path,
    refuse_mixed_runs,
    resume_candidates,
)
from dit.training.ema import build_ema
from dit.training.finetune import (
    add_adapters,
    check_finetune,
    hold_frozen_base,
    initial_adapter,
    load_init_from,
    write_adapter,
)
from dit.training.metrics import Throughput
from dit.training.optim import build_lr_schedule, build_optimizer, mixed_precision
from dit.training.progress import Progress
from dit.training.run_log import RunLog, log_samples
from dit.training.step import train_step
from dit.training.validation import Validator, prepare_validation

log = logging.getLogger("dit.train")



def check_inputs(cfg: Config) -> None:
    t = cfg.train
    check_vae_source(cfg.vae)
    if cfg.model.family != "dit":  # the transformer takes the VAE's channels and the text width: from configs alone
        check_fit(cfg.model, cfg.vae.geometry()[0], text_width(cfg.text))
    check_image_condition(cfg)
    if t.init_from or t.lora.rank:  # the base exists and fits this model: from configs, a meta-device model
        channels, temporal, spatial = cfg.vae.geometry()
        built = meta_model_config(cfg, channels, text_width(cfg.text), (temporal, spatial)) if t.init_from else None
        check_finetune(cfg, built)
    if cfg.model.family != "dit" and not cfg.model.pretrained and not t.init_from:
        log.warning("model.pretrained is not set: the %s transformer starts from random weights", cfg.model.family)
    if not cfg.data.shards and not cfg.data.datasets:
        raise ConfigError("data.shards is not set: pass data.shards='data/{00000..00003}.tar' (or a directory)")
    if cfg.data.val_shards:
        expand_shards(cfg.data.val_shards, name="data.val_shards")  # (a missing one: FileNotFoundError, now)


def build_train_loader(cfg: Config, env: DistEnv) -> Any:
    """The data loader of this rank, split by data-parallel rank (the ranks of a sequence-parallel group read the
    same samples); with train.parity_batch every rank reads the whole global batch as one process would (and keeps
    its slice, see ``draw_batch``)."""
    per_rank = cfg.train.batch_size * cfg.train.grad_accum_steps
    if cfg.train.parity_batch and env.dp_size > 1:
        return build_loader(cfg.data, per_rank * env.dp_size, seed=cfg.train.seed)
    return build_loader(cfg.data, per_rank, rank=env.dp_rank, world_size=env.dp_size, seed=cfg.train.seed)


def start_point(cfg: Config, env: DistEnv, overwrite: bool) -> Path | None:
    """The checkpoint this run resumes (None: from scratch), before anything is written. Rank 0 reads the run folder
    (and with ``overwrite`` first deletes the earlier run's outputs); a torn checkpoint is skipped with a logged
    reason, never loaded; a folder holding another run, or another model, is refused (dit/training/checkpoint.py)."""
    out, resume = Path(cfg.train.output_dir), cfg.train.resume

    def listed() -> tuple[list[Path], bool]:
        if overwrite:
            clear_run(out, resume)
        return resume_candidates(out, resume)

    candidates, explicit = on_main(env, listed)
    resume_from = pick_resume(candidates, explicit, out if resume == "auto" else resume,
                              lambda c: agreed_problem(c, env), quiet=not env.is_main)
    on_main(env, lambda: refuse_mixed_runs(out, resume_from, dataclasses.asdict(cfg.model)))
    return resume_from


def loaded_vae_config(vae_cfg: VAEConfig, vae: torch.nn.Module) -> VAEConfig:
    """``vae_cfg`` with the sizes of the VAE actually loaded (vae.checkpoint's own, whatever the YAML said), so the
    run's config.yaml and checkpoints record the VAE they were trained with."""
    sizes = {"latent_channels": vae.latent_channels}
    if isinstance(vae, CausalVAE):
        sizes.update({k: vae.config[k] for k in ("base_channels", "channel_mults", "num_res_blocks")})
    return dataclasses.replace(vae_cfg, **sizes)


def data_positions(ranks: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """The loader states saved by the ranks, one per data-parallel rank (the ranks of a sequence-parallel group read
    the same samples, so they saved the same position)."""
    unique: dict[tuple[int, ...], dict[str, Any]] = {}
    for state in ranks.values():
        unique.setdefault(tuple(r["rank"] for r in state["loader"]["ranks"]), state["loader"])
    return list(unique.values())


def restore(ckpt: Path, strategy: Strategy, lr_schedule: Any, rng: RandomStreams, loader: Any, env: DistEnv,
            parity: bool) -> int:
    """The full state of checkpoint ``ckpt``: model, optimizer, EMA, LR schedule, this rank's RNG and data
    position (the merged positions of all ranks when the world size changed); returns its step."""
    state = load_training_state(ckpt)
    strategy.load(ckpt, state)
    lr_schedule.load_state_dict(state["scheduler"])
    ranks = {int(p.stem.split("-")[1]): torch.load(p, map_location="cpu", weights_only=True)
             for p in sorted(ckpt.glob("rank-*.pt"))}
    mine = ranks.get(env.rank)
    if mine is not None:
        rng.load_state_dict(mine)
    else:
        log.warning("rank %d has no RNG state in %s (more ranks than it was saved with): fresh seeds", env.rank, ckpt)
    positions = data_positions(ranks)
    if parity or len(positions) == 1:
        loader.load_state_dict((mine or ranks[0])["loader"])
    else:  # every rank's position: the loader itself handles a changed world size
        loader.load_state_dict(merge_states(positions))
    log.info("resumed from %s at step %d", ckpt, state["step"])
    return state["step"]


def save(step: int, out: Path, cfg: Config, strategy: Strategy, lr_schedule: Any, rng: RandomStreams, loader: Any,
         env: DistEnv, keep: tuple[int, ...] = (), norms: dict[str, float] | None = None) -> Path:
    """Checkpoint ``step`` atomically: the EMA export (what `dit sample` loads), the training state and each rank's
    RNG and data position. Every rank calls it (the gathers and the sharded state are collectives). ``norms``: a
    LoRA run's base layer norms, against which the adapter's update is measured (finetune.update_size)."""
    ema_weights = strategy.ema_state_dict()  # gathered (a collective under sharding)
    if cfg.model.fused_qkv:  # exports in the plain layout, which any DiT loads (the fused model loads it too)
        ema_weights = unfused_state_dict(ema_weights)
    finite = all(torch.isfinite(v).all() for v in ema_weights.values() if v.is_floating_point())
    if any_rank(env.is_main and not finite, env.device):
        raise RuntimeError(f"step {step}: the EMA weights are not finite; not writing a checkpoint")
    with atomic_checkpoint(out, step, keep_last=cfg.train.keep_last, is_main=env.is_main,
                           barrier=env.barrier, world_size=env.world_size, keep=keep) as tmp:
        training_state = strategy.save(tmp)  # every rank: sharded model + optimizer where there are shards
        if env.is_main:
            config = {"dit": strategy.module.config, "experiment": cfg.to_dict()}
            if cfg.train.lora.rank:
                config["lora"] = write_adapter(tmp, ema_weights, cfg, norms)
            write_export(tmp, weights=ema_weights, config=config, manifest=False)  # one for all: at the end
            export_vae(cfg.vae, tmp / "vae")  # ours copied; a pretrained family recorded by its folder
            if strategy.ema:  # (train.ema=false: the export is the live weights, already in the state)
                training_state["ema"] = ema_weights
            training_state.update(scheduler=lr_schedule.state_dict(), step=step,
                                  strategy=cfg.train.strategy, world_size=env.world_size)
            torch.save(training_state, tmp / "training_state.pt")
        torch.save({**rng.state_dict(), "loader": loader.state_dict(), "params": strategy.local_params()},
                   rank_state_path(tmp, env.rank))
    return out / "checkpoints" / f"step-{step:08d}"


class NonfiniteGuard:
    """Counts skipped steps; train.max_nonfinite of them in a row stop the run with a message that says what to do."""

    def __init__(self, limit: int) -> None:
        self.limit, self.total, self.in_a_row = limit, 0, 0

    def after(self, step: int, applied: bool) -> None:
        if applied:
            self.in_a_row = 0
            return
        self.total, self.in_a_row = self.total + 1, self.in_a_row + 1
        log.warning("step %d: non-finite loss or gradients, update skipped (%d in a row, %d in all)", step,
                    self.in_a_row, self.total)
        if self.in_a_row >= self.limit:
            raise RuntimeError(
                f"stopping at step {step}: {self.in_a_row} steps in a row had a non-finite loss or gradient norm "
                f"(train.max_nonfinite={self.limit}). The last checkpoint holds finite weights; lower train.lr, "
                "raise train.warmup_steps, or check the data, then resume.")


def check_attention(model: ModelConfig, device: torch.device) -> None:
    """model.attention names a kernel this device has (before any work), for our DiT (families use their own)."""
    if model.family == "dit":
        try:
            resolve_backend(model.attention, device)
        except RuntimeError as e:
            raise ConfigError(str(e)) from None


def main(cfg: Config, overwrite: bool = False) -> Path:
    """Train a DiT as the config says; returns the newest checkpoint directory. ``overwrite``: first delete what an
    earlier run wrote into train.output_dir (else a folder holding another run is refused)."""
    check_inputs(cfg)
    out, t = Path(cfg.train.output_dir), cfg.train
    if t.sample_prompts and last_frame_condition(cfg.model):
        log.warning("train.sample_prompts: a Wan 2.1 FLF2V model samples from a first and a last frame; no samples "
                    "are logged (sample with `dit sample --checkpoint RUN --image FIRST --last-image LAST`)")
    if t.sample_prompts and one_expert(cfg.diffusion) and not t.sample_expert:
        log.warning("train.sample_prompts: this run trains one expert (noise levels [%g, %g]), which cannot sample "
                    "alone; no samples are logged (set train.sample_expert to the other expert, or sample with "
                    "`dit sample --checkpoint RUN --expert OTHER`)", cfg.diffusion.sigma_min, cfg.diffusion.sigma_max)
    # ZeRO and FSDP need a group, even for 1 process; train.sequence_parallel is checked against the world size here
    env = setup_distributed(needs_group=t.strategy != "ddp", sequence_parallel=t.sequence_parallel)
    check_attention(cfg.model, env.device)
    resume_from = start_point(cfg, env, overwrite)  # fails now on a bad train.resume or another run's folder
    # train.lora.init_from's adapter, read (and converted) now: a missing file or another rank fails before any work
    initial = initial_adapter(cfg) if t.lora.init_from and resume_from is None else None
    if resume_from is not None and checkpoint_step(resume_from) >= t.steps:
        if env.is_main:
            log.warning("the run in %s is already at step %d >= train.steps=%d: nothing to do (raise train.steps to "
                        "train on)", out, checkpoint_step(resume_from), t.steps)
        return resume_from
    loader = build_train_loader(cfg, env)  # fails now on a missing shard
    set_seed(t.seed)
    # The frozen encoders, before any strategy exists (DeepSpeed ZeRO-3 would shard them too).
    vae = load_vae_from_config(cfg.vae).eval().requires_grad_(False).to(env.device)
    cfg = dataclasses.replace(cfg, vae=loaded_vae_config(cfg.vae, vae))  # recorded as loaded, not as the YAML says
    text = build_text_encoder(cfg.text).to(text_device(cfg.text, env.device))
    # Wan I2V's code form ("first", "first_last" for FLF2V; "" without); Wan 2.1 I2V's CLIP encoder for raw shards
    # (latent shards hold its states: checked here) and for samples from train.sample_images
    code = image_frames(cfg.model) if code_condition(cfg.model) else ""
    clip_needed = not cfg.data.latents or bool(t.sample_images)
    image_encoder = build_image_encoder(cfg.model.image_encoder if clip_needed else None)
    if image_encoder is not None:
        image_encoder.to(env.device)
    image_width = image_encoder_width(cfg.model.image_encoder) if clip_condition(cfg.model) else 0
    for data in (cfg.data, *([cfg.data.validation()] if cfg.data.val_shards else [])):  # (held-out: the same kind)
        check_latent_shards(data, vae_path=cfg.vae.checkpoint or cfg.vae.pretrained,
                            latent_channels=vae.latent_channels, vae_encoder=encoder_digest(vae),
                            text_encoder=cfg.text.encoder, text_max_length=cfg.text.max_length, text_dim=text.dim,
                            text_name=text.name, text_padding=cfg.text.padding, image_code=bool(code),
                            image_frames=code or None, image_width=image_width)
    out.mkdir(parents=True, exist_ok=True)
    if env.is_main:
        save_config(cfg, out / "config.yaml")
        (out / PREEMPTED_MARKER).unlink(missing_ok=True)

    model = build_denoiser(cfg.model, in_channels=vae.latent_channels, text_dim=text.dim,
                           compression=(vae.temporal_compression, vae.spatial_compression))
    expert = t.sample_expert if t.sample_prompts else ""  # the other expert: checked to fit before any work
    run_config = {"dit": model.config, "experiment": cfg.to_dict()}  # (as a checkpoint's config.json holds it)
    if expert:
        check_expert(run_config, expert)
    if t.init_from and (resume_from is None or t.lora.rank):  # a LoRA run's base, also under its resumed adapter
        load_init_from(model, t.init_from)
    if cfg.model.fused_qkv:  # after any init_from: the weights are stacked from the plain layout
        model.fuse_qkv()
    lora = t.lora
    norms = add_adapters(model, lora, initial, resume_from, env.is_main) if lora.rank else None
    precision = mixed_precision(t.mixed_precision, cfg.model.family)  # auto: bf16 on a GPU that has it
    held = hold_frozen_base(model, lora, precision, t.strategy) if lora.rank else None
    if held:
        log.info(held)
    sampling_dtype = "bf16" if precision == "bf16" else "fp32"  # the logged samples as the run trains
    ema = build_ema(model, t.ema_decay, share_frozen=lora.ema_shares_base(t.strategy),
                    partitioned=t.strategy.startswith("zero")) if t.ema else None  # (ZeRO: partitioned instead)
    strategy = parallelize(model, env, t, ema=ema,
                           make_optimizer=lambda params: build_optimizer(params, t),
                           gradient_checkpointing=cfg.model.gradient_checkpointing, compile=cfg.model.compile,
                           mixed_precision=precision,
                           checkpoint_every=cfg.model.gradient_checkpointing_every)
    if lora.rank:
        strategy.keep = is_lora_key  # checkpoints hold the adapter only; the base comes from train.init_from
    lr_schedule = build_lr_schedule(strategy.optimizer, t)
    noise_schedule = schedule_from_config(cfg.diffusion)
    noise_schedule_dev = noise_schedule.to(env.device)

    # Randomness: each data-parallel rank its own stream (a sequence-parallel group draws the same timesteps and
    # noise for its clips); with parity_batch all ranks draw the global batch and keep their slice.
    parity = t.parity_batch and env.dp_size > 1
    accum, micro = t.grad_accum_steps, t.batch_size
    keep = slice(env.dp_rank * micro * accum, (env.dp_rank + 1) * micro * accum) if parity else None
    rng = RandomStreams(t.seed + (0 if parity else env.dp_rank))
    step = restore(resume_from, strategy, lr_schedule, rng, loader, env, parity) if resume_from else 0

    run_log = RunLog(out, step, enabled=env.is_main)
    validator = Validator(prepare_validation(cfg, env, vae, text, strategy.module.patch, code, image_encoder),
                          cfg, env, out, step, run_log.write_val)

    def checkpoint() -> Path:
        ckpt = save(step, out, cfg, strategy, lr_schedule, rng, loader, env, keep=validator.kept(), norms=norms)
        validator.checkpointed(step)
        return ckpt

    if validator.due(step):  # the starting point (a fine-tune's base)
        validator.run(step, strategy, noise_schedule_dev)
    # held on the CPU in the samples' precision, once per node; on the device only while sampling (log_samples)
    expert_dtype = torch.bfloat16 if sampling_dtype == "bf16" else torch.float32
    experts = load_expert(run_config, expert, "cpu", dtype=expert_dtype, env=env) if expert else None
    if experts and env.sequence_parallel > 1:  # (as the model it samples beside)
        apply_sequence_parallel(experts.other, env.sp_group)
    pipe = Pipeline(strategy.sampled, vae, text, noise_schedule, cfg.diffusion.prediction, {},
                    diffusion=cfg.diffusion, image=image_encoder, experts=experts)
    progress = Progress(t.steps, initial=step, every=t.log_every, enabled=env.is_main)
    meter, guard, bad = Throughput(env.device, env.world_size), NonfiniteGuard(t.max_nonfinite), {}
    share = 1 / env.sequence_parallel  # of each clip's work done on this rank (its sequence-parallel slice)
    flops_per_sample = None
    data_iter = iter(loader)
    strategy.model.train()
    # SIGUSR1 / SIGTERM: finish the step, checkpoint, exit REQUEUE_EXIT_CODE; a phase that hangs gets reported.
    with PreemptionHandler() as preempt, Watchdog(t.watchdog_timeout, env.rank) as watchdog:
        while step < t.steps:
            watchdog.mark("data")
            t_data = time.perf_counter()
            batch = next(data_iter)
            data_time = time.perf_counter() - t_data
            for reason, n in batch.get("bad_counts", {}).items():
                bad[reason] = bad.get(reason, 0) + n

            watchdog.mark("forward/backward/optimizer step")
            drawn = draw_batch(batch, vae, text, cfg.diffusion, strategy.module.patch, rng, env.device, keep,
                               cfg.model, code, image_encoder)
            result = train_step(strategy, micro_loss(strategy, drawn, noise_schedule_dev, cfg), accum)
            lr_schedule.step()
            step += 1
            if result.applied:
                strategy.update_ema(step)
            guard.after(step, result.applied)

            if flops_per_sample is None:
                latents, states = drawn[:2]
                tokens = math.prod(s // p for s, p in zip(latents.shape[2:], strategy.module.patch))
                # (Wan 2.1 I2V's CLIP tokens are attended beside the text, at the same cost per token)
                context = states.shape[1] + (drawn[6].shape[1] if len(drawn) > 6 else 0)
                if hasattr(strategy.module, "text_tokens"):  # (HunyuanVideo 1.5 cuts its packed text's padding)
                    context = strategy.module.text_tokens(states, drawn[2], drawn[6].shape[1] if len(drawn) > 6 else 1)
                flops_per_sample = (tokens, 3 * flops_per_token(strategy.module, tokens, context))
            meter.add(drawn[0].shape[0] * share, *flops_per_sample, data_time)
            if step % t.log_every == 0 or step == t.steps:
                watchdog.mark("logging (loss all-reduce)")
                (loss,) = mean_over_ranks([float(result.loss)], env.device)  # every rank, same steps
                perf = meter.report()
                peaks = gather_floats(perf.pop("peak_memory_gb"), env.device)
                run_log.write(dict(step=step, loss=loss, lr=lr_schedule.get_last_lr()[0], grad_norm=result.grad_norm,
                                   **perf, peak_memory_gb_per_rank=peaks, data_wait_s=data_time, bad=dict(bad),
                                   nonfinite_skipped=guard.total))
                progress.update(loss=loss)
            else:
                progress.update()
            if validator.due(step):  # (before the checkpoint: a resume from it never lacks its line, one from
                watchdog.mark("validation")  # before redoes it)
                validator.run(step, strategy, noise_schedule_dev)
            if step % t.checkpoint_every == 0 or step == t.steps:
                watchdog.mark("checkpoint")
                log.info("checkpoint %s", checkpoint())
            if t.sample_every and step % t.sample_every == 0:
                watchdog.mark("sampling")
                log_samples(run_log.writer, pipe, cfg, step, env, sampling_dtype, strategy.sampling)
            watchdog.mark("preemption check (all-reduce)")
            if step < t.steps and preempt.requested():  # every rank stops after this same step
                if step % t.checkpoint_every != 0:
                    log.info("preemption checkpoint %s", checkpoint())
                if env.is_main:
                    (out / PREEMPTED_MARKER).write_text(json.dumps({"step": step, "exit_code": REQUEUE_EXIT_CODE}))
                progress.close()
                run_log.close()
                log.warning("rank %d: preempted after step %d, checkpointed; exiting with %d", env.rank, step,
                            REQUEUE_EXIT_CODE)
                raise Preempted(step)
    progress.close()
    log_samples(run_log.writer, pipe, cfg, step, env, sampling_dtype, strategy.sampling)
    run_log.close()
    if bad:
        log.warning("skipped bad samples by reason: %s", bad)
    if guard.total:
        log.warning("skipped %d steps with a non-finite loss or gradient norm", guard.total)
    env.barrier()
    return list_checkpoints(out)[-1]
