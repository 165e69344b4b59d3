"""Measure the memory of training steps for `dit plan`'s test: python measure_memory.py CONFIG OVERRIDES...

Prints JSON {"measured": bytes, "estimated": bytes, ...}: the peak of the tensor bytes live in torch's CPU allocator
over 3 real AdamW + EMA training steps (real frozen VAE and text encoder, random latents of the configured shape,
bf16 autocast when train.mixed_precision says so), which is what ``torch.cuda.max_memory_allocated`` reports on a
GPU; and `dit plan`'s estimate for 1 GPU with strategy ddp. (Not the process's resident memory: that holds
glibc's and the BLAS libraries' caches and the profiler's own, and varied by 23% between two CPUs.)"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from dit.config import load_config
from dit.diffusion.objectives import training_loss
from dit.distributed.parallelize import apply_activation_checkpointing
from dit.models.dit import build_dit
from dit.models.text import build_text_encoder
from dit.models.vae import build_vae
from dit.pipeline import schedule_from_config
from dit.plan import estimate, model_size
from dit.training.ema import build_ema


def events(nodes: list[Any]) -> Iterator[Any]:
    for node in nodes:
        yield node
        yield from events(node.children)


def peak_tensor_bytes(prof: profile) -> int:
    """The largest total of live allocator bytes the profiler saw (counted from its start), at any allocation."""
    tree = prof.profiler.kineto_results.experimental_event_tree()
    return max(n.extra_fields.total_allocated for n in events(tree) if n.tag == _EventType.Allocation)


def main() -> None:
    cfg = load_config(sys.argv[1], sys.argv[2:])
    torch.manual_seed(0)
    autocast = torch.autocast("cpu", torch.bfloat16) if cfg.train.mixed_precision == "bf16" else nullcontext()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        vae = build_vae(cfg.vae).requires_grad_(False)
        text = build_text_encoder(cfg.text)
        model = build_dit(cfg.model, in_channels=cfg.vae.latent_channels, text_dim=text.dim)
        if cfg.model.gradient_checkpointing:  # as dit/distributed/parallelize.py does in training
            apply_activation_checkpointing(model, cfg.model.gradient_checkpointing_every)
        ema = build_ema(model, 0.999)
        # foreach, as torch picks on a GPU (on CPU it defaults to a per-parameter loop, without the step's temporaries)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
        schedule = schedule_from_config(cfg.diffusion)
        b, c = cfg.train.batch_size, cfg.vae.latent_channels
        shape = (b, c, 1 + (cfg.data.frames - 1) // 4, cfg.data.height // 8, cfg.data.width // 8)
        states, mask = text.encode(["a red circle moving left"] * b)
        kwargs = dict(text=states, text_mask=mask)
        for step in range(3):
            with autocast:
                loss = training_loss(model, torch.randn(shape), schedule, model_kwargs=kwargs)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            ema.update(model, step=step)
        del vae
    # the text encoder's weights are memory-mapped from its safetensors file, outside the allocator; on a GPU they
    # are copied into it
    mapped = sum(p.numel() * p.element_size() for p in text.parameters())
    size = model_size(cfg)
    est = next(e for e in estimate(cfg, 1, 80, size=size) if e.strategy == "ddp")
    print(json.dumps({"measured": peak_tensor_bytes(prof) + mapped, "estimated": est.total, "params": size.params,
                      "activations": est.activations}))


if __name__ == "__main__":
    main()
