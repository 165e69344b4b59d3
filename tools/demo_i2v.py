"""Image-to-video on the demo data (a measurement, not a test): train `dit-tiny` with model.condition=first_frame on
the `dit demo` clips, give it the first frame of a fresh clip for each of the 20 demo prompts, and measure

- how well the sampled clip's first frame matches the given image: PSNR (dB) against the VAE round trip of that
  image (what a perfect model could draw through this VAE), per prompt and on average;
- whether the motion follows the prompt (the demo's measure: colour and direction read from the pixels), and the
  direction alone;
- the same model without an image (its text-to-video mode, the condition zeroed), for comparison.

    .venv/bin/python tools/demo_i2v.py --out outputs/demo            # reuses OUT/data and OUT/vae_run/vae if there
    .venv/bin/python tools/demo_i2v.py --out /tmp/q --quick          # a smoke test of the same path

Without OUT/vae_run/vae it first writes the demo's synthetic clips and trains its VAE as `dit demo` does (phases 1
and 2, with its repair rounds). The DiT trains into OUT/i2v_run; the numbers go to OUT/i2v_score.json and the
clips to OUT/i2v_clips/.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipelines.synthetic import render_clip  # noqa: E402
from dit.config import load_config  # noqa: E402
from dit.demo import (  # noqa: E402
    CONFIG,
    FULL,
    QUICK,
    demo_prompts,
    parse_prompt,
    score_clips,
    train_demo_vae,
    write_demo_data,
)
from dit.pipeline import generate, load_pipeline, to_uint8, write_media  # noqa: E402
from dit.training import train  # noqa: E402


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two images in [-1, 1] (peak-to-peak 2)."""
    mse = float((a.float() - b.float()).square().mean())
    return 10 * math.log10(4.0 / max(mse, 1e-12))


def demo_vae(out: Path, phase: dict, seed: int) -> Path:
    """OUT/vae_run/vae as `dit demo` makes it (its phases 1 and 2: the data, the VAE, its repair rounds), when it is
    not there yet."""
    vae_dir = out / "vae_run" / "vae"
    if vae_dir.is_dir():
        print(f"[i2v] reusing the demo VAE {vae_dir} and data {out / 'data'}", flush=True)
        return vae_dir
    base = load_config(CONFIG, [])
    write_demo_data(out, phase, base, seed)
    return train_demo_vae(out, phase, base, seed)[0]


def first_frames(prompts: list[str], frames: int, height: int, width: int, seed: int) -> torch.Tensor:
    """Frame 0 of a fresh synthetic clip for each prompt (its colour, shape and direction; a start position that
    leaves room for the motion): uint8 [N, 3, H, W]."""
    rng = random.Random(seed + 1000)  # not the training clips' stream
    images = []
    for prompt in prompts:
        p = parse_prompt(prompt)
        video, _ = render_clip(p["color"], p["shape"], p["direction"], frames=frames, height=height, width=width,
                               rng=rng)
        images.append(torch.as_tensor(video[0]).permute(2, 0, 1))
    return torch.stack(images)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="outputs/demo")
    ap.add_argument("--steps", type=int, default=None,
                    help=f"DiT training steps (default: the eps demo's, {FULL['dit_steps']['diffusion']})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a much shorter run (smoke test)")
    ap.add_argument("--overrides", nargs="*", default=[], help="more dotted overrides for the DiT run")
    args = ap.parse_args()
    out, phase = Path(args.out), QUICK if args.quick else FULL
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    vae_dir = demo_vae(out, phase, args.seed)
    base = load_config(CONFIG, [])
    d, s = base.data, base.sample
    steps = args.steps or phase["dit_steps"]["diffusion"]  # configs/demo.yaml's objective
    print(f"[i2v] training the DiT with model.condition=first_frame for {steps} steps into {out / 'i2v_run'}",
          flush=True)
    t1 = time.perf_counter()
    cfg = load_config(CONFIG, [f"data.shards={out / 'data'}", f"train.output_dir={out / 'i2v_run'}",
                               f"train.steps={steps}", f"vae.checkpoint={vae_dir}", f"train.seed={args.seed}",
                               "model.condition=first_frame", *args.overrides])
    train.main(cfg, overwrite=True)
    train_s = time.perf_counter() - t1

    prompts = demo_prompts()
    images = first_frames(prompts, d.frames, d.height, d.width, args.seed)  # uint8 [20, 3, H, W]
    pipe = load_pipeline(out / "i2v_run")
    size = dict(frames=d.frames, height=d.height, width=d.width, steps=phase["sample_steps"], sampler=s.sampler,
                cfg=s.cfg, seed=args.seed)
    print(f"[i2v] sampling {len(prompts)} clips from their first frames ({s.sampler}, {size['steps']} steps, cfg "
          f"{s.cfg}), and the same prompts without an image", flush=True)
    given = generate(pipe, prompts, image=images, **size)  # [20, 3, T, H, W]
    plain = generate(pipe, prompts, **size)
    x = images.float() / 127.5 - 1
    with torch.no_grad():
        reference = pipe.vae.decode(pipe.vae.encode(x[:, :, None]).mode()).clamp(-1, 1)[:, :, 0]  # [20, 3, H, W]
    score, rows = score_clips(list(to_uint8(given)), prompts)
    plain_score, _ = score_clips(list(to_uint8(plain)), prompts)
    for i, (r, clip) in enumerate(zip(rows, to_uint8(given))):
        r["psnr_first_frame"] = psnr(given[i, :, 0], reference[i])
        r["psnr_without_image"] = psnr(plain[i, :, 0], reference[i])
        r["psnr_vae_round_trip"] = psnr(reference[i], x[i])  # the VAE's own loss on this image
        write_media(clip, out / "i2v_clips" / f"{i:02d}_{r['prompt'].replace(' ', '_')}.mp4", fps=s.fps)
        print(f"  {'ok ' if r['match'] else 'MISS'} {r['prompt']:<32} measured: {r['measured_color']} "
              f"{r['measured_direction']}; first frame {r['psnr_first_frame']:.1f} dB (without image "
              f"{r['psnr_without_image']:.1f}, VAE round trip vs image {r['psnr_vae_round_trip']:.1f})")
    n = len(rows)
    result = dict(
        score=score, direction=sum(r["measured_direction"] == parse_prompt(r["prompt"])["direction"] for r in rows) / n,
        psnr_first_frame_mean=sum(r["psnr_first_frame"] for r in rows) / n,
        psnr_first_frame_min=min(r["psnr_first_frame"] for r in rows),
        psnr_without_image_mean=sum(r["psnr_without_image"] for r in rows) / n, score_without_image=plain_score,
        dit_steps=steps, train_minutes=train_s / 60, total_minutes=(time.perf_counter() - t0) / 60,
        quick=args.quick, overrides=args.overrides, rows=rows)
    (out / "i2v_score.json").write_text(json.dumps(result, indent=2))
    print(f"[i2v] first frame vs the VAE round trip of the given image: {result['psnr_first_frame_mean']:.1f} dB mean, "
          f"{result['psnr_first_frame_min']:.1f} min (without the image {result['psnr_without_image_mean']:.1f}); "
          f"prompt following {score:.2f} (direction {result['direction']:.2f}; without the image {plain_score:.2f}); "
          f"DiT {steps} steps in {train_s / 60:.1f} min")


if __name__ == "__main__":
    main()
