"""train.ema=false: no EMA is kept; checkpoints export the live weights, samples are drawn and validation is run with
them, and a run resumed with an EMA from such a checkpoint starts its EMA from the resumed weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from runs import dit_torchrun, logged_strips, sampled_strips, small_config

from dit.export import list_checkpoints, load_weights
from dit.training import train
from dit.training.checkpoint import load_training_state
from dit.training.ema import ModelEma

RUN = {"train.steps": 4, "train.checkpoint_every": 2, "train.val_samples": 4, "train.val_levels": 2,
       "train.sample_prompts": '["a red circle moving left"]', "sample.steps": 2}


def val_set(shards: str) -> dict[str, str]:
    return {"data.val_shards": str(sorted(Path(shards).glob("*.tar"))[-1])}


def exports_the_live_weights(run: Path) -> None:
    ckpt = list_checkpoints(run)[-1]
    state, (weights, _) = load_training_state(ckpt), load_weights(ckpt)
    assert "ema" not in state and weights.keys() == state["model"].keys()
    for k, v in state["model"].items():
        assert torch.equal(weights[k], v), k


def test_a_run_without_an_ema_exports_samples_and_validates_the_live_weights(tmp_path: Path, small_shards: str,
                                                                             small_vae: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    live = tmp_path / "live"
    train.main(small_config(live, small_shards, small_vae, **RUN, **val_set(small_shards), **{"train.ema": False}))
    exports_the_live_weights(live)
    lines = [json.loads(x) for x in (live / "val.jsonl").read_text().splitlines()]
    assert [v["step"] for v in lines] == [0, 2, 4] and not any("val_loss_ema" in v for v in lines)
    events = EventAccumulator(str(live / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert events.Tags()["images"] == ["samples/0"]
    # resumed with an EMA (one step more): it starts from the resumed weights, then averages
    cfg = small_config(live, small_shards, small_vae, **{**RUN, **val_set(small_shards), "train.steps": 5,
                                                         "train.checkpoint_every": 1, "train.resume": "auto"})
    train.main(cfg)
    four, five = (load_training_state(c) for c in list_checkpoints(live)[-2:])
    assert (four["step"], five["step"]) == (4, 5) and "ema" in five
    weight = 1 - ModelEma(torch.nn.Identity(), cfg.train.ema_decay).get_decay(5)
    for k, w4 in four["model"].items():
        torch.testing.assert_close(five["ema"][k], torch.lerp(w4, five["model"][k], weight), atol=1e-6, rtol=0)


PROMPTS = '["a red circle moving left", "a blue square moving up"]'


@pytest.mark.parametrize("strategy", ["zero3", "fsdp", "sequence-parallel"])
def test_two_processes_sample_and_export_the_live_weights(strategy: str, tmp_path: Path, small_shards: str,
                                                         small_vae: Path) -> None:
    """2 processes, train.ema=false: ZeRO-3 samples through its own per-module gathers, FSDP through its shards,
    and a sequence-parallel group samples its prompts together (each clip split over the group): the clips are
    those the export gives in one process. A resume with an EMA under ZeRO-3 and FSDP starts it from the weights."""
    import numpy as np

    if strategy == "zero3":
        pytest.importorskip("deepspeed")
    run = tmp_path / strategy
    two = {"train.steps": 2, "train.checkpoint_every": 1, "train.sample_prompts": PROMPTS, "sample.steps": 2,
           "train.batch_size": 2, "train.ema": False,
           **({"train.sequence_parallel": 2} if strategy == "sequence-parallel" else {"train.strategy": strategy})}
    done = dit_torchrun(2, run, small_shards, small_vae, **two)
    assert done.returncode == 0, done.stderr[-5000:]
    exports_the_live_weights(run)
    strips = logged_strips(run)
    assert sorted(strips) == ["samples/0", "samples/1"]
    # each rank samples its share of the prompts from seed 0; a sequence-parallel group (both ranks) all of them
    shares = [json.loads(PROMPTS)] if strategy == "sequence-parallel" else [[p] for p in json.loads(PROMPTS)]
    cfg = small_config(run, small_shards, small_vae, **two)
    for i, strip in enumerate(sampled_strips(run, cfg, shares)):
        assert np.abs(strip.astype(int) - strips[f"samples/{i}"].astype(int)).max() <= 1, i
    if strategy == "sequence-parallel":
        return
    done = dit_torchrun(2, run, small_shards, small_vae, extra_args=("--resume", "auto"),
                        **{**two, "train.steps": 3, "train.ema": True})
    assert done.returncode == 0, done.stderr[-5000:]
    assert "the checkpoint holds no EMA" in done.stderr
    two_, three = (load_training_state(c) for c in list_checkpoints(run)[-2:])
    weight = 1 - ModelEma(torch.nn.Identity(), cfg.train.ema_decay).get_decay(3)
    for k, w2 in two_["model"].items():
        torch.testing.assert_close(three["ema"][k], torch.lerp(w2, three["model"][k], weight), atol=1e-6, rtol=0)
