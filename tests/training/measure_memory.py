"""The memory of training steps, for `dit plan`'s test: python measure_memory.py [--device cuda] CONFIG OVERRIDES...
(or ``--serve``: one measurement per line of JSON arguments on stdin, each in a forked child; see ``serve``)

Prints JSON {"measured": bytes, "estimated": bytes, ...}: the peak of the tensor bytes live in torch's allocator
over 2 real AdamW + EMA training steps through train.strategy, as dit train takes them (real frozen VAE and text
encoder, random latents of the configured shape, bf16 autocast when train.mixed_precision says so), plus the text
encoder's weights (memory-mapped from their file on CPU, outside the allocator); and `dit plan`'s estimate for that
strategy over the launched processes (torchrun --nproc-per-node N measure_memory.py ...: rank 0 prints). On CPU
the peak comes from torch.profiler's memory events, the same count torch.cuda.max_memory_allocated gives on a GPU,
where "reserved" (max_memory_reserved: the caching allocator's segments) is printed too. (Not the process's resident
memory: that holds glibc's and the BLAS libraries' caches and the profiler's own, and varied by 23% between two
CPUs.)"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from dit.config import Config, load_config
from dit.diffusion.objectives import training_loss
from dit.distributed.parallelize import parallelize
from dit.distributed.setup import DistEnv, setup_distributed, teardown_distributed
from dit.models.condition import condition_mask, first_frame_condition
from dit.models.families import build_denoiser
from dit.models.lora import inject_lora
from dit.models.text import build_text_encoder
from dit.models.vae import build_vae
from dit.pipeline import schedule_from_config
from dit.plan import JOINT_TEXT, estimate, model_size
from dit.training.ema import build_ema
from dit.training.finetune import hold_frozen_base
from dit.training.metrics import profiled_allocations, profiled_events
from dit.training.optim import mixed_precision
from dit.training.step import train_step


def allocator_figures(prof: profile) -> tuple[int, int]:
    """From the profiler's allocations (the allocator's running total, counted from the profiler's start): the
    largest total, and the growth over the last forward (record_function "forward"), the activations it keeps."""
    totals = profiled_allocations(prof)
    forward = max((n for n in profiled_events(prof) if n.name == "forward"), key=lambda n: n.start_time_ns)

    def before(t: int) -> int:
        return max(((s, a) for s, a in totals if s < t), default=(0, 0))[1]

    return max(a for _, a in totals), before(forward.end_time_ns) - before(forward.start_time_ns)


def train_steps(cfg: Config, env: DistEnv) -> tuple[torch.nn.Module, int]:
    """2 training steps as dit train takes them, through the strategy train.strategy names (the second holds the
    optimizer state; a third gave the same peak, 2026-12-06); returns the text encoder (its weights stay on the CPU)
    and, on CUDA, the allocator's growth over the last forward."""
    device = env.device
    vae = build_vae(cfg.vae).requires_grad_(False).to(device)
    text = build_text_encoder(cfg.text)
    channels, temporal, spatial = cfg.vae.geometry()
    model = build_denoiser(cfg.model, in_channels=channels, text_dim=text.dim, compression=(temporal, spatial))
    lora, t = cfg.train.lora, cfg.train
    precision = mixed_precision(t.mixed_precision)  # auto resolved, as dit train does
    if lora.rank:  # as dit train sets up a LoRA run: the adapter, its base's linears in bf16, the EMA sharing the base
        inject_lora(model, lora.rank, lora.alpha, lora.dropout, lora.targets)
        hold_frozen_base(model, lora, precision, t.strategy)
    # foreach AdamW, as torch picks on a GPU (on CPU it defaults to a per-parameter loop, without the step's
    # temporaries)
    ema = build_ema(model, 0.999, share_frozen=lora.ema_shares_base(t.strategy),
                    partitioned=t.strategy.startswith("zero"))
    strategy = parallelize(model, env, cfg.train, ema=ema,
                           make_optimizer=lambda params: torch.optim.AdamW([p for p in params if p.requires_grad],
                                                                           lr=1e-4, foreach=True),
                           gradient_checkpointing=cfg.model.gradient_checkpointing,
                           mixed_precision=precision,
                           checkpoint_every=cfg.model.gradient_checkpointing_every)
    schedule = schedule_from_config(cfg.diffusion)
    b = cfg.train.batch_size
    shape = (b, channels, 1 + (cfg.data.frames - 1) // temporal, cfg.data.height // spatial, cfg.data.width // spatial)
    states, mask = text.encode(["a red circle moving left"] * b)
    kwargs = dict(text=states.to(device), text_mask=mask.to(device))
    if cfg.model.condition == "first_frame":  # every row given an image: Wan's and LTX's per-token timesteps
        first = torch.randn(b, channels, 1, *shape[3:])
        kwargs["condition"] = first_frame_condition(first, shape[2], mask=condition_mask(cfg.model)).to(device)
    growth = 0

    def micro_loss(_: int) -> torch.Tensor:
        nonlocal growth
        before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
        with torch.profiler.record_function("forward"):
            loss = training_loss(strategy.model, torch.randn(shape, device=device), schedule, model_kwargs=kwargs)
        growth = torch.cuda.memory_allocated() - before if device.type == "cuda" else 0
        return loss

    for step in range(2):
        if train_step(strategy, micro_loss).applied:
            strategy.update_ema(step)
    del vae
    return text, growth


def serve() -> None:
    """Measure on CPU for each line of stdin (a JSON list of this script's arguments) in a forked child; answer one
    line of JSON {"returncode", "stdout", "stderr"} per request. The child starts as a copy of this process, which has
    imported torch, its compiler front end (the optimizer imports it), diffusers and transformers once: a measurement
    costs a fork instead of a new interpreter's ~5-9 s of imports. The peak is counted from the child's own profiler
    start, so it is the figure a fresh process gives (tests/training/test_plan.py compares one config both ways)."""
    import diffusers  # noqa: F401  (the families' classes and text encoders, imported before the forks)
    import torch._dynamo  # noqa: F401
    import transformers  # noqa: F401

    for line in sys.stdin:
        with tempfile.TemporaryDirectory() as tmp:
            out, err = os.path.join(tmp, "out"), os.path.join(tmp, "err")
            pid = os.fork()
            if pid == 0:  # the child: its stdout and stderr to files, then one measurement
                code = 1
                signal.alarm(600)  # a hung measurement ends as a fresh one would under subprocess.run(timeout=600)
                try:
                    for fd, path in ((1, out), (2, err)):
                        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT), fd)
                    main(json.loads(line))
                    code = 0
                except SystemExit as e:
                    code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
                except BaseException:
                    import traceback

                    traceback.print_exc()
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            texts = [Path(path).read_text() if os.path.exists(path) else "" for path in (out, err)]
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status), "stdout": texts[0], "stderr": texts[1]}),
              flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    cfg, device = load_config(args.config, args.overrides), torch.device(args.device)
    # ZeRO and FSDP need a group (one process without a launcher; torchrun for more), as dit train makes it
    env = replace(setup_distributed(needs_group=cfg.train.strategy != "ddp"), device=device)
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
        text, growth = train_steps(cfg, env)
        peak = torch.cuda.max_memory_allocated() - start
        reserved = torch.cuda.max_memory_reserved() - start_reserved
    else:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            text, _ = train_steps(cfg, env)
        peak, growth = allocator_figures(prof)
    mapped = sum(p.numel() * p.element_size() for p in text.parameters())
    size = model_size(cfg)
    est = next(e for e in estimate(cfg, env.world_size, 80, size=size) if e.strategy == cfg.train.strategy)
    # the forward's growth in values per token per hidden unit per block, at the precision's bytes per value
    bytes_per_value = 4 if cfg.train.mixed_precision == "no" else 2
    stream = size.tokens + (size.text_len if cfg.model.family in JOINT_TEXT else 0)  # CogVideoX: text tokens too
    per_block = growth / (bytes_per_value * cfg.train.batch_size * stream * size.hidden * size.depth)
    if env.is_main:
        print(json.dumps({"measured": peak + mapped, "estimated": est.total, "params": size.params,
                          "activations": est.activations, "reserved": reserved and reserved + mapped,
                          "forward_activations": growth, "values_per_token_per_block": round(per_block, 2)}))
    teardown_distributed()


if __name__ == "__main__":
    serve() if sys.argv[1:] == ["--serve"] else main()
