"""Measure the CPU memory of training steps for `dit plan`'s test: python measure_memory.py CONFIG OVERRIDES...

Prints JSON {"measured": bytes, "estimated": bytes}: the peak resident memory of the process above what it held
after its imports, over 3 real AdamW + EMA training steps (real frozen VAE and text encoder, random latents of
the configured shape), and `dit plan`'s estimate for 1 GPU with strategy ddp."""

from __future__ import annotations

import json
import resource
import sys

import torch

from dit.config import load_config
from dit.diffusion.objectives import training_loss
from dit.distributed.parallelize import apply_activation_checkpointing
from dit.models.dit import DiT, build_dit
from dit.models.text import build_text_encoder
from dit.models.vae import build_vae
from dit.pipeline import schedule_from_config
from dit.plan import estimate, model_size
from dit.training.ema import build_ema


def rss() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def warm_runtime() -> None:
    """One training step of a minimal DiT: torch's CPU runtime (autograd engine, thread pools, oneDNN) sets itself
    up here, so that the measurement holds what the plan counts (a GPU run's runtime lives on the host)."""
    model = DiT(in_channels=4, text_dim=8, hidden_size=16, depth=1, num_heads=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    out = model(torch.randn(1, 4, 1, 2, 2), torch.rand(1), torch.randn(1, 2, 8), torch.ones(1, 2, dtype=torch.bool))
    out.square().mean().backward()
    opt.step()


def main() -> None:
    cfg = load_config(sys.argv[1], sys.argv[2:])
    torch.manual_seed(0)
    warm_runtime()
    base = rss()
    vae = build_vae(cfg.vae).requires_grad_(False)
    text = build_text_encoder(cfg.text)
    model = build_dit(cfg.model, in_channels=cfg.vae.latent_channels, text_dim=text.dim)
    if cfg.model.gradient_checkpointing:  # as dit/distributed/parallelize.py does in training
        apply_activation_checkpointing(model, cfg.model.gradient_checkpointing_every)
    ema = build_ema(model, 0.999)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    schedule = schedule_from_config(cfg.diffusion)
    size = model_size(cfg)
    b, c = cfg.train.batch_size, cfg.vae.latent_channels
    shape = (b, c, 1 + (cfg.data.frames - 1) // 4, cfg.data.height // 8, cfg.data.width // 8)
    states, mask = text.encode(["a red circle moving left"] * b)
    for step in range(3):
        loss = training_loss(model, torch.randn(shape), schedule, model_kwargs=dict(text=states, text_mask=mask))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(model, step=step)
    del vae
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    est = next(e for e in estimate(cfg, 1, 80, size=size) if e.strategy == "ddp")
    print(json.dumps({"measured": peak - base, "estimated": est.total, "params": size.params,
                      "activations": est.activations}))


if __name__ == "__main__":
    main()
