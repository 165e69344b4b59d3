"""Training-step benchmark of our DiT (a tool, not a test): forward, backward and AdamW step on synthetic latents.

    .venv/bin/python tools/bench_train.py --preset DiT-S/2 --shape 17x128x128 --batch 4 --compare diffusers \\
        --dtype fp32 --json bench_train.json
    python tools/bench_train.py --preset DiT-XL/2 --shape 33x256x256 --batch 2 --dtype bf16 --device cuda --json x.json

Clips of T frames of H x W pixels give latents [B, C, 1 + (T-1)/4, H/8, W/8] (the VAE's compression, from
data_pipelines/config.py; the VAE is not run), random timesteps and random text states [B, L, D_text] with a mask
(one sample padded to half length). The loss is the MSE against a random target. bf16 means
``torch.autocast(device, torch.bfloat16)`` around forward and loss, fp32 weights and AdamW (mixed precision).

Reported: samples/s, tokens/s, achieved TFLOP/s from the analytic count (dit/models/flops.py: 3 x forward), MFU
against a matmul peak measured in the same run (a square matmul loop in the benchmark's dtype, before and after
the steps, the better of the two) and, on CUDA, the vendor bf16 figure (dit/training/metrics.py); peak memory
(CUDA max allocated; on CPU the process's RSS high-water; "added" = the peak less the memory before the model was
built: on CPU the allocator keeps freed memory, so the second model's figure is an underestimate), and the
activation memory (tensors saved for backward in one forward, counted through saved_tensors_hooks: the same for
any order and allocator).

``--compile ours|both`` compiles each transformer block in place (``block.compile()``, as ``model.compile=true``
does in training) after the FLOPs are counted; the warm-up steps include the compilation.
``--fused-adamw`` uses AdamW(fused=True) for both models.
``--fused-qkv`` gives our DiT's self-attention one q/k/v projection (``model.fused_qkv=true``): the same FLOPs in one
GEMM instead of two.
``--lora R`` trains rank-R adapters on our DiT instead of all its weights; ``--lora-base bf16`` holds the frozen
base's block linears in bf16 (train.lora.base_dtype=auto in a bf16 DDP run), ``--lora-base fp8`` their weights in
fp8 with row scales (train.lora.base_dtype=fp8, dit/models/fp8.py): what that saves or costs per step.
``--checkpoint-every K`` recomputes every K-th block of our DiT in the backward pass (as
``model.gradient_checkpointing=true model.gradient_checkpointing_every=K``): less activation memory for about
1/K more forward work, which the FLOP count (model FLOPs) does not include.

``--compare diffusers`` builds diffusers' WanTransformer3DModel at the same width, depth, heads, MLP width, patch,
latent channels and text width, and times it in the same process, dtype and autocast setting, one step of each
model in turn (so that other load on the machine hits both alike). Both models' FLOPs are then counted the same
way, FlopCounterMode on one forward x 3, and ``ratio`` = our achieved FLOP/s / theirs.
Timing: time.perf_counter around each step after ``--warmup`` steps (torch.cuda.synchronize on a GPU); the median
step time is reported, every step time is in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipelines.config import latent_shape as clip_latent_shape  # noqa: E402
from dit.config import ATTENTION_BACKENDS, LoraConfig  # noqa: E402
from dit.distributed.parallelize import apply_activation_checkpointing  # noqa: E402
from dit.models.attention import resolve_backend  # noqa: E402
from dit.models.dit import DiT  # noqa: E402
from dit.models.flops import counted_forward_flops, dit_config, train_step_flops  # noqa: E402
from dit.models.lora import inject_lora  # noqa: E402
from dit.plan import ModelSize, activation_bytes  # noqa: E402
from dit.training.finetune import hold_frozen_base  # noqa: E402
from dit.training.metrics import saved_tensor_bytes  # noqa: E402

Batch = dict[str, torch.Tensor]


# ---- machine ---------------------------------------------------------------------------------------------------
def parse_shape(text: str) -> tuple[int, int, int]:
    m = re.fullmatch(r"(\d+)x(\d+)x(\d+)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"--shape wants FRAMESxHEIGHTxWIDTH, e.g. 17x128x128, got {text!r}")
    return int(m[1]), int(m[2]), int(m[3])


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical CPUs)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (other jobs on the machine move the timings), None where unknown."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def cpu_has(flag: str) -> bool:
    try:
        return f" {flag}" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def rss_peak_bytes() -> int:
    """This process's RSS high-water (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def reset_peak_memory(device: torch.device) -> bool:
    """Start a fresh peak: CUDA's counter, or Linux's VmHWM (writing 5 to clear_refs); False if it can't."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_memory(device: torch.device) -> int:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else rss_peak_bytes()


def current_memory(device: torch.device) -> int:
    """Allocated CUDA memory, or this process's resident set (VmRSS)."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, size: int, seconds: float = 1.0) -> float:
    """Best FLOP/s of a size x size matmul in ``dtype`` over a few timed runs of about ``seconds`` in all."""
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=g).to(device, dtype)
    b = torch.randn(size, size, generator=g).to(device, dtype)
    out = a @ b
    sync(device)
    t0 = time.perf_counter()
    out = a @ b
    sync(device)
    one = max(time.perf_counter() - t0, 1e-6)
    iters = max(1, int(seconds / 5 / one))
    best = 0.0
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            out = torch.matmul(a, b, out=out)
        sync(device)
        best = max(best, 2 * size**3 * iters / (time.perf_counter() - t0))
    return best


def vendor_peak_flops(device: torch.device) -> float | None:
    try:
        from dit.training.metrics import peak_flops
    except ImportError:  # pragma: no cover - the library moved
        return None
    return peak_flops(device)


# ---- the models and one training step --------------------------------------------------------------------------
def synthetic_batch(batch: int, channels: int, grid: tuple[int, int, int], text_len: int, text_dim: int,
                    device: torch.device, seed: int) -> Batch:
    g = torch.Generator(device="cpu").manual_seed(seed)
    mask = torch.ones(batch, text_len, dtype=torch.bool)
    mask[-1, max(1, text_len // 2):] = False  # one padded prompt
    data = dict(x=torch.randn(batch, channels, *grid, generator=g),
                target=torch.randn(batch, channels, *grid, generator=g),
                t=torch.randint(0, 1000, (batch,), generator=g),
                text=torch.randn(batch, text_len, text_dim, generator=g), text_mask=mask)
    return {k: v.to(device) for k, v in data.items()}


def wan_equivalent(cfg: dict[str, Any]) -> nn.Module:
    """diffusers' WanTransformer3DModel at our DiT's width, depth, heads, MLP width, patch and channels."""
    from diffusers import WanTransformer3DModel

    d, heads = cfg["hidden_size"], cfg["num_heads"]
    return WanTransformer3DModel(patch_size=tuple(cfg["patch_size"]), num_attention_heads=heads,
                                 attention_head_dim=d // heads, in_channels=cfg["in_channels"],
                                 out_channels=cfg["in_channels"], text_dim=cfg["text_dim"],
                                 ffn_dim=int(d * cfg["mlp_ratio"]), num_layers=cfg["depth"])


def wan_forward(model: nn.Module) -> Callable[[Batch], torch.Tensor]:
    def fwd(b: Batch) -> torch.Tensor:  # text zeroed after the prompt, as WanPipeline pads (dit/models/families)
        text = b["text"] * b["text_mask"][..., None].to(b["text"].dtype)
        return model(hidden_states=b["x"], timestep=b["t"].float(), encoder_hidden_states=text, return_dict=False)[0]
    return fwd


def dit_forward(model: nn.Module) -> Callable[[Batch], torch.Tensor]:
    return lambda b: model(b["x"], b["t"], b["text"], b["text_mask"])


class Trainer:
    """One model's training step: autocast forward + MSE loss, backward, AdamW step."""

    def __init__(self, name: str, model: nn.Module, forward: Callable[[Batch], torch.Tensor], device: torch.device,
                 bf16: bool, fused_adamw: bool = False) -> None:
        self.name, self.model, self.forward, self.device, self.bf16 = name, model, forward, device, bf16
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=fused_adamw or None)
        self.times: list[float] = []
        self.cpu_times: list[float] = []  # process CPU seconds (all threads) per step
        self.params = sum(p.numel() for p in model.parameters())
        self.param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self.flops_counted = 0
        self.memory_before, self.peak_memory = 0, None
        self.activation_bytes = 0

    def step(self, batch: Batch) -> float:
        sync(self.device)
        c0, t0 = time.process_time(), time.perf_counter()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = torch.nn.functional.mse_loss(self.forward(batch).float(), batch["target"])
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        sync(self.device)
        self.last_cpu = time.process_time() - c0
        return time.perf_counter() - t0

    def saved_activation_bytes(self, batch: Batch) -> int:
        """Bytes of the tensors autograd saves for backward in one forward (parameters excluded; storages counted
        once): the activation memory, independent of the allocator and of what ran before in this process."""
        def forward_loss() -> torch.Tensor:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                return torch.nn.functional.mse_loss(self.forward(batch).float(), batch["target"])

        loss, nbytes = saved_tensor_bytes(forward_loss, exclude=self.model.parameters())
        loss.backward()
        self.model.zero_grad(set_to_none=True)
        return nbytes

    def counted_forward_flops(self, batch: Batch) -> int:
        """FlopCounterMode's count of one forward; through torch SDPA (which it counts) rather than xformers."""
        backend = getattr(self.model, "attention_backend", None)
        if backend is not None:
            self.model.attention_backend = "sdpa"
        try:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                return counted_forward_flops(self.forward, batch)
        finally:
            if backend is not None:
                self.model.attention_backend = backend


def plan_activation_gb(family: str, cfg: dict[str, Any], tokens: int, text_len: int, batch: int, bf16: bool,
                       checkpoint_every: int = 0) -> float:
    """`dit plan`'s activation term (dit/plan.py) for this model and batch, to set beside the saved bytes."""
    size = ModelSize(params=0, frozen=0, hidden=cfg["hidden_size"], depth=cfg["depth"], heads=cfg["num_heads"],
                     tokens=tokens, text_len=text_len)
    return activation_bytes(size, batch, family, bf16, checkpoint_every > 0,
                            checkpoint_every=max(checkpoint_every, 1)) / 2**30


def build_trainer(name: str, cfg: dict[str, Any], device: torch.device, bf16: bool,
                  fused_adamw: bool = False, fused_qkv: bool = False, lora: int = 0,
                  lora_base: str = "fp32") -> Trainer:
    """The step of our DiT ("ours") or of diffusers' Wan equivalent ("diffusers") at the same config;
    ``fused_qkv``: our DiT's self-attention q and kv as one layer (model.fused_qkv); ``lora``: rank of adapters on
    our DiT's default targets (train.lora.rank), its frozen base in ``lora_base`` (train.lora.base_dtype)."""
    if name == "ours":
        model = DiT(**cfg).to(device)
        if fused_qkv:
            model.fuse_qkv()
        if lora:
            inject_lora(model, lora)
            base_dtype = {"fp32": "fp32", "bf16": "auto", "fp8": "fp8"}[lora_base]  # as dit train holds the base
            hold_frozen_base(model, LoraConfig(rank=lora, base_dtype=base_dtype), "bf16" if bf16 else "no", "ddp")
        return Trainer("ours", model, dit_forward(model), device, bf16, fused_adamw)
    model = wan_equivalent(cfg).to(device)
    return Trainer("diffusers", model, wan_forward(model), device, bf16, fused_adamw)


def summary(times: list[float], cpu_times: list[float], flops_per_step: float, batch: int, tokens: int,
            peak: float, vendor: float | None) -> dict[str, Any]:
    step = statistics.median(times)
    achieved = flops_per_step / step
    return dict(step_time_s=step, step_time_mean_s=statistics.fmean(times), step_times_s=times,
                step_cpu_s=statistics.median(cpu_times), step_cpu_times_s=cpu_times,
                samples_per_s=batch / step, tokens_per_s=batch * tokens / step, achieved_tflops=achieved / 1e12,
                mfu=achieved / peak, mfu_vendor=achieved / vendor if vendor else None)


# ---- main ------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="DiT-S/2", help="a name in dit/models/presets.py")
    p.add_argument("--shape", type=parse_shape, default=(17, 128, 128), help="FRAMESxHEIGHTxWIDTH of the clips")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--compare", choices=["none", "diffusers"], default="none")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--steps", type=int, default=5, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--text-len", type=int, default=32, help="text tokens per prompt (text.max_length's default)")
    p.add_argument("--text-dim", type=int, default=384, help="text encoder width (MiniLM's 384)")
    p.add_argument("--latent-channels", type=int, default=4)
    p.add_argument("--matmul-size", type=int, default=0, help="side of the peak matmul (0: 2048 CPU, 8192 CUDA)")
    p.add_argument("--attention", default="auto", choices=ATTENTION_BACKENDS,
                   help="our DiT's attention kernel, as model.attention")
    p.add_argument("--compile", choices=["none", "ours", "both"], default="none",
                   help="torch.compile each transformer block (as model.compile=true) of our DiT, or of both models")
    p.add_argument("--fused-adamw", action="store_true",
                   help="AdamW(fused=True) for both models (default: torch's default, as dit/training/optim.py)")
    p.add_argument("--fused-qkv", action="store_true",
                   help="our DiT's self-attention q and kv projections as one layer (model.fused_qkv=true)")
    p.add_argument("--lora", type=int, default=0, metavar="R",
                   help="LoRA adapters of rank R on our DiT (train.lora.rank); FLOPs stay the 3 x forward count")
    p.add_argument("--lora-base", choices=["fp32", "bf16", "fp8"], default="fp32",
                   help="with --lora: the frozen base as loaded, its blocks' linear layers in bf16 (bf16 only), or "
                        "their weights in fp8 e4m3 with row scales")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="K",
                   help="activation checkpointing of every K-th block of our DiT (0: none)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.checkpoint_every < 0:
        p.error(f"--checkpoint-every must be >= 0 (0: no checkpointing), got {args.checkpoint_every}")
    if args.lora_base == "bf16" and not (args.lora and args.dtype == "bf16"):
        p.error("--lora-base bf16 holds the base as bf16 autocast computes it: give --lora R and --dtype bf16")
    if args.lora_base == "fp8" and not args.lora:
        p.error("--lora-base fp8 holds a LoRA run's frozen base in fp8: give --lora R")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = resolve_device(args.device)
    try:  # a kernel this device lacks: one line, before any work
        resolve_backend(args.attention, device)
    except RuntimeError as e:
        raise SystemExit(f"bench_train: {e}") from None
    bf16 = args.dtype == "bf16"
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    load_start = load_average()
    grid = clip_latent_shape(*args.shape)
    cfg = dict(dit_config(args.preset, in_channels=args.latent_channels, text_dim=args.text_dim),
               attention=args.attention)
    pt, ph, pw = cfg["patch_size"]
    tokens = (grid[0] // pt) * (grid[1] // ph) * (grid[2] // pw)
    batch = synthetic_batch(args.batch, args.latent_channels, grid, args.text_len, args.text_dim, device, args.seed)
    flops = train_step_flops(cfg, grid, args.text_len, args.batch)

    matmul_dtype, matmul_size = torch.bfloat16 if bf16 else torch.float32, args.matmul_size or (
        8192 if device.type == "cuda" else 2048)
    peak = matmul_peak_flops(device, matmul_dtype, matmul_size)
    vendor = vendor_peak_flops(device)
    print(f"{device_name(device)}: {args.dtype} matmul peak {peak / 1e12:.3f} TFLOP/s measured"
          + (f", vendor bf16 {vendor / 1e12:.0f}" if vendor else ""), flush=True)

    trainers = []
    for name in ["ours"] + (["diffusers"] if args.compare == "diffusers" else []):
        torch.manual_seed(args.seed)
        reset = reset_peak_memory(device)
        memory_before = current_memory(device)
        tr = build_trainer(name, cfg, device, bf16, args.fused_adamw, args.fused_qkv, args.lora, args.lora_base)
        model = tr.model
        tr.memory_before = memory_before
        if args.checkpoint_every and name == "ours":  # before compile, as in training
            apply_activation_checkpointing(model, args.checkpoint_every)
        tr.flops_counted = 3 * tr.counted_forward_flops(batch)  # eager, before any compile
        tr.activation_bytes = tr.saved_activation_bytes(batch)
        if args.compile == "both" or (args.compile == "ours" and name == "ours"):
            for block in model.blocks:  # as dit/distributed/parallelize.py's apply_compile: each block in place
                block.compile()
        for _ in range(args.warmup):  # the peak memory of this model's warm-up steps (optimizer state included)
            tr.step(batch)
        tr.peak_memory = peak_memory(device) if reset or name == "ours" else None
        trainers.append(tr)
        print(f"{name}: {tr.params / 1e6:.1f}M params, warmed up", flush=True)
    for _ in range(args.steps):  # one step of each in turn
        for tr in trainers:
            tr.times.append(tr.step(batch))
            tr.cpu_times.append(tr.last_cpu)

    peak = max(peak, matmul_peak_flops(device, matmul_dtype, matmul_size))  # before and after: the better one
    ours = trainers[0]
    result: dict[str, Any] = dict(
        tool="bench_train", date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        device=str(device), device_name=device_name(device), torch=torch.__version__,
        threads=torch.get_num_threads(), load_average_start=load_start, load_average_end=load_average(),
        cpu_bf16=cpu_has("avx512_bf16") or cpu_has("amx_bf16"),
        preset=args.preset, shape=list(args.shape), latent_shape=[args.latent_channels, *grid], batch=args.batch,
        tokens_per_sample=tokens, text_len=args.text_len, text_dim=args.text_dim, dtype=args.dtype,
        autocast=bf16, fused_adamw=args.fused_adamw, fused_qkv=args.fused_qkv, compile=args.compile, steps=args.steps,
        lora=args.lora, lora_base=args.lora_base if args.lora else None,
        checkpoint_every=args.checkpoint_every, attention=args.attention,
        warmup=args.warmup, params=ours.params, param_bytes=ours.param_bytes,
        flops_per_step=flops, flops_per_step_counted=ours.flops_counted,
        flops_method="analytic (dit/models/flops.py): 3 x forward matmul FLOPs",
        peak_tflops_measured=peak / 1e12, peak_matmul=f"{args.dtype} {matmul_size}x{matmul_size}, best of the runs "
        "before and after the steps",
        peak_tflops_vendor=vendor / 1e12 if vendor else None,
        peak_memory_bytes=ours.peak_memory, peak_memory_gb=ours.peak_memory / 2**30,
        peak_memory_added_gb=(ours.peak_memory - ours.memory_before) / 2**30,
        activation_gb=ours.activation_bytes / 2**30,
        plan_activation_gb=plan_activation_gb("dit", cfg, tokens, args.text_len, args.batch, bf16,
                                              args.checkpoint_every),
        activation_kind="tensors saved for backward in one eager forward (saved_tensors_hooks), parameters excluded",
        peak_memory_kind=("torch.cuda.max_memory_allocated" if device.type == "cuda" else "process RSS high-water")
        + " over the warm-up steps; added = peak - memory before the model was built",
        **summary(ours.times, ours.cpu_times, flops, args.batch, tokens, peak, vendor))
    if args.compare == "diffusers":
        theirs = trainers[1]
        mine = summary(ours.times, ours.cpu_times, ours.flops_counted, args.batch, tokens, peak, vendor)
        other = summary(theirs.times, theirs.cpu_times, theirs.flops_counted, args.batch, tokens, peak, vendor)
        result["compare"] = dict(
            model="diffusers.WanTransformer3DModel", config=dict(theirs.model.config), params=theirs.params,
            flops_per_step=theirs.flops_counted, peak_memory_bytes=theirs.peak_memory,
            peak_memory_gb=theirs.peak_memory / 2**30 if theirs.peak_memory else None,
            peak_memory_added_gb=(theirs.peak_memory - theirs.memory_before) / 2**30 if theirs.peak_memory else None,
            activation_gb=theirs.activation_bytes / 2**30,
            plan_activation_gb=plan_activation_gb("wan", cfg, tokens, args.text_len, args.batch, bf16),
            **other)
        result["ratio"] = mine["achieved_tflops"] / other["achieved_tflops"]
        result["ratio_method"] = ("both models' FLOPs from FlopCounterMode on one forward x 3 (same method), "
                                  "median step times, steps interleaved")
        result["ratio_samples_per_s"] = other["step_time_s"] / mine["step_time_s"]
        # the same ratio from process CPU seconds per step: steadier where other jobs share the cores
        result["ratio_cpu_time"] = ((ours.flops_counted / mine["step_cpu_s"])
                                    / (theirs.flops_counted / other["step_cpu_s"]))
    for name, r in [("ours", result)] + ([("diffusers", result["compare"])] if "compare" in result else []):
        print(f"{name}: {r['step_time_s']:.3f} s/step, {r['samples_per_s']:.2f} samples/s, "
              f"{r['tokens_per_s']:.0f} tokens/s, {r['achieved_tflops'] * 1e3:.1f} GFLOP/s, MFU {r['mfu']:.1%}, "
              f"peak memory {r['peak_memory_gb'] or float('nan'):.2f} GiB "
              f"(+{r['peak_memory_added_gb'] or float('nan'):.2f} for this model), "
              f"activations saved for backward {r['activation_gb']:.3f} GiB")
    if "ratio" in result:
        print(f"ratio (our achieved FLOP/s / diffusers'): {result['ratio']:.3f} (from CPU time per step: "
              f"{result['ratio_cpu_time']:.3f})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=str) + "\n")
    return result


if __name__ == "__main__":
    main()
