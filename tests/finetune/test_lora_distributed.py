"""LoRA runs under the sharded strategies and after kill -9: 2 CPU processes (gloo) with ZeRO-2 (3 steps, then
resumed to 6), ZeRO-3 and FSDP train like one process on the same global batch (train.parity_batch) within 1e-4, and a
1-process LoRA run killed with SIGKILL and resumed with train.resume=auto ends with the same adapter, optimizer
state and log, bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from runs import dit_torchrun, dit_train
from test_resume import kill_when, logged, steps_of

from dit.export import list_checkpoints, load_weights
from dit.training.checkpoint import load_training_state

STEPS = 6


def common(base: Path) -> dict[str, object]:
    return {"train.steps": STEPS, "train.checkpoint_every": STEPS // 2, "train.lr_schedule": "constant",
            "train.lr": 1e-2, "train.init_from": str(base), "train.lora.rank": 4, "train.lora.alpha": 8}


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, small_shards: str, small_vae: Path, base_run: Path) -> Path:
    run = tmp_path_factory.mktemp("lora_one") / "run"
    done = dit_train(run, small_shards, small_vae, **common(base_run))
    assert done.returncode == 0, done.stderr[-3000:]
    return run


@pytest.mark.parametrize("strategy", ["zero2", "zero3", "fsdp"])
def test_lora_on_two_processes_matches_one(strategy: str, tmp_path: Path, one_process: Path, small_shards: str,
                                          small_vae: Path, base_run: Path) -> None:
    if strategy.startswith("zero"):
        pytest.importorskip("deepspeed")
    run = tmp_path / strategy
    two = {**common(base_run), "train.batch_size": 2, "train.parity_batch": True, "train.strategy": strategy}
    if strategy == "zero3":  # the EMA shares the partitioned base: sampling gathers it (after the last step)
        two.update({"train.sample_prompts": '["a red circle moving left"]', "sample.steps": 2})
    for steps in (STEPS // 2, STEPS) if strategy != "fsdp" else (STEPS,):  # ZeRO: a sharded-state resume too
        done = dit_torchrun(2, run, small_shards, small_vae, **{**two, "train.steps": steps})
        assert done.returncode == 0, done.stderr[-5000:]
    ref, got = losses(one_process), losses(run)
    assert len(got) == STEPS
    assert got == pytest.approx(ref, rel=1e-4), (ref, got)
    a, _ = load_weights(list_checkpoints(one_process)[-1])
    b, config = load_weights(list_checkpoints(run)[-1])
    assert config["lora"]["rank"] == 4 and a.keys() == b.keys() and all(".lora_" in k for k in a)
    # the adapter (EMA) equals the 1-process one up to reduction order; ZeRO-3's partitioned reduce-scatter sums in
    # another order than ZeRO-2's buckets, which AdamW (lr 1e-2) turns into up to 3.6e-5 (measured) where a gradient
    # is near zero, a few thousandths of one step
    atol = 1e-4 if strategy == "zero3" else 1e-5
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=atol, msg=k)
    if strategy == "zero3":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0}).Reload()
        assert events.Tags()["images"] == ["samples/0"]


def test_lora_killed_and_resumed_equals_the_uninterrupted_run(tmp_path: Path, one_process: Path, small_shards: str,
                                                             small_vae: Path, base_run: Path) -> None:
    run = tmp_path / "run"
    proc = dit_train(run, small_shards, small_vae, wait=False, **common(base_run))
    kill_when(proc, lambda: steps_of(run) == [3] and max(logged(run), default=0) >= 4, "step 4")
    done = dit_train(run, small_shards, small_vae, extra_args=("--resume", "auto"), **common(base_run))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stderr and logged(run) == list(range(1, STEPS + 1))
    assert losses(run) == losses(one_process)
    a = load_training_state(list_checkpoints(one_process)[-1])
    b = load_training_state(list_checkpoints(run)[-1])
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys() and all(".lora_" in k for k in a[part])
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_an_fp8_base_trains_on_two_ddp_processes_like_one_and_resumes(tmp_path: Path, one_process: Path,
                                                                      small_shards: str, small_vae: Path,
                                                                      base_run: Path) -> None:
    """train.lora.base_dtype=fp8 under DDP on 2 gloo processes (the codes are uint8 parameters: DDP broadcasts them)
    trains like 1 process on the same global batch; its losses are near, not equal to, the fp32 base's. (A resume
    rounds the base again from train.init_from, to the same codes: deterministic; the LoRA resume is tested above.)"""
    fp8 = {**common(base_run), "train.lora.base_dtype": "fp8"}
    one, two = tmp_path / "one", tmp_path / "two"
    done = dit_train(one, small_shards, small_vae, **fp8)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "frozen linear weights held in fp8 e4m3" in done.stderr
    done = dit_torchrun(2, two, small_shards, small_vae, **{**fp8, "train.batch_size": 2, "train.parity_batch": True})
    assert done.returncode == 0, done.stderr[-5000:]
    ref, got = losses(one), losses(two)
    assert len(got) == STEPS and got == pytest.approx(ref, rel=1e-4), (ref, got)
    a, _ = load_weights(list_checkpoints(one)[-1])
    b, _ = load_weights(list_checkpoints(two)[-1])
    assert a.keys() == b.keys() and all(".lora_" in k for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-5, msg=k)
    full = losses(one_process)
    assert ref != full and ref == pytest.approx(full, rel=2e-3)
