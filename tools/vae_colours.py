"""How well a trained VAE keeps the demo's colours: it codes and decodes one synthetic clip of every colour x shape x
direction, and `measure_clip` (the demo's scorer) reads each clip's colour back.

    python tools/vae_colours.py outputs/demo/vae_run/vae [--json OUT]

Prints, per colour, how many clips came back in it and their mean RGB; then the total. The demo's score cannot
beat what this VAE draws (README: the demo)."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import torch

from data_pipelines.decode import resize_crop
from data_pipelines.synthetic import COLORS, DIRECTIONS, SHAPES, measure_clip, render_clip
from dit.models.vae import load_vae
from dit.pipeline import to_uint8


@torch.no_grad()
def colour_check(vae_dir: str | Path, frames: int = 9, height: int = 32, width: int = 32,
                 seed: int = 0) -> dict[str, dict]:
    """colour -> {"right": clips measured in it, "clips": clips, "rgb": mean measured RGB (0-255) or None}."""
    vae = load_vae(vae_dir).eval()
    rng = random.Random(seed)
    out = {}
    for colour in COLORS:
        clips = [render_clip(colour, s, d, frames=frames, height=height, width=width, rng=rng)[0]
                 for s in SHAPES for d in DIRECTIONS]
        x = torch.stack([resize_crop(c, height, width) for c in clips])  # as the loader hands clips over
        back = to_uint8(vae.decode(vae.encode(x).mode()))  # as the demo scores its samples
        measured = [measure_clip(clip) for clip in back]
        rgbs = [m["rgb"] for m in measured if m["rgb"] is not None]
        out[colour] = {"right": sum(m["color"] == colour for m in measured), "clips": len(measured),
                       "rgb": [round(float(v), 1) for v in np.mean(rgbs, axis=0)] if rgbs else None}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("vae", help="a VAE directory (RUN_DIR/vae of dit train-vae)")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args()
    result = colour_check(args.vae)
    for colour, r in result.items():
        print(f"{colour:8s} {r['right']:2d}/{r['clips']} mean rgb {r['rgb']}")
    right, clips = sum(r["right"] for r in result.values()), sum(r["clips"] for r in result.values())
    print(f"total {right}/{clips} in the right colour")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
