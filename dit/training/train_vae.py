"""`dit train-vae`: train the causal 3D VAE on the configured shards, then fit the latent statistics that
normalise latents for the DiT, and write RUN_DIR/vae (vae.safetensors + vae.json, atomically).

Image phase (``vae.image_steps``): the first steps train on one random frame of each clip, coded as an image
(T = 1, the causal VAE's first-frame path, which shares every weight with the video path). A frame step is
cheaper than a clip step, so the spatial code (colour, shape, position) gets more optimizer steps in the same
time before the clip steps learn the temporal compression: the image-then-video recipe of Open-Sora-Plan's and
CV-VAE's VAEs (the demo's measurements are in the README).

With ``vae.checkpoint`` set to an earlier run's RUN_DIR/vae, training starts from that VAE (its sizes; a new
optimizer and schedule) instead of a new one: `dit demo` trains a VAE further this way when it fails the colour
check."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.tensorboard import SummaryWriter

from data_pipelines.loader import build_loader
from dit.config import Config, ConfigError, save_config
from dit.models.vae import CONFIG_NAME, WEIGHTS_NAME, CausalVAE, build_vae, load_vae, save_vae, vae_loss
from dit.training.optim import build_lr_schedule, build_optimizer, mixed_precision
from dit.training.progress import Progress
from dit.training.train import loaded_vae_config

log = logging.getLogger("dit.train_vae")


@torch.no_grad()
def fit_stats(vae: CausalVAE, loader_iter: object, batches: int, device: torch.device) -> None:
    """Set the latent mean/std from a few batches so the DiT sees unit-scale latents."""
    vae.eval()
    zs = [vae.encode(next(loader_iter)["video"].to(device)).mode() for _ in range(batches)]
    vae.fit_latent_stats(torch.cat(zs))


def image_batch(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One random frame of each clip as an image: [B, 3, T, H, W] -> [B, 3, 1, H, W]."""
    pick = torch.randint(0, x.shape[2], (x.shape[0],), generator=generator).to(x.device)
    return x[torch.arange(x.shape[0], device=x.device), :, pick].unsqueeze(2)


def _start_from(checkpoint: str | None) -> CausalVAE | None:
    """The VAE of an earlier `dit train-vae` that vae.checkpoint names, to train on (its own sizes, not vae.*'s);
    None when unset. A path without one is a ConfigError, raised before any work."""
    if not checkpoint:
        return None
    record = Path(checkpoint, CONFIG_NAME)
    if record.is_file() and "family" in json.loads(record.read_text()):
        raise ConfigError(f"vae.checkpoint={checkpoint} records a pretrained family's VAE; train-vae trains our "
                          "CausalVAE (drop vae.checkpoint to train a new one)")
    if not record.is_file() or not Path(checkpoint, WEIGHTS_NAME).is_file():
        raise ConfigError(f"vae.checkpoint={checkpoint} holds no {CONFIG_NAME} + {WEIGHTS_NAME}: point it at the "
                          "RUN_DIR/vae folder of an earlier `dit train-vae` to train that VAE further, or drop it to "
                          "train a new one")
    vae = load_vae(checkpoint)
    log.info("train-vae: starting from the VAE in %s (its sizes: %s)", checkpoint, vae.config)
    return vae.train()


def main(cfg: Config, stats_batches: int = 4) -> Path:
    """Train the VAE for train.steps steps; returns the directory of the saved VAE (RUN_DIR/vae)."""
    if not cfg.data.shards and not cfg.data.datasets:
        raise ConfigError("data.shards is not set: pass data.shards='data/{00000..00003}.tar' (or a directory)")
    if cfg.vae.family != "ours":
        raise ConfigError(f"vae.family={cfg.vae.family}: train-vae trains our CausalVAE; a pretrained VAE is used as "
                          "it is (set vae.family=ours to train one)")
    if cfg.data.latents:
        raise ConfigError("data.latents: train-vae learns from pixels, so it reads raw shards; set data.latents=false "
                          "and point data.shards at the raw shards (latent shards are what `dit encode` makes with it)")
    start = _start_from(cfg.vae.checkpoint)  # checked before any work
    if start is not None:  # config.yaml records the sizes of the VAE trained, not the YAML's
        cfg = dataclasses.replace(cfg, vae=loaded_vae_config(cfg.vae, start))
    out = Path(cfg.train.output_dir)
    # cpu=True where there is no GPU: without it accelerate forms no gloo group under torchrun, and every process
    # trains alone on every shard and writes the same RUN_DIR (measured: 2 ranks logging the same losses)
    accelerator = Accelerator(mixed_precision=mixed_precision(cfg.train.mixed_precision),
                              cpu=not torch.cuda.is_available())
    loader = build_loader(cfg.data, cfg.train.batch_size, rank=accelerator.process_index,
                          world_size=accelerator.num_processes, seed=cfg.train.seed)  # fails now on a missing shard
    set_seed(cfg.train.seed)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    vae = start if start is not None else build_vae(cfg.vae)
    opt = build_optimizer(vae.parameters(), cfg.train)  # the DiT's AdamW, train.fused_adamw included
    sched = build_lr_schedule(opt, cfg.train)
    vae, opt = accelerator.prepare(vae, opt)
    # posterior noise and image-phase frames: each rank its own draws (rank 0 draws what one process does)
    gen = torch.Generator(device="cpu").manual_seed(cfg.train.seed + accelerator.process_index)
    writer = SummaryWriter(str(out / "tensorboard-vae")) if accelerator.is_main_process else None
    data_iter = iter(loader)
    vae.train()
    progress = Progress(cfg.train.steps, desc="train-vae", every=cfg.train.log_every,
                        enabled=accelerator.is_main_process)  # a bar on a terminal, else a line every log_every
    for step in range(1, cfg.train.steps + 1):
        x = next(data_iter)["video"].to(accelerator.device)  # [B, 3, T, H, W]
        if step <= cfg.vae.image_steps:
            x = image_batch(x, gen)  # [B, 3, 1, H, W]
        with accelerator.autocast():
            recon, posterior = vae(x, generator=gen)
            loss, parts = vae_loss(recon.float(), x, posterior, cfg.vae.kl_weight, cfg.vae.l1_weight,
                                   cfg.vae.chroma_weight)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(vae.parameters(), cfg.train.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        progress.update(loss=loss.item())
        if writer is not None and (step % cfg.train.log_every == 0 or step == cfg.train.steps):
            writer.add_scalar("vae/loss", loss.item(), step)
            writer.add_scalar("vae/frames", x.shape[2], step)
            for name, value in parts.items():
                writer.add_scalar(f"vae/{name}", float(value), step)
    progress.close()
    vae = accelerator.unwrap_model(vae)
    fit_stats(vae, data_iter, stats_batches, accelerator.device)
    if writer is not None:
        writer.close()
    target = out / "vae"
    if accelerator.is_main_process:
        save_vae(vae.cpu(), target)
    accelerator.wait_for_everyone()
    return target
