"""`dit sample`: prompts -> clips from a checkpoint, at the size it was trained at unless told otherwise.

    dit sample --checkpoint RUN_DIR --prompt "a red circle moving left" --frames 17 --height 64 --width 96 \
        --steps 50 --sampler ddim --cfg 5 --seed 0 --out clip.mp4

Each written file is one stdout line, ``PATH<TAB>PROMPT`` (slurm/sample.sbatch keeps them as its index.tsv).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from dit.pipeline import check_size, default_suffix, generate, load_pipeline, to_uint8, write_media


def read_prompts(args: argparse.Namespace) -> list[str]:
    """--prompt (repeatable) then the non-blank lines of --prompts FILE."""
    prompts = list(args.prompt or [])
    if args.prompts:
        p = Path(args.prompts)
        if not p.is_file():
            raise SystemExit(f"error: --prompts file {str(p)!r} does not exist")
        prompts += [line.strip() for line in p.read_text().splitlines() if line.strip()]
    if not prompts:
        raise SystemExit("error: give --prompt TEXT (repeatable) or --prompts FILE (one prompt per line)")
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


def run_sample(args: argparse.Namespace) -> None:
    prompts = read_prompts(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = load_pipeline(args.checkpoint, device=device)
    frames, height, width = trained_size(pipe.config, args.frames, args.height, args.width)
    try:
        check_size(frames, height, width, pipe.model.patch, temporal=pipe.vae.temporal_compression,
                   spatial=pipe.vae.spatial_compression)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"sampling {len(prompts)} clip(s) of {frames}x{height}x{width} (frames x height x width)", file=sys.stderr)
    paths = output_paths(args.out, len(prompts), frames)
    for start in range(0, len(prompts), args.batch_size):
        chunk = prompts[start:start + args.batch_size]
        video = generate(pipe, chunk, frames=frames, height=height, width=width, steps=args.steps,
                         sampler=args.sampler, cfg=args.cfg, eta=args.eta, seed=args.seed + start,
                         decode_chunk=args.decode_chunk)
        for clip, path, prompt in zip(to_uint8(video), paths[start:], chunk):
            write_media(clip, path, fps=args.fps)
            print(f"{path}\t{prompt}", flush=True)
