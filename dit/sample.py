"""`dit sample`: prompts -> clips from a checkpoint (or a released model's folders, `--config`), at the size it was
trained at unless told otherwise.

    dit sample --checkpoint RUN_DIR --prompt "a red circle moving left" --frames 17 --height 64 --width 96 \
        --steps 50 --sampler ddim --cfg 5 --seed 0 --out clip.mp4

Every argument is checked before the model is loaded (a mistake is one ``error:`` line, not a traceback after the
work). What is not given comes from the run: the size it was trained at, its ``sample`` settings (sampler, steps,
cfg, eta, fps, shift). A ``.png`` holds one frame, so ``--out x.png`` samples an image (frames 1) unless
``--frames`` says otherwise, which is refused. Before sampling, stderr says which checkpoint (and step) was loaded
and what will be sampled (size, latent tokens, sampler settings), with a warning for a size far beyond the training
one; then progress: a bar on a terminal, otherwise a line per batch.

Each written file is one stdout line, ``PATH<TAB>PROMPT`` (slurm/sample.sbatch keeps them as its index.tsv).

``--sequence-parallel N`` under a launcher of N processes (torchrun): every process runs the same sampling with each
clip's tokens split over the N (dit/distributed/sequence.py), so a clip too long for one GPU's memory samples on N;
rank 0 writes the files and the lines.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from data_pipelines.config import latent_frames
from dit.config import Config, ConfigError, SampleConfig
from dit.distributed.setup import DistEnv
from dit.export import resolve_checkpoint
from dit.models.families import pads_frames, sample_guidance
from dit.pipeline import (
    check_size,
    default_suffix,
    generate,
    load_pipeline,
    read_image,
    read_pixels,
    resolve_sampler,
    to_uint8,
    write_media,
)

SUFFIXES = (".mp4", ".gif", ".png")
WARN_TOKENS = 4  # warn when a clip has this many times the latent tokens of the training size


def read_prompts(args: argparse.Namespace) -> list[str]:
    """--prompt (repeatable) then the non-blank lines of --prompts FILE."""
    prompts = list(args.prompt or [])
    if args.prompts:
        p = Path(args.prompts)
        if not p.is_file():
            raise ConfigError(f"--prompts file {str(p)!r} does not exist")
        try:
            lines = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as e:
            raise ConfigError(f"--prompts file {str(p)!r} is not UTF-8 text (byte at offset {e.start}); save it as "
                              "UTF-8") from None
        if not lines:
            raise ConfigError(f"--prompts file {str(p)!r} holds no prompt (it is empty or blank); write one prompt "
                              "per line")
        prompts += lines
    if not prompts:
        raise ConfigError("give --prompt TEXT (repeatable) or --prompts FILE (one prompt per line)")
    return prompts


def output_paths(out: str, n: int, frames: int) -> list[Path]:
    """One prompt and a file name: that file; otherwise OUT (without its suffix) as a folder of 0000.mp4, ..."""
    path = Path(out)
    if n == 1 and path.suffix:
        return [path]
    suffix = path.suffix or default_suffix(frames)
    folder = path.with_suffix("") if path.suffix else path
    return [folder / f"{i:04d}{suffix}" for i in range(n)]


def trained_size(config: dict, frames: int | None, height: int | None, width: int | None) -> tuple[int, int, int]:
    """The requested size, each dimension not given taken from the checkpoint's data config (its training size)."""
    data = config["experiment"]["data"]
    return (data["frames"] if frames is None else frames, data["height"] if height is None else height,
            data["width"] if width is None else width)


def sample_dtype(name: str, device: torch.device) -> str:
    """``--dtype``: auto is bf16 on a CUDA GPU that computes in it (as diffusers' pipelines are run there), fp32
    elsewhere: on CPU bf16 pays only with bf16 instructions (BENCHMARKS.md)."""
    if name != "auto":
        return name
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def check_arguments(args: argparse.Namespace) -> None:
    """The checks that need no checkpoint: numbers in range and an output format (ConfigError naming the fix)."""
    positive = {"--steps": args.steps, "--batch-size": args.batch_size, "--fps": args.fps, "--frames": args.frames,
                "--height": args.height, "--width": args.width}
    for flag, value in positive.items():
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    guidance = {"--cfg": args.cfg, "--cfg-low": getattr(args, "cfg_low", None),
                "--guidance": getattr(args, "guidance", None)}
    for flag, value in {**guidance, "--eta": args.eta, "--decode-chunk": args.decode_chunk}.items():
        if value is not None and not value >= 0:  # (not >= : NaN too)
            raise ConfigError(f"{flag} must be >= 0, got {value}" + (" (1: the prompt alone, no guidance; above 1: "
                                                                     "follow it more closely)" if flag in guidance
                                                                     else ""))
    expert = getattr(args, "expert", None)
    if expert is None and getattr(args, "cfg_low", None) is not None:  # (sample.cfg_low of a run: unused then)
        raise ConfigError("--cfg-low guides the low-noise expert of --expert; without --expert use --cfg")
    if expert is not None and not Path(expert).exists():
        raise ConfigError(f"--expert {expert!r} does not exist: give the other expert's run, checkpoint directory or "
                          "diffusers transformer folder")
    if expert is not None and getattr(args, "cuda_graphs", False):
        raise ConfigError("--cuda-graphs captures one denoiser; with --expert sample without it")
    if getattr(args, "cuda_graphs", False):
        if getattr(args, "compile", False):
            raise ConfigError("--cuda-graphs and --compile: a graph captured while blocks still compile is not "
                              "replayable; use one of them")
        if not torch.cuda.is_available():
            raise ConfigError("--cuda-graphs needs a CUDA device, and torch sees none: sample without it")
        if getattr(args, "sequence_parallel", 1) > 1:
            raise ConfigError("--cuda-graphs does not capture --sequence-parallel's collectives: use one of them")
    if getattr(args, "image", None) is not None and not Path(args.image).is_file():
        raise ConfigError(f"--image {args.image!r} does not exist: give the first frame as an image file (png, jpg, "
                          "webp)")
    if getattr(args, "lora", None) is not None and not Path(args.lora).exists():
        raise ConfigError(f"--lora {args.lora!r} does not exist: give a LoRA run, a LoRA checkpoint directory or its "
                          "pytorch_lora_weights.safetensors")
    suffix = Path(args.out).suffix.lower()
    if suffix and suffix not in SUFFIXES:
        raise ConfigError(f"--out {args.out!r}: cannot write {suffix} files; use .mp4, .gif or .png, or a folder name "
                          "without a suffix (one file per prompt)")
    if suffix == ".png" and args.frames is not None and args.frames > 1:
        raise ConfigError(f"--out {args.out!r}: a .png holds one frame, but --frames {args.frames} samples "
                          f"{args.frames}; write a .mp4 or .gif, or sample an image with --frames 1")


def settings(config: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The run's ``sample`` settings (its config.yaml's), each replaced by its flag when given; the sampler checked
    against the run's objective."""
    run = config["experiment"].get("sample") or {}
    out = {f.name: run.get(f.name, f.default) for f in fields(SampleConfig)}
    for name in ("sampler", "steps", "cfg", "eta", "fps", "cfg_low", "guidance", "dynamic_cfg"):
        if getattr(args, name, None) is not None:
            out[name] = getattr(args, name, None)
    distilled = config["dit"].get("diffusers", {}).get("guidance_embeds", False)  # (HunyuanVideo's, FLUX.1-dev's)
    if getattr(args, "guidance", None) is not None and not distilled:
        raise ConfigError(f"--guidance is the embedded guidance scale of a guidance-distilled HunyuanVideo or "
                          f"FLUX.1-dev; this checkpoint's {config['dit'].get('family', 'dit')} model takes none: use "
                          "--cfg")
    if out["dynamic_cfg"] and out["cfg"] <= 1:
        raise ConfigError(f"--dynamic-cfg raises the guidance scale above 1 over the steps: give --cfg > 1 (it is "
                          f"{out['cfg']:g}), or --no-dynamic-cfg")
    if distilled and out["guidance"] is None:  # (what generate gives it; said in the report)
        out["guidance"] = sample_guidance(config["dit"]["family"])
    try:
        out["sampler"] = resolve_sampler(config["experiment"]["diffusion"].get("objective", "diffusion"),
                                         out["sampler"])
    except ValueError as e:
        raise ConfigError(f"--sampler: {e}") from None
    return out


def vae_record(ckpt: Path) -> dict[str, Any]:
    """A checkpoint's vae/vae.json: our VAE's constructor arguments, or {"family", "pretrained", ...}."""
    try:
        return json.loads((ckpt / "vae" / "vae.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"corrupt checkpoint {ckpt}: vae/vae.json cannot be read ({e})") from None


def geometry(vae: dict[str, Any], config: dict[str, Any]) -> tuple[tuple[int, int, int], int, int]:
    """(patch, temporal, spatial compression) of a model, from its configs (no weights loaded); ``vae``: its VAE's
    record (``vae_record``)."""
    from dit.models.presets import PRESETS
    from dit.models.vae import CausalVAE

    model = config["experiment"]["model"]
    patch = config["dit"].get("patch_size") or model.get("patch_size") or PRESETS[model["preset"]]["patch_size"]
    if "family" in vae:
        from dit.models.vae_folder import vae_geometry

        _, temporal, spatial = vae_geometry(vae["family"], vae["pretrained"])
    else:
        temporal, spatial = CausalVAE.temporal_compression, CausalVAE.spatial_compression
    return (int(patch[0]), int(patch[1]), int(patch[2])), temporal, spatial


def tokens(frames: int, height: int, width: int, patch: tuple[int, int, int], temporal: int, spatial: int) -> int:
    """Latent tokens of one clip: the latent grid divided by the patch (frames a model pads count too)."""
    t, h, w = latent_frames(frames, temporal), height // spatial, width // spatial
    return -(-t // patch[0]) * (h // patch[1]) * (w // patch[2])


def training_size(config: dict[str, Any]) -> tuple[int, int, int]:
    """The largest clip the run trained on: data.frames x height x width, or its largest bucket."""
    data = config["experiment"]["data"]
    buckets = data.get("buckets") or {}
    if buckets.get("enabled"):
        return max(buckets["frames"]), buckets["resolution"], buckets["resolution"]
    return data["frames"], data["height"], data["width"]


def first_frame(args: argparse.Namespace, config: dict[str, Any], height: int, width: int) -> torch.Tensor | None:
    """--image read, resized (shorter side) and center-cropped to the sampling size: [1, 3, height, width] in
    [-1, 1]; None without --image. Refused for a checkpoint not trained with model.condition=first_frame, and its
    absence for a Wan 2.1 I2V checkpoint (no text-to-video mode)."""
    if getattr(args, "image", None) is None:
        dcfg = config["dit"].get("diffusers", {})
        if config["dit"].get("family") == "wan" and dcfg.get("in_channels") != (dcfg.get("out_channels") or
                                                                               dcfg.get("in_channels")):
            raise ConfigError("this checkpoint is a Wan image-to-video model (Wan 2.1 I2V, Wan 2.2 I2V A14B), which "
                              "has no text-to-video mode: give the first frame with --image FILE")
        return None
    condition = config["experiment"].get("model", {}).get("condition", "none")
    if condition != "first_frame":
        raise ConfigError(f"--image: this checkpoint was trained with model.condition={condition}, so it cannot "
                          "continue a given first frame; sample without --image, or train with "
                          "model.condition=first_frame")
    try:
        return read_image(args.image, height, width)
    except ValueError as e:
        raise ConfigError(f"--image {e}") from None


def last_frame(args: argparse.Namespace, config: dict[str, Any], height: int, width: int) -> torch.Tensor | None:
    """--last-image read as --image is, for a Wan 2.1 FLF2V checkpoint (which needs it, with --image); refused for
    any other."""
    flf = bool(config["dit"].get("diffusers", {}).get("pos_embed_seq_len"))
    last = getattr(args, "last_image", None)
    if flf and (last is None or getattr(args, "image", None) is None):
        raise ConfigError("this checkpoint is a Wan 2.1 FLF2V model: give the first frame with --image FILE and the "
                          "last with --last-image FILE")
    if last is None:
        return None
    if not flf:
        raise ConfigError("--last-image: this checkpoint is not a Wan 2.1 FLF2V model (first and last frame); sample "
                          "without it")
    if not Path(last).is_file():
        raise ConfigError(f"--last-image {last!r} does not exist: give the last frame as an image file")
    try:
        return read_image(last, height, width)
    except ValueError as e:
        raise ConfigError(f"--last-image {e}") from None


def sequence_parallel(args: argparse.Namespace, config: dict[str, Any], n_tokens: int) -> DistEnv | None:
    """--sequence-parallel N: checked against the model and clip, then the group of the launch's N processes (None
    for N = 1: one process, as always)."""
    sp = getattr(args, "sequence_parallel", 1)
    if sp == 1:
        return None
    family, heads = config["experiment"]["model"].get("family", "dit"), config["dit"].get("num_heads", 0)
    if sp < 1 or heads % sp or n_tokens % sp:
        raise ConfigError(f"--sequence-parallel {sp} must divide the {family} model's attention heads ({heads}) and "
                          f"the clip's {n_tokens} latent tokens")
    from dit.distributed.setup import setup_distributed

    env = setup_distributed(sequence_parallel=sp)  # ConfigError when the launch's processes are not a multiple
    if env.world_size != sp:
        raise ConfigError(f"--sequence-parallel {sp} samples with one group of {sp} processes; this launch has "
                          f"{env.world_size}: use torchrun --nproc-per-node {sp}")
    return env


def step_of(ckpt: Path) -> str:
    name = ckpt.name
    return str(int(name.split("-", 1)[1])) if name.startswith("step-") and name[5:].isdigit() else "unknown"


def model_source(args: argparse.Namespace) -> tuple[Path | Config, dict[str, Any], dict[str, Any], str]:
    """(what load_pipeline loads, its config.json-like config, its VAE's record, how the report names it) for
    --checkpoint RUN, or for --config YAML [key=value ...] naming a released model's folders."""
    overrides = list(getattr(args, "overrides", None) or [])
    if getattr(args, "config", None) is None:
        if overrides:
            raise ConfigError(f"{overrides[0]!r}: key=value overrides go with --config (a released model's config); "
                              "a checkpoint samples as it was trained, with the flags (--steps, --cfg, ...)")
        ckpt = resolve_checkpoint(args.checkpoint)
        try:
            config = json.loads((ckpt / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"corrupt checkpoint {ckpt}: config.json cannot be read ({e})") from None
        return ckpt, config, vae_record(ckpt), f"checkpoint {ckpt} (step {step_of(ckpt)})"
    from dit.config import load_config
    from dit.released import release_config

    cfg = load_config(args.config, overrides)  # (a missing or broken YAML: ConfigError naming it)
    config = release_config(cfg)
    v = cfg.vae
    vae = {"family": v.family, "pretrained": v.pretrained} if v.family != "ours" else {}
    return cfg, config, vae, f"released model {cfg.model.pretrained} ({cfg.model.family})"


def run_sample(args: argparse.Namespace) -> None:
    prompts = read_prompts(args)
    check_arguments(args)
    source, config, vae, name = model_source(args)
    opts = settings(config, args)
    frames = args.frames
    if frames is None and Path(args.out).suffix.lower() == ".png":
        frames = 1  # a png is an image
    frames, height, width = trained_size(config, frames, args.height, args.width)
    patch, temporal, spatial = geometry(vae, config)
    try:
        check_size(frames, height, width, patch, temporal=temporal, spatial=spatial,
                   pads=pads_frames(config["dit"].get("family", "dit")))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    image = first_frame(args, config, height, width)
    last_image = last_frame(args, config, height, width)
    # Wan 2.1 I2V's CLIP sees the images as given, before the resize and crop (as WanImageToVideoPipeline's does)
    clip = image is not None and bool(config["dit"].get("diffusers", {}).get("image_dim"))
    given = (getattr(args, "image", None), getattr(args, "last_image", None))
    clip_image, clip_last_image = (read_pixels(f) if clip and f else None for f in given)
    paths = output_paths(args.out, len(prompts), frames)
    if frames > 1 and paths[0].suffix == ".png":
        raise ConfigError(f"--out {args.out!r}: a .png holds one frame, but {frames} frames would be sampled (the "
                          "training size); write .mp4 or .gif, or pass --frames 1")

    n_tokens, trained = tokens(frames, height, width, patch, temporal, spatial), training_size(config)
    n_trained = tokens(*trained, patch, temporal, spatial)
    env = sequence_parallel(args, config, n_tokens)
    main = env is None or env.is_main  # the one process that reports and writes
    if main:
        report(args, opts, prompts, (frames, height, width), n_tokens, trained, n_trained)

    device = env.device if env else "cuda" if torch.cuda.is_available() else "cpu"
    dtype, fp8 = sample_dtype(getattr(args, "dtype", "fp32"), torch.device(device)), getattr(args, "fp8", False)
    # sampled under bf16 autocast: the weights held in bf16 too (half the memory; --fp8 holds its own)
    held = torch.bfloat16 if dtype == "bf16" and not fp8 else torch.float32
    pipe = load_pipeline(source, device=device, lora=args.lora, lora_scale=args.lora_scale,
                         expert=getattr(args, "expert", None), fp8=fp8, weights_dtype=held)
    if getattr(args, "compile", False):  # before sequence parallelism, as in training (parallelize.py)
        from dit.distributed.parallelize import apply_compile

        for model in (pipe.model, *([pipe.experts.other] if pipe.experts else [])):
            apply_compile(model)
    if env:
        from dit.distributed.sequence import apply_sequence_parallel

        for model in (pipe.model, *([pipe.experts.other] if pipe.experts else [])):
            apply_sequence_parallel(model, env.sp_group)  # every rank returns the whole prediction
    if main:
        compiled = ", its blocks compiled (the first step compiles them)" if getattr(args, "compile", False) else ""
        compiled += ", its block weights in fp8" if fp8 else ", its weights in bf16" if dtype == "bf16" else ""
        print(f"loaded {name} on {device}, denoiser in {dtype}{compiled}",
              file=sys.stderr, flush=True)
    batches = math.ceil(len(prompts) / args.batch_size)
    bar = None
    if sys.stderr.isatty() and main:
        from tqdm import tqdm

        bar = tqdm(total=batches * opts["steps"], unit="step", desc="sampling", file=sys.stderr)
    began = time.perf_counter()
    for n, start in enumerate(range(0, len(prompts), args.batch_size), start=1):
        chunk = prompts[start:start + args.batch_size]
        video = generate(pipe, chunk, frames=frames, height=height, width=width, steps=opts["steps"],
                         sampler=opts["sampler"], cfg=opts["cfg"], eta=opts["eta"], seed=args.seed + start,
                         decode_chunk=args.decode_chunk, shift=opts["shift"], image=image,
                         dtype=dtype, cuda_graphs=getattr(args, "cuda_graphs", False),
                         cfg_low=opts["cfg_low"], guidance=opts["guidance"], dynamic_cfg=opts["dynamic_cfg"],
                         clip_image=clip_image,
                         last_image=last_image, clip_last_image=clip_last_image,
                         callback=(lambda i, x: bar.update(1)) if bar is not None else None)
        if not main:
            continue
        for clip, path, prompt in zip(to_uint8(video), paths[start:], chunk):
            write_media(clip, path, fps=opts["fps"])
            print(f"{path}\t{prompt}", flush=True)
        if bar is None:
            print(f"batch {n}/{batches}: clips {start + 1}-{start + len(chunk)} of {len(prompts)} written "
                  f"({time.perf_counter() - began:.1f} s)", file=sys.stderr, flush=True)
    if bar is not None:
        bar.close()
    if env:
        from dit.distributed.setup import teardown_distributed

        teardown_distributed()


def report(args: argparse.Namespace, opts: dict[str, Any], prompts: list[str], size: tuple[int, int, int],
           n_tokens: int, trained: tuple[int, int, int], n_trained: int) -> None:
    """What will be sampled, on stderr, with a warning for a size far beyond the training one."""
    frames, height, width = size
    print(f"sampling {len(prompts)} clip(s) of {frames}x{height}x{width} (frames x height x width; {n_tokens} latent "
          f"tokens each) with {opts['sampler']}, {opts['steps']} steps, cfg {opts['cfg']:g}"
          + (" (dynamic)" if opts.get("dynamic_cfg") else "")
          + ("" if opts.get("guidance") is None else f", embedded guidance {opts['guidance']:g}")
          + f", seed {args.seed}, batches of {args.batch_size}", file=sys.stderr)
    if n_tokens > WARN_TOKENS * n_trained:
        factor = n_tokens / n_trained
        print(f"warning: that is {factor:.0f}x the {n_trained} tokens of the size the model was trained at "
              f"({'x'.join(map(str, trained))}): quality there is untested, and each step costs {factor:.0f}x to "
              f"{factor ** 2:.0f}x as much (attention grows with the square of the tokens)", file=sys.stderr)
