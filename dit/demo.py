"""`dit demo`: the whole pipeline on a fresh machine with nothing downloaded.

synthetic captioned clips -> shards -> train the causal VAE -> train the DiT -> sample one clip per prompt
-> measure each clip's colour and motion -> prompt-following score (fraction matching the prompt).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from data_pipelines.synthetic import BASE_COLORS, COLORS, DIRECTIONS, SHAPES, make_synthetic, measure_clip, render_clip
from dit.config import Config, load_config
from dit.encode import encode_shards
from dit.pipeline import generate, load_pipeline, to_uint8, write_media
from dit.training import train, train_vae

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"

# Phase settings on top of configs/demo.yaml (why these: the README's demo section); `quick` is a smoke test of
# the same path. The VAE trains on 5-frame crops (it is fully convolutional, so it then codes the 9-frame clips).
# DiT steps by objective: rectified flow learns the prompts' colours and directions in 2400 steps, where eps + DDIM
# needed 3600 (README's demo section).
FULL = dict(clips=480, vae_steps=3000, vae_image_steps=1500, vae_frames=5, vae_more_steps=600,
            dit_steps=dict(flow=2400, diffusion=3600), sample_steps=50)
QUICK = dict(clips=64, vae_steps=10, vae_image_steps=5, vae_frames=5, vae_more_steps=5,
             dit_steps=dict(flow=10, diffusion=10), sample_steps=5)
# Below this share of its clips coded back in their colour, the demo trains its VAE vae_more_steps more, at most
# VAE_MORE_ROUNDS times (good VAEs coded all 64 in the demos measured; seed 2's, which lost white's blue, 0.64).
VAE_COLOUR_FLOOR = 0.95
VAE_MORE_ROUNDS = 2


def demo_prompts() -> list[str]:
    """Every colour x direction once (20 prompts), shapes cycled."""
    return [f"a {c} {SHAPES[(i + j) % len(SHAPES)]} moving {d}"
            for i, c in enumerate(BASE_COLORS) for j, d in enumerate(DIRECTIONS)]


def parse_prompt(prompt: str) -> dict[str, str]:
    _, color, shape, _, direction = prompt.split()
    return dict(color=color, shape=shape, direction=direction)


def score_clips(clips: list[Any], prompts: list[str]) -> tuple[float, list[dict[str, Any]]]:
    """Fraction of clips whose measured colour and motion direction both match the prompt."""
    rows = []
    for clip, prompt in zip(clips, prompts):
        want, got = parse_prompt(prompt), measure_clip(clip)
        ok = got["color"] == want["color"] and got["direction"] == want["direction"]
        rows.append(dict(prompt=prompt, measured_color=got["color"], measured_direction=got["direction"], match=ok))
    return sum(r["match"] for r in rows) / max(len(rows), 1), rows


@torch.no_grad()
def vae_round_trip(vae_dir: Path, data_dir: Path, frames: int, height: int, width: int, clips: int = 64) -> dict:
    """Code training clips through the VAE and back, and measure them as the samples are measured: the ceiling
    of the score, and the place to look when a sampled clip has the wrong colour."""
    from data_pipelines.loader import build_loader
    from dit.config import DataConfig
    from dit.models.vae import load_vae

    vae = load_vae(vae_dir).eval()
    data = DataConfig(shards=str(data_dir), frames=frames, height=height, width=width, shuffle_buffer=1)
    loader = build_loader(data, 16, epoch_seed=False, infinite=False, drop_last=False)
    recon, captions = [], []
    for batch in loader:
        recon += list(vae.decode(vae.encode(batch["video"]).mode()).clamp(-1, 1))
        captions += batch["caption"]
        if len(captions) >= clips:
            break
    _, rows = score_clips(recon[:clips], captions[:clips])
    n = len(rows)
    return {"clips": n, "color": sum(r["measured_color"] == parse_prompt(r["prompt"])["color"] for r in rows) / n,
            "direction": sum(r["measured_direction"] == parse_prompt(r["prompt"])["direction"] for r in rows) / n}


# diffusion.objective=flow for the DiT (rectified flow; Min-SNR is an eps/v weighting, so off) and its sampler.
# configs/demo.yaml itself keeps eps + DDIM (objective diffusion): the tests' runs and `--objective diffusion`.
FLOW = ["diffusion.objective=flow", "diffusion.min_snr_gamma=null", "sample.sampler=flow_euler"]
OBJECTIVE_SETTINGS = dict(flow=FLOW, diffusion=[])


def run_objective(run: Path) -> str:
    """The diffusion objective a training run used (its config.yaml)."""
    return load_config(run / "config.yaml", []).diffusion.objective


def size_overrides(base: Config) -> list[str]:
    """The clip size of the demo's config as dotted overrides (the VAE phase then shortens the frames)."""
    return [f"data.frames={base.data.frames}", f"data.height={base.data.height}", f"data.width={base.data.width}"]


def write_demo_data(out: Path, phase: dict[str, Any], base: Config, seed: int) -> None:
    """Phase 1: the DiT's synthetic clips into OUT/data and clips of every colour into OUT/vae_data."""
    print(f"[demo] 1/4 writing {phase['clips']} synthetic clips to {out / 'data'} (the DiT's: "
          f"{', '.join(BASE_COLORS)}) and {phase['clips']} of every colour to {out / 'vae_data'} (the VAE's)",
          flush=True)
    make_synthetic(out / "data", num_clips=phase["clips"], frames=base.data.frames, height=base.data.height,
                   width=base.data.width, clips_per_shard=64, seed=seed)
    # The VAE sees every colour, as a pretrained VAE has seen the world; a VAE that never saw magenta decodes it
    # red (measured), and `--finetune` could not teach the DiT a colour its frozen VAE cannot draw.
    make_synthetic(out / "vae_data", num_clips=phase["clips"], frames=base.data.frames, height=base.data.height,
                   width=base.data.width, clips_per_shard=64, seed=seed + 1000, colors=tuple(COLORS))


def train_demo_vae(out: Path, phase: dict[str, Any], base: Config, seed: int) -> tuple[Path, dict, dict, int]:
    """Phase 2: the causal VAE on OUT/vae_data, its round trip checked and, below VAE_COLOUR_FLOOR, trained further
    (at most VAE_MORE_ROUNDS times). Returns (OUT/vae_run/vae, the last check, the first check, rounds run)."""
    size = size_overrides(base)
    print(f"[demo] 2/4 training the causal VAE for {phase['vae_steps']} steps (the first "
          f"{phase['vae_image_steps']} on single frames)", flush=True)
    shutil.rmtree(out / "vae_more", ignore_errors=True)  # an earlier run's: this VAE is new
    vae_settings = [f"data.shards={out / 'vae_data'}", "train.batch_size=8", "train.warmup_steps=20",
                    f"train.seed={seed}", *size, "vae.chroma_weight=4", f"data.frames={phase['vae_frames']}",
                    "data.decode_cache_mb=64",  # 480 tiny clips read 50 times: decoded once
                    "vae.latent_channels=16"]  # 8 dropped white or magenta in some runs (README)
    vae_dir = train_vae.main(load_config(CONFIG, [
        *vae_settings, f"train.output_dir={out / 'vae_run'}", f"train.steps={phase['vae_steps']}", "train.lr=2e-3",
        f"vae.image_steps={phase['vae_image_steps']}"]))
    vae_check = vae_round_trip(vae_dir, out / "vae_data", base.data.frames, base.data.height, base.data.width)
    print(f"[demo] VAE round trip on {vae_check['clips']} clips of every colour: colour {vae_check['color']:.2f}, "
          f"direction {vae_check['direction']:.2f} (the ceiling of the score)", flush=True)
    from dit.models.vae import load_vae, save_vae

    first_check, rounds = vae_check, 0
    while vae_check["color"] < VAE_COLOUR_FLOOR and rounds < VAE_MORE_ROUNDS:
        # Some runs stall before the VAE draws the blue of white and magenta; more steps from where it stopped, with a
        # new warmup, fixed 3 of 4 such VAEs in one round; the fourth drew white in 9 of 12 clips after two, 0 before.
        rounds += 1
        print(f"[demo] the VAE drew {1 - vae_check['color']:.0%} of the clips in another colour; training it "
              f"{phase['vae_more_steps']} steps more from where it stopped (round {rounds} of at most "
              f"{VAE_MORE_ROUNDS})", flush=True)
        more = train_vae.main(load_config(CONFIG, [
            *vae_settings, f"train.output_dir={out / 'vae_more'}", f"train.steps={phase['vae_more_steps']}",
            "train.lr=1e-3", f"vae.checkpoint={vae_dir}"]))
        save_vae(load_vae(more), vae_dir)  # back where the demo's VAE lives (each file atomically); vae_more keeps
        #                                   the config and logs of the last round
        vae_check = vae_round_trip(vae_dir, out / "vae_data", base.data.frames, base.data.height, base.data.width)
        print(f"[demo] VAE round trip after: colour {vae_check['color']:.2f}, direction "
              f"{vae_check['direction']:.2f}", flush=True)
    return vae_dir, vae_check, first_check, rounds


def run_demo(out: Path, quick: bool = False, seed: int = 0, objective: str = "flow") -> float:
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    phase = QUICK if quick else FULL
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    dit_settings = OBJECTIVE_SETTINGS[objective]
    dit_steps = phase["dit_steps"][objective]
    base = load_config(CONFIG, dit_settings)
    size = size_overrides(base)

    write_demo_data(out, phase, base, seed)
    timings["data_s"] = time.perf_counter() - t0
    vae_dir, vae_check, first_check, rounds = train_demo_vae(out, phase, base, seed)
    timings["vae_s"] = time.perf_counter() - t0 - sum(timings.values())

    print(f"[demo] 3/4 encoding the DiT's clips once (`dit encode`: VAE posterior + text states) into "
          f"{out / 'latents'}, then training the DiT ({objective}) for {dit_steps} steps on them", flush=True)
    # Encoding once instead of in every step (the clips repeat ~120 times) is what makes this phase fast; training on
    # latent shards draws the same random numbers as on raw shards (dit/training/train.py).
    common = [*dit_settings, f"vae.checkpoint={vae_dir}", f"train.seed={seed}", *size]
    shutil.rmtree(out / "latents", ignore_errors=True)  # latents of an earlier VAE would not match this one
    encode_shards(str(out / "data"), out / "latents", load_config(CONFIG, common), batch_size=32)
    dit_cfg = load_config(CONFIG, [*common, f"data.shards={out / 'latents'}", "data.latents=true",
                                   f"train.output_dir={out / 'dit_run'}", f"train.steps={dit_steps}",
                                   "train.fused_adamw=true"])  # one fused AdamW kernel: less optimizer time
    train.main(dit_cfg)
    timings["dit_s"] = time.perf_counter() - t0 - sum(timings.values())

    prompts = demo_prompts()
    print(f"[demo] 4/4 sampling {len(prompts)} clips ({base.sample.sampler}, {phase['sample_steps']} steps, "
          f"cfg {base.sample.cfg})", flush=True)
    pipe = load_pipeline(out / "dit_run")
    video = generate(pipe, prompts, frames=base.data.frames, height=base.data.height, width=base.data.width,
                     steps=phase["sample_steps"], sampler=base.sample.sampler, cfg=base.sample.cfg, seed=seed)
    clips = list(to_uint8(video))
    for i, (clip, prompt) in enumerate(zip(clips, prompts)):
        write_media(clip, out / "clips" / f"{i:02d}_{prompt.replace(' ', '_')}.mp4", fps=base.sample.fps)
    timings["sample_s"] = time.perf_counter() - t0 - sum(timings.values())

    score, rows = score_clips(clips, prompts)
    timings["total_s"] = time.perf_counter() - t0
    for r in rows:
        mark = "ok " if r["match"] else "MISS"
        print(f"  {mark} {r['prompt']:<32} measured: {r['measured_color']} {r['measured_direction']}")
    result = dict(score=score, clips=len(rows), quick=quick, timings=timings, rows=rows, phase=phase,
                  vae_round_trip=vae_check, vae_round_trip_before_more=first_check if rounds else None,
                  vae_more_rounds=rounds)
    (out / "score.json").write_text(json.dumps(result, indent=2))
    print(f"[demo] clips in {out / 'clips'}; TensorBoard logs: tensorboard --logdir {out}")
    print(f"[demo] prompt-following score: {score:.2f} ({sum(r['match'] for r in rows)}/{len(rows)} clips match "
          f"colour and direction) in {timings['total_s'] / 60:.1f} min")
    return score


# `dit demo --finetune`: a colour the base never saw, taught by LoRA from a folder of mp4 clips with .txt captions
FINETUNE = dict(clips=96, steps=400, rank=8, lr=3e-3, sample_steps=50, base_weight=1.0)
FINETUNE_QUICK = dict(clips=16, steps=4, rank=4, lr=3e-3, sample_steps=5, base_weight=1.0)
NEW_COLOR = "magenta"


def finetune_prompts() -> list[str]:
    """The new colour in every direction, each with two shapes (8 prompts)."""
    return [f"a {NEW_COLOR} {SHAPES[(j + k) % len(SHAPES)]} moving {d}"
            for k in (0, 1) for j, d in enumerate(DIRECTIONS)]


def write_clip_folder(folder: Path, clips: int, frames: int, height: int, width: int, fps: int, seed: int) -> None:
    """The user's input: NAME.mp4 + NAME.txt (its caption) for each clip, as a phone or an editor leaves them."""
    import random

    from data_pipelines.writer import encode_mp4

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(clips):
        shape, direction = SHAPES[i % len(SHAPES)], DIRECTIONS[(i // len(SHAPES)) % len(DIRECTIONS)]
        video, meta = render_clip(NEW_COLOR, shape, direction, frames=frames, height=height, width=width, rng=rng)
        (folder / f"clip_{i:03d}.mp4").write_bytes(encode_mp4(video, fps, crf=10))
        (folder / f"clip_{i:03d}.txt").write_text(meta["caption"] + "\n")


def sample_score(run: Path, prompts: list[str], frames: int, height: int, width: int, steps: int, sampler: Any,
                 cfg: float, seed: int) -> tuple[float, list[dict[str, Any]]]:
    pipe = load_pipeline(run)
    video = generate(pipe, prompts, frames=frames, height=height, width=width, steps=steps, sampler=sampler, cfg=cfg,
                     seed=seed)
    return score_clips(list(to_uint8(video)), prompts)


def run_finetune(out: Path, quick: bool = False, seed: int = 0, rank: int | None = None,
                 objective: str = "flow") -> dict[str, float]:
    """From the base demo model (reused from ``out`` when it holds one, else trained): a folder of magenta clips ->
    `dit make-shards` -> LoRA fine-tune with train.init_from -> the score of magenta prompts before and after, and of
    the 20 original prompts after. ``rank`` 0: full fine-tuning instead of LoRA. ``objective``: of a base trained here;
    the fine-tune always trains with its base's objective."""
    from data_pipelines.make_shards import make_shards
    from dit.export import checkpoint_dirs

    phase = FINETUNE_QUICK if quick else FINETUNE
    rank = phase["rank"] if rank is None else rank
    base = load_config(CONFIG, [])
    d = base.data
    vae_dir = out / "vae_run" / "vae"
    t0 = time.perf_counter()
    clips, shards = out / "finetune_clips", out / "finetune_shards"
    print(f"[finetune] 1/4 writing {phase['clips']} {NEW_COLOR} clips with .txt captions to {clips}", flush=True)
    write_clip_folder(clips, phase["clips"], d.frames, d.height, d.width, base.sample.fps, seed + 1)
    print(f"[finetune] 2/4 dit make-shards {clips} {shards}", flush=True)
    make_shards(clips, shards, progress=False, overwrite=True)
    if checkpoint_dirs(out / "dit_run") and vae_dir.is_dir():
        coded = vae_round_trip(vae_dir, shards, d.frames, d.height, d.width, clips=16)["color"]
        if coded < 0.9 and not quick:  # a base from before the VAE saw every colour: it decodes magenta red
            print(f"[finetune] the base demo's VAE in {out} cannot code {NEW_COLOR} (round trip colour {coded:.2f}); "
                  "training the base demo again", flush=True)
            for old in ("vae_run", "vae_more", "dit_run"):  # the demo's own; kept, they would be resumed as they are
                shutil.rmtree(out / old, ignore_errors=True)
            run_demo(out, quick=quick, seed=seed, objective=objective)
            t0 = time.perf_counter()
    else:
        print(f"[finetune] no base demo model in {out}: training it first (`dit demo`)", flush=True)
        run_demo(out, quick=quick, seed=seed, objective=objective)
        t0 = time.perf_counter()
    base_objective = run_objective(out / "dit_run")
    if base_objective != objective:  # a base found in `out`: its objective wins (a fine-tune cannot switch it)
        print(f"[finetune] the base demo in {out} was trained with --objective {base_objective}; fine-tuning with it "
              f"(--objective {objective} applies to a base trained here)", flush=True)
    settings = OBJECTIVE_SETTINGS[base_objective]  # fine-tune with the base's own objective
    sample = load_config(CONFIG, settings).sample  # the sampler of that objective
    magenta, original = finetune_prompts(), demo_prompts()
    size = dict(frames=d.frames, height=d.height, width=d.width, steps=phase["sample_steps"],
                sampler=sample.sampler, cfg=sample.cfg, seed=seed)
    before, _ = sample_score(out / "dit_run", magenta, **size)
    name = f"LoRA rank {rank}" if rank else "full fine-tuning"
    run = out / ("finetune_run" if rank else "finetune_full_run")
    print(f"[finetune] 3/4 {name} from {out / 'dit_run'} for {phase['steps']} steps into {run}, on the {NEW_COLOR} "
          f"clips mixed with the base data (weight {phase['base_weight']}) so the other colours stay", flush=True)
    lora = [f"train.lora.rank={rank}"] if rank else []
    mix = f"[{{shards: '{shards}', weight: 1.0}}, {{shards: '{out / 'data'}', weight: {phase['base_weight']}}}]"
    cfg = load_config(CONFIG, [f"data.datasets={mix}", f"train.output_dir={run}", f"vae.checkpoint={vae_dir}",
                               f"train.init_from={out / 'dit_run'}", f"train.steps={phase['steps']}",
                               f"train.lr={phase['lr'] if rank else phase['lr'] / 10}", "train.warmup_steps=20",
                               f"train.checkpoint_every={phase['steps']}", f"train.seed={seed}", *lora, *settings])
    train.main(cfg, overwrite=True)
    print("[finetune] 4/4 sampling the prompts with the fine-tuned model", flush=True)
    after, rows = sample_score(run, magenta, **size)
    kept, kept_rows = sample_score(run, original, **size)
    for r in rows + kept_rows:
        print(f"  {'ok ' if r['match'] else 'MISS'} {r['prompt']:<32} measured: {r['measured_color']} "
              f"{r['measured_direction']}")
    result = dict(method=name, magenta_before=before, magenta_after=after, original_after=kept,
                  minutes=(time.perf_counter() - t0) / 60, quick=quick, phase=phase)
    (out / f"finetune_score{'' if rank else '_full'}.json").write_text(json.dumps(result, indent=2))
    print(f"[finetune] {name}: {NEW_COLOR} prompts {before:.2f} before -> {after:.2f} after; the 20 original prompts "
          f"{kept:.2f} after ({result['minutes']:.1f} min beyond the base demo)")
    return result
