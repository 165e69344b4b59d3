"""The memory of training steps, for `dit plan`'s test: python measure_memory.py [--device cuda] CONFIG OVERRIDES...

Prints JSON {"measured": bytes, "estimated": bytes, ...}: the peak of the tensor bytes live in torch's allocator
over 3 real AdamW + EMA training steps (real frozen VAE and text encoder, random latents of the configured shape,
bf16 autocast when train.mixed_precision says so), plus the text encoder's weights (memory-mapped from their file on
CPU, outside the allocator); and `dit plan`'s estimate for 1 GPU with strategy ddp. On CPU the peak comes from
torch.profiler's memory events, the same count torch.cuda.max_memory_allocated gives on a GPU, where "reserved"
(max_memory_reserved: the caching allocator's segments) is printed too. (Not the process's resident memory: that
holds glibc's and the BLAS libraries' caches and the profiler's own, and varied by 23% between two CPUs.)"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from dit.config import Config, load_config
from dit.diffusion.objectives import training_loss
from dit.distributed.parallelize import apply_activation_checkpointing
from dit.models.families import build_denoiser
from dit.models.text import build_text_encoder
from dit.models.vae import build_vae
from dit.pipeline import schedule_from_config
from dit.plan import JOINT_TEXT, estimate, model_size
from dit.training.ema import build_ema


def events(nodes: list[Any]) -> Iterator[Any]:
    for node in nodes:
        yield node
        yield from events(node.children)


def allocator_figures(prof: profile) -> tuple[int, int]:
    """From the profiler's allocations (the allocator's running total, counted from the profiler's start): the
    largest total, and the growth over the last forward (record_function "forward"), the activations it keeps."""
    nodes = list(events(prof.profiler.kineto_results.experimental_event_tree()))
    totals = sorted((n.start_time_ns, n.extra_fields.total_allocated) for n in nodes if n.tag == _EventType.Allocation)
    forward = max((n for n in nodes if n.name == "forward"), key=lambda n: n.start_time_ns)

    def before(t: int) -> int:
        return max(((s, a) for s, a in totals if s < t), default=(0, 0))[1]

    return max(a for _, a in totals), before(forward.end_time_ns) - before(forward.start_time_ns)


def train_steps(cfg: Config, device: torch.device) -> tuple[torch.nn.Module, int]:
    """3 training steps as dit train takes them; returns the text encoder (its weights stay on the CPU) and, on
    CUDA, the allocator's growth over the last forward."""
    autocast = torch.autocast(device.type, torch.bfloat16) if cfg.train.mixed_precision == "bf16" else nullcontext()
    vae = build_vae(cfg.vae).requires_grad_(False).to(device)
    text = build_text_encoder(cfg.text)
    channels, temporal, spatial = cfg.vae.geometry()
    model = build_denoiser(cfg.model, in_channels=channels, text_dim=text.dim, compression=(temporal, spatial))
    model = model.to(device)
    if cfg.model.gradient_checkpointing:  # as dit/distributed/parallelize.py does in training
        apply_activation_checkpointing(model, cfg.model.gradient_checkpointing_every)
    ema = build_ema(model, 0.999)
    # foreach, as torch picks on a GPU (on CPU it defaults to a per-parameter loop, without the step's temporaries)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    schedule = schedule_from_config(cfg.diffusion)
    b = cfg.train.batch_size
    shape = (b, channels, 1 + (cfg.data.frames - 1) // temporal, cfg.data.height // spatial, cfg.data.width // spatial)
    states, mask = text.encode(["a red circle moving left"] * b)
    kwargs = dict(text=states.to(device), text_mask=mask.to(device))
    growth = 0
    for step in range(3):
        before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
        with autocast, torch.profiler.record_function("forward"):
            loss = training_loss(model, torch.randn(shape, device=device), schedule, model_kwargs=kwargs)
        growth = torch.cuda.memory_allocated() - before if device.type == "cuda" else 0
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(model, step=step)
    del vae
    return text, growth


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg, device = load_config(args.config, args.overrides), torch.device(args.device)
    torch.manual_seed(0)
    reserved = None
    if device.type == "cuda":
        for dtype in (torch.float32, torch.bfloat16):  # cuBLAS's workspaces (tens of MiB), as the CUDA context, first
            a = torch.ones(64, 64, device=device, dtype=dtype, requires_grad=True)
            (a @ a).sum().backward()
        del a
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start, start_reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
        text, growth = train_steps(cfg, device)
        peak = torch.cuda.max_memory_allocated() - start
        reserved = torch.cuda.max_memory_reserved() - start_reserved
    else:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            text, _ = train_steps(cfg, device)
        peak, growth = allocator_figures(prof)
    mapped = sum(p.numel() * p.element_size() for p in text.parameters())
    size = model_size(cfg)
    est = next(e for e in estimate(cfg, 1, 80, size=size) if e.strategy == "ddp")
    # the forward's growth in values per token per hidden unit per block, at the precision's bytes per value
    bytes_per_value = 4 if cfg.train.mixed_precision == "no" else 2
    stream = size.tokens + (size.text_len if cfg.model.family in JOINT_TEXT else 0)  # CogVideoX: text tokens too
    per_block = growth / (bytes_per_value * cfg.train.batch_size * stream * size.hidden * size.depth)
    print(json.dumps({"measured": peak + mapped, "estimated": est.total, "params": size.params,
                      "activations": est.activations, "reserved": reserved and reserved + mapped,
                      "forward_activations": growth, "values_per_token_per_block": round(per_block, 2)}))


if __name__ == "__main__":
    main()
