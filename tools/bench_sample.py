"""Sampling benchmark (a tool, not a test): DDIM (or ``--sampler``) with classifier-free guidance on a randomly
initialised DiT, then
our causal VAE's decode, with and without chunked (temporal tiling) decode.

    .venv/bin/python tools/bench_sample.py --preset DiT-S/2 --shape 17x128x128 --steps 50 --cfg 5 --json s.json
    python tools/bench_sample.py --preset DiT-XL/2 --shape 33x256x256 --dtype bf16 --device cuda --json s.json

The sampler is the project's: ``dit.diffusion.samplers.ddim`` (``--sampler``: any in that module's ``SAMPLERS``;
the flow ones at shift 3, ``cogvideox_dpm`` with its noise draws) over ``dit.diffusion.guidance.cfg_denoiser`` (one
model call on the batch [x; x] per step), as ``dit.pipeline.generate`` runs it, with random text states in place of
a text encoder. Weights are random (the DiT's adaLN-Zero output layer is re-drawn so the sample is not all zeros):
speed does not depend on them.

Reported:
- ``clips_per_s``: clips per second of sampling (latents), and ``clips_per_s_with_decode`` with the full VAE decode;
- ``overhead`` = (sampling time - pure model time) / model time, where the model time is the same number of
  forwards (``--steps``) of the bare model at the same batch (2B with CFG) on the same inputs: what the sampler,
  the guidance (concatenation, combination) and the schedule arithmetic add. In each of ``--repeats`` runs,
  after each sampler step one bare forward runs, timed apart, so that other load on the machine hits both alike;
- VAE decode time and peak memory, full (``chunk_size=0``) and chunked (``--decode-chunk`` latent frames at a
  time, ``CausalVAE.decode(z, chunk_size=)`` as ``dit sample --decode-chunk``). On CUDA the peak is
  torch.cuda.max_memory_allocated above what was allocated before; on CPU each decode runs in a fresh process and
  the peak is its RSS high-water (VmHWM) above its resident set before the decode.

``--compile`` runs each DiT block through torch.compile (as ``dit sample --compile``), compiled in the warm-up; the
bare forwards use the compiled blocks too, so its gain is ``sample_time_s`` against a run without it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import (  # noqa: E402
    current_memory,
    device_name,
    load_average,
    parse_shape,
    peak_memory,
    reset_peak_memory,
    resolve_device,
    sync,
)

from data_pipelines.config import latent_shape as clip_latent_shape  # noqa: E402
from dit.config import ATTENTION_BACKENDS  # noqa: E402
from dit.diffusion.cuda_graphs import CudaGraphed  # noqa: E402
from dit.diffusion.guidance import cfg_denoiser  # noqa: E402
from dit.diffusion.samplers import SAMPLERS  # noqa: E402
from dit.diffusion.schedules import make_schedule  # noqa: E402
from dit.models.attention import resolve_backend  # noqa: E402
from dit.models.dit import DiT  # noqa: E402
from dit.models.flops import dit_config, dit_forward_flops  # noqa: E402
from dit.models.vae import CausalVAE  # noqa: E402


def build_vae(args: argparse.Namespace, device: torch.device) -> CausalVAE:
    torch.manual_seed(args.seed + 1)
    return CausalVAE(latent_channels=args.latent_channels, base_channels=args.vae_base_channels).to(device).eval()


def time_decode(vae: CausalVAE, z: torch.Tensor, chunk: int, repeats: int, device: torch.device) -> dict[str, Any]:
    """Best-of-``repeats`` decode time and the peak memory added by the decodes."""
    sync(device)
    before = current_memory(device)
    reset = reset_peak_memory(device)
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            video = vae.decode(z, chunk_size=chunk)
            sync(device)
            times.append(time.perf_counter() - t0)
    del video
    added = peak_memory(device) - before if reset else None
    return dict(chunk_size=chunk, time_s=min(times), times_s=times, peak_memory_added_bytes=added,
                peak_memory_added_gb=added / 2**30 if added is not None else None)


def decode_child(args: argparse.Namespace) -> None:
    """--vae-child CHUNK: one decode measurement in this fresh process; prints its JSON line."""
    device = resolve_device(args.device)
    vae = build_vae(args, device)
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    z = torch.randn(args.batch, args.latent_channels, *clip_latent_shape(*args.shape), generator=g).to(device)
    print(json.dumps(time_decode(vae, z, args.vae_child, args.decode_repeats, device)))


def decode_in_child(chunk: int) -> dict[str, Any]:
    argv = [a for a in sys.argv[1:]]
    if "--json" in argv:
        i = argv.index("--json")
        del argv[i:i + 2]
    out = subprocess.run([sys.executable, __file__, *argv, "--vae-child", str(chunk)], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="DiT-S/2", help="a name in dit/models/presets.py")
    p.add_argument("--shape", type=parse_shape, default=(17, 128, 128), help="FRAMESxHEIGHTxWIDTH of the clips")
    p.add_argument("--batch", type=int, default=1, help="clips per sampling call")
    p.add_argument("--steps", type=int, default=50, help="sampler steps")
    p.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS), help="which of dit sample's samplers")
    p.add_argument("--cfg", type=float, default=5.0, help="guidance scale (1: no CFG, batch B instead of 2B)")
    p.add_argument("--repeats", type=int, default=2, help="timed sampling runs (each with a pure-model run)")
    p.add_argument("--warmup", type=int, default=2, help="untimed model forwards first")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast around the sampling")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--attention", default="auto", choices=ATTENTION_BACKENDS,
                   help="the DiT's attention kernel, as model.attention")
    p.add_argument("--cuda-graphs", action="store_true", help="the sampler's model calls from a CUDA graph")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each DiT block in place (as `dit sample --compile`); the warm-up compiles")
    p.add_argument("--text-len", type=int, default=32)
    p.add_argument("--text-dim", type=int, default=384)
    p.add_argument("--latent-channels", type=int, default=4)
    p.add_argument("--vae-base-channels", type=int, default=32, help="our CausalVAE's width (vae.base_channels)")
    p.add_argument("--decode-chunk", type=int, default=1, help="latent frames per chunk of the chunked decode")
    p.add_argument("--decode-repeats", type=int, default=2, help="decodes per variant (the best is reported)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--vae-child", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.vae_child is not None:
        decode_child(args)
        return None
    device = resolve_device(args.device)
    try:  # a kernel this device lacks: one line, before any work
        resolve_backend(args.attention, device)
    except RuntimeError as e:
        raise SystemExit(f"bench_sample: {e}") from None
    if args.cuda_graphs and device.type != "cuda":
        raise SystemExit(f"bench_sample: --cuda-graphs needs a CUDA device, not {device}")
    if args.cuda_graphs and args.compile:
        raise SystemExit("bench_sample: --cuda-graphs and --compile: use one of them (as `dit sample`)")
    if args.compile and args.warmup < 1:
        raise SystemExit("bench_sample: --compile needs --warmup >= 1 (the warm-up compiles, untimed)")
    bf16 = args.dtype == "bf16"
    load_start = load_average()
    grid = clip_latent_shape(*args.shape)
    cfg = dict(dit_config(args.preset, in_channels=args.latent_channels, text_dim=args.text_dim),
               attention=args.attention)
    torch.manual_seed(args.seed)
    model = DiT(**cfg).to(device).eval()
    with torch.no_grad():  # adaLN-Zero starts at zero output: give the final layer weights (speed is the same)
        torch.nn.init.normal_(model.final.linear.weight, std=0.02)
    if args.compile:  # as dit/distributed/parallelize.py's apply_compile: each block in place
        for block in model.blocks:
            block.compile()
    schedule = make_schedule("linear", 1000)
    B, L = args.batch, args.text_len
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    noise = torch.randn(B, args.latent_channels, *grid, generator=g).to(device)
    mask = torch.ones(B, L, dtype=torch.bool, device=device)
    empty = torch.zeros(B, L, dtype=torch.bool, device=device)
    empty[:, :2] = True  # the empty prompt: [CLS] [SEP]
    cond = dict(text=torch.randn(B, L, args.text_dim, generator=g).to(device), text_mask=mask)
    uncond = dict(text=torch.randn(B, L, args.text_dim, generator=g).to(device), text_mask=empty)
    # --cuda-graphs: the sampler's model calls replay a CUDA graph (as `dit sample --cuda-graphs`); the bare
    # forwards stay eager, so the overhead shows what the graphs save (negative when they pay)
    denoise = cfg_denoiser(CudaGraphed(model) if args.cuda_graphs else model, cond, uncond, args.cfg)
    # the bare model's inputs for the same call: the CFG batch [x; x] with cond and uncond text
    guided = args.cfg != 1
    model_x = torch.cat([noise, noise]) if guided else noise
    model_t = torch.full((model_x.shape[0],), 500, dtype=torch.long, device=device)
    model_text = torch.cat([cond["text"], uncond["text"]]) if guided else cond["text"]
    model_mask = torch.cat([mask, empty]) if guided else mask
    forward_batch = model_x.shape[0]

    def autocast() -> torch.autocast:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def forward() -> float:
        sync(device)
        t0 = time.perf_counter()
        model(model_x, model_t, model_text, model_mask)
        sync(device)
        return time.perf_counter() - t0

    def run_sampler(fn: Any, x: torch.Tensor, callback: Any) -> torch.Tensor:
        sampler = SAMPLERS[args.sampler]
        if args.sampler.startswith("flow_"):
            return sampler(fn, x, steps=args.steps, shift=3.0, callback=callback)
        kwargs: dict[str, Any] = dict(steps=args.steps, prediction="eps", callback=callback)
        if args.sampler in ("ddim", "ddpm", "cogvideox_dpm"):
            kwargs["generator"] = torch.Generator(device=x.device).manual_seed(args.seed)
        return sampler(fn, x, schedule, **kwargs)

    def run_interleaved() -> tuple[list[float], list[float], torch.Tensor]:
        """One sampler run; after each of its steps one bare forward, timed apart: (step times, forward times,
        z)."""
        steps, forwards = [], []
        mark = [0.0]

        def after_step(i: int, x: torch.Tensor) -> None:
            sync(device)
            steps.append(time.perf_counter() - mark[0])
            forwards.append(forward())
            mark[0] = time.perf_counter()

        with torch.no_grad(), autocast():
            sync(device)
            mark[0] = time.perf_counter()
            z = run_sampler(denoise, noise, after_step)
        return steps, forwards, z

    with torch.no_grad(), autocast():
        for _ in range(args.warmup):
            forward()
        if args.cuda_graphs:  # the capture (and its own warm-up) happens here, untimed
            denoise(noise, model_t[:B])
    before = current_memory(device)
    reset = reset_peak_memory(device)
    step_times: list[float] = []
    model_times: list[float] = []
    overheads = []
    z = noise
    for _ in range(args.repeats):
        st, mt, z = run_interleaved()
        step_times += st
        model_times += mt
        overheads.append((sum(st) - sum(mt)) / sum(mt))
    sampling_peak = peak_memory(device) - before if reset else None
    z = z.float()
    if not torch.isfinite(z).all():
        raise RuntimeError("the sample has non-finite values")
    sample_s, model_s = sum(step_times) / args.repeats, sum(model_times) / args.repeats  # per sampling run
    pairs = [st / mt for st, mt in zip(step_times, model_times)]

    decodes = {}
    for name, chunk in [("full", 0), ("chunked", args.decode_chunk)]:
        if device.type == "cuda":
            vae = build_vae(args, device)
            decodes[name] = time_decode(vae, z, chunk, args.decode_repeats, device)
            del vae
        else:
            decodes[name] = decode_in_child(chunk)
    fwd_flops = dit_forward_flops(cfg, grid, L, forward_batch)
    result: dict[str, Any] = dict(
        tool="bench_sample", date=datetime.now(timezone.utc).isoformat(timespec="seconds"), device=str(device),
        device_name=device_name(device), torch=torch.__version__, threads=torch.get_num_threads(),
        load_average_start=load_start, load_average_end=load_average(),
        preset=args.preset, shape=list(args.shape), latent_shape=[args.latent_channels, *grid], batch=B,
        sampler=args.sampler, steps=args.steps, cfg=args.cfg, forward_batch=forward_batch, dtype=args.dtype,
        attention=args.attention, cuda_graphs=args.cuda_graphs, compile="ours" if args.compile else "none",
        repeats=args.repeats, sample_time_s=sample_s, model_time_s=model_s, step_times_s=step_times,
        model_times_s=model_times, overhead=(sample_s - model_s) / model_s, overheads=overheads,
        overhead_median_step=statistics.median(pairs) - 1,
        overhead_method="(sampling time - time of the same number of bare model forwards at the same batch) / "
                        "model time, summed over repeats; each sampler step is followed by one bare forward, "
                        "timed apart (so load on the machine hits both alike); overhead_median_step: the median "
                        "over steps of step time / its forward's time, - 1",
        clips_per_s=B / sample_s, clips_per_s_with_decode=B / (sample_s + decodes["full"]["time_s"]),
        forward_flops=fwd_flops, sampling_tflops=args.steps * fwd_flops / sample_s / 1e12,
        sampling_peak_memory_added_gb=sampling_peak / 2**30 if sampling_peak is not None else None,
        peak_memory_kind="torch.cuda.max_memory_allocated" if device.type == "cuda" else "RSS high-water (VmHWM)",
        vae=dict(base_channels=args.vae_base_channels, latent_channels=args.latent_channels,
                 params=sum(p.numel() for p in build_vae(args, torch.device("cpu")).parameters())),
        decode_full=decodes["full"], decode_chunked=decodes["chunked"])
    print(f"{result['device_name']}: DDIM {args.steps} steps, CFG {args.cfg}, batch {B} ({forward_batch} per forward)")
    print(f"sampling {sample_s:.3f} s ({result['clips_per_s']:.3f} clips/s), bare model {model_s:.3f} s, "
          f"overhead {result['overhead']:+.2%} (each repeat: {', '.join(f'{o:+.2%}' for o in overheads)}; "
          f"median step {result['overhead_median_step']:+.2%})")
    for name, d in decodes.items():
        mem = d["peak_memory_added_gb"]
        print(f"VAE decode {name} (chunk_size={d['chunk_size']}): {d['time_s']:.3f} s, "
              f"peak memory +{mem if mem is not None else float('nan'):.3f} GiB")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
