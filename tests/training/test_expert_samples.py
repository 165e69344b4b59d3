"""A run that trains one expert of two (Wan 2.2 A14B's split of the noise levels) logs clips drawn with both when
train.sample_expert names the other: the clips `dit sample --expert` draws from the two exports."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from runs import small_config

from dit.config import ConfigError
from dit.pipeline import generate, load_pipeline
from dit.training import run_log, train

FLOW = {"diffusion.objective": "flow", "diffusion.min_snr_gamma": "null", "sample.sampler": "flow_euler",
        "train.steps": 2, "train.checkpoint_every": 2,
        "train.lr": 0.02}
PROMPTS = '["a red circle moving left"]'


def expert_run(out: Path, shards: str, vae: Path, monkeypatch, **extra: object) -> list:
    """Train one expert (2 steps); return what each logged sample was drawn with and gave: (args, kwargs, the other
    expert's (dtype, device) while it sampled, or None without one, the clip)."""
    calls = []

    def logged(pipe, *args, **kwargs):
        video = generate(pipe, *args, **kwargs)
        other = next(pipe.experts.other.parameters()) if pipe.experts else None
        calls.append((args, kwargs, None if other is None else (other.dtype, other.device), video))
        return video

    monkeypatch.setattr(run_log, "generate", logged)  # (what log_samples calls)
    train.main(small_config(out, shards, vae, **FLOW, **extra))
    monkeypatch.setattr(run_log, "generate", generate)
    return calls


def test_an_expert_run_logs_clips_drawn_with_the_other_expert(tmp_path: Path, small_shards: str, small_vae: Path,
                                                              monkeypatch) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    low = tmp_path / "low"  # the low-noise expert, sigma in [0, 0.5] (another seed: other weights); no clips alone
    assert expert_run(low, small_shards, small_vae, monkeypatch, **{"diffusion.sigma_max": 0.5, "train.seed": 7,
                                                                     "train.sample_prompts": PROMPTS}) == []
    high = tmp_path / "high"
    calls = expert_run(high, small_shards, small_vae, monkeypatch, **{
        "diffusion.sigma_min": 0.5, "train.sample_prompts": PROMPTS, "train.sample_expert": str(low),
        "sample.steps": 4, "sample.cfg_low": 2.0, "train.mixed_precision": "no"})
    assert len(calls) == 1  # at the end of the run
    args, kwargs, other, video = calls[0]
    assert other == (torch.float32, torch.device("cpu")) and kwargs["cfg_low"] == 2.0
    events = EventAccumulator(str(high / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert events.Tags()["images"] == ["samples/0"]
    # the same clip from the two exports, as `dit sample --checkpoint HIGH --expert LOW` loads them
    both = load_pipeline(high, expert=low)
    torch.testing.assert_close(video, generate(both, *args, **kwargs), atol=1e-5, rtol=0)
    # and the low-noise expert drew part of it (4 steps, sigma 1, 0.75 high; 0.5, 0.25 low), with its own guidance
    alone = generate(load_pipeline(high), *args, **{**kwargs, "cfg_low": None})
    assert (alone - video).abs().mean() > 5e-3  # (measured 0.0197)
    assert (generate(both, *args, **{**kwargs, "cfg_low": None}) - video).abs().mean() > 5e-3  # (0.0197)

    # a bf16 run holds the other expert in bf16 (half its memory), sampled under bf16 autocast like its own model
    calls = expert_run(tmp_path / "high_bf16", small_shards, small_vae, monkeypatch, **{
        "diffusion.sigma_min": 0.5, "train.sample_prompts": PROMPTS, "train.sample_expert": str(low),
        "sample.steps": 4, "train.mixed_precision": "bf16"})
    args, kwargs, other, video = calls[0]
    assert other == (torch.bfloat16, torch.device("cpu")) and kwargs["dtype"] == "bf16"
    both = load_pipeline(tmp_path / "high_bf16", expert=low)  # its expert in fp32, under the same autocast
    # (here the same clip: this briefly trained expert's QK-norm weights, which autocast leaves in fp32, are still
    # ones, exact in bf16 (checked by hand); in general the two differ by bf16's rounding, tests/test_sample.py)
    torch.testing.assert_close(generate(both, *args, **kwargs), video, atol=1e-5, rtol=0)


def test_a_sample_expert_that_cannot_serve_is_refused_before_any_work(tmp_path: Path, small_shards: str,
                                                                      small_vae: Path) -> None:
    for extra, message in (({}, "this run trains every noise level"),
                           ({"diffusion.sigma_min": 0.5, "train.sample_prompts": "[]"}, "train.sample_prompts is "
                                                                                          "empty"),
                           ({"diffusion.sigma_min": 0.5}, "does not exist")):
        expert = tmp_path / "nowhere" if message == "does not exist" else tmp_path
        with pytest.raises(ConfigError, match=f"train.sample_expert: .*{message}"):
            small_config(tmp_path / "run", small_shards, small_vae, **FLOW, **{
                "train.sample_prompts": PROMPTS, "train.sample_expert": str(expert), **extra})
    low = tmp_path / "low"
    train.main(small_config(low, small_shards, small_vae, **FLOW, **{"diffusion.sigma_max": 0.5}))
    # a second low-noise expert cannot draw the high noise levels: refused before the first step
    again = tmp_path / "again"
    with pytest.raises(ConfigError, match=r"trained on noise levels \[0.0, 0.5\], but the other expert of this "
                                          r"checkpoint serves \[0.5, 1.0\]"):
        train.main(small_config(again, small_shards, small_vae, **FLOW, **{
            "diffusion.sigma_max": 0.5, "train.sample_prompts": PROMPTS, "train.sample_expert": str(low)}))
    assert not (again / "checkpoints").exists() and not (again / "metrics.jsonl").exists()


def test_two_processes_hold_the_other_expert_once_per_node(tmp_path: Path, small_shards: str, small_vae: Path,
                                                         monkeypatch) -> None:
    """train.sample_expert in a run of several processes: the node's first process loads the other expert, the
    others map its node-local file (a 14B expert in bf16: 28.6 GB per node, not per GPU), and the clips' expert is
    the one a single process loads (tests/training/node_shared_expert.py, 2 processes)."""
    import os
    import subprocess
    import sys

    low = tmp_path / "low"
    expert_run(low, small_shards, small_vae, monkeypatch, **{"diffusion.sigma_max": 0.5, "train.seed": 7})
    script = Path(__file__).resolve().parent / "node_shared_expert.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(low)]
    done = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-5000:]
    assert done.stdout.count("the expert mapped once per node") == 2, done.stdout
