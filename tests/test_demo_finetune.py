"""`dit demo --finetune --quick`: the user's path end to end at smoke-test length (the score itself is measured by
the full run, README): a folder of magenta mp4 clips with .txt captions, `dit make-shards`, a LoRA fine-tune from
the demo model with train.init_from, and the scores before and after; and the demo with the eps objective."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from dit.config import load_config
from dit.demo import VAE_COLOUR_FLOOR, VAE_MORE_ROUNDS, run_objective

ROOT = Path(__file__).resolve().parents[1]


def test_demo_finetune_quick_runs_the_users_path(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    done = subprocess.run([sys.executable, "-m", "dit.cli", "demo", "--quick", "--finetune", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "no base demo model" in done.stdout  # trained first (the quick one)
    clips = sorted((out / "finetune_clips").iterdir())
    assert len(clips) == 32 and {p.suffix for p in clips} == {".mp4", ".txt"}
    assert (out / "finetune_clips" / "clip_000.txt").read_text().startswith("a magenta ")
    stats = json.loads((out / "finetune_shards" / "stats.json").read_text())
    assert stats["written"] == 16, stats
    result = json.loads((out / "finetune_score.json").read_text())
    assert result["method"] == "LoRA rank 4"
    assert all(0.0 <= result[k] <= 1.0 for k in ("magenta_before", "magenta_after", "original_after"))
    ckpt = sorted((out / "finetune_run" / "checkpoints").iterdir())[-1]
    config = json.loads((ckpt / "config.json").read_text())
    assert config["lora"]["base"] == {"init_from": str((out / "dit_run").resolve())}
    assert (ckpt / "pytorch_lora_weights.safetensors").is_file()
    assert run_objective(out / "dit_run") == "flow"  # the demo's default
    assert run_objective(out / "finetune_run") == "flow"  # fine-tuned with its base's objective, not demo.yaml's
    assert "magenta prompts" in done.stdout and "the 20 original prompts" in done.stdout


def test_demo_quick_with_the_eps_objective(tmp_path: Path) -> None:
    """`dit demo --objective diffusion` keeps the eps recipe (configs/demo.yaml's objective) and samples with DDIM.
    (Without --finetune since 2026-12-07, for CI time: the test above holds that a fine-tune takes its base's
    objective, in the direction where it differs from demo.yaml's.)"""
    out = tmp_path / "demo"
    done = subprocess.run([sys.executable, "-m", "dit.cli", "demo", "--quick", "--objective", "diffusion", "--out",
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert run_objective(out / "dit_run") == "diffusion" and not (out / "finetune_run").exists()
    assert "training the DiT (diffusion) for 10 steps" in done.stdout
    assert "sampling 20 clips (ddim, 5 steps" in done.stdout
    result = json.loads((out / "score.json").read_text())
    assert result["clips"] == 20 and 0.0 <= result["score"] <= 1.0
    # A 10-step VAE draws most clips in another colour, so the demo trained it 5 steps more, twice (a 20-step VAE
    # still fails), and put it back where the DiT phase and --finetune read it.
    assert result["vae_round_trip_before_more"]["color"] < VAE_COLOUR_FLOOR
    assert result["vae_more_rounds"] == VAE_MORE_ROUNDS == 2
    assert "training it 5 steps more from where it stopped (round 2 of at most 2)" in done.stdout
    assert load_config(out / "vae_more" / "config.yaml", []).vae.checkpoint == str(out / "vae_run" / "vae")
    more, final = (load_file(out / d / "vae" / "vae.safetensors") for d in ("vae_more", "vae_run"))
    assert more.keys() == final.keys() and all(torch.equal(more[k], final[k]) for k in more)
