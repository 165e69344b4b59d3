"""The optimizer step: non-finite losses are skipped and counted (N in a row stop, no checkpoint holds NaN);
gradient accumulation equals one big batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from runs import small_config

from dit.export import list_checkpoints, load_weights
from dit.training import batch as step_inputs
from dit.training import train
from dit.training.checkpoint import load_training_state


@pytest.fixture
def nan_loss_at(monkeypatch):
    """``nan_loss_at(steps)``: the training loss is NaN at these steps (1 micro-batch per step: call = step)."""

    def install(steps: set[int]) -> None:
        real, calls = step_inputs.training_loss, [0]

        def loss(*args, **kwargs):
            calls[0] += 1
            value = real(*args, **kwargs)
            return value * float("nan") if calls[0] in steps else value

        monkeypatch.setattr(step_inputs, "training_loss", loss)  # (where the step's loss is computed)

    return install


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def finite(state: dict[str, torch.Tensor]) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_a_nan_step_is_skipped_and_counted(tmp_path: Path, small_shards: str, small_vae: Path, nan_loss_at) -> None:
    run = tmp_path / "run"
    nan_loss_at({3, 5})
    train.main(small_config(run, small_shards, small_vae, **{"train.steps": 6, "train.checkpoint_every": 2}))
    recs = records(run)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert [r["nonfinite_skipped"] for r in recs] == [0, 0, 1, 1, 2, 2]
    for ckpt in list_checkpoints(run):
        state = load_training_state(ckpt)
        assert finite(state["model"]) and finite(state["ema"]) and finite(load_weights(ckpt)[0])
    # the skipped step changed nothing: the optimizer took 4 steps, not 6
    state = load_training_state(list_checkpoints(run)[-1])
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {4}


def test_repeated_nan_stops_the_run_with_a_clear_message(tmp_path: Path, small_shards: str, small_vae: Path,
                                                         nan_loss_at) -> None:
    run = tmp_path / "run"
    nan_loss_at({5, 6, 7, 8})
    cfg = small_config(run, small_shards, small_vae, **{"train.steps": 20, "train.checkpoint_every": 2,
                                                        "train.max_nonfinite": 3})
    with pytest.raises(RuntimeError, match=r"stopping at step 7: 3 steps in a row .*train.max_nonfinite=3"):
        train.main(cfg)
    assert [p.name for p in list_checkpoints(run)][-1] == "step-00000006"  # written after skipped step 5, finite
    for ckpt in list_checkpoints(run):
        assert finite(load_training_state(ckpt)["model"]) and finite(load_weights(ckpt)[0])


def test_gradient_accumulation_matches_one_big_batch(tmp_path: Path, small_shards: str, small_vae: Path) -> None:
    runs = {}
    for name, batch, accum in (("big", 4, 1), ("accum", 2, 2)):
        runs[name] = tmp_path / name
        train.main(small_config(runs[name], small_shards, small_vae, **{
            "train.steps": 4, "train.checkpoint_every": 4, "train.batch_size": batch, "train.grad_accum_steps": accum}))
    big, acc = ([r["loss"] for r in records(runs[k])] for k in ("big", "accum"))
    assert acc == pytest.approx(big, rel=1e-5)
    a = load_training_state(list_checkpoints(runs["big"])[-1])["model"]
    b = load_training_state(list_checkpoints(runs["accum"])[-1])["model"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)


def plain_and_switched(tmp_path: Path, shards: str, vae: Path, switch: str, steps: int) -> dict[str, Path]:
    """Two short runs, ``switch`` false then true, otherwise alike: their run folders by the switch's value."""
    runs = {}
    for value in ("false", "true"):
        runs[value] = tmp_path / value
        train.main(small_config(runs[value], shards, vae, **{
            "train.steps": steps, "train.checkpoint_every": steps, "train.lr": 1e-3, switch: value}))
    return runs


def test_fused_adamw_trains_as_the_plain_one(tmp_path: Path, small_shards: str, small_vae: Path) -> None:
    """train.fused_adamw: one fused kernel, the same update up to float rounding (losses, weights, and the
    optimizer state a resume reads); refused where it is untried."""
    from dit.config import ConfigError
    from dit.training.optim import build_optimizer

    runs = plain_and_switched(tmp_path, small_shards, small_vae, "train.fused_adamw", steps=5)
    plain, fused_losses = ([r["loss"] for r in records(runs[k])] for k in ("false", "true"))
    assert fused_losses == pytest.approx(plain, rel=1e-5)
    a, b = (load_training_state(list_checkpoints(runs[k])[-1]) for k in ("false", "true"))
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-4, atol=1e-6)
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    cfg = small_config(tmp_path / "x", small_shards, small_vae, **{"train.fused_adamw": "true"})
    assert build_optimizer(torch.nn.Linear(2, 2).parameters(), cfg.train).defaults["fused"] is True
    with pytest.raises(ConfigError, match="train.fused_adamw"):
        small_config(tmp_path / "y", small_shards, small_vae, **{"train.fused_adamw": "true", "train.strategy": "fsdp"})


def test_fused_qkv_trains_as_the_plain_model_and_exports_its_layout(tmp_path: Path, small_shards: str,
                                                                    small_vae: Path) -> None:
    """model.fused_qkv: the same losses and weights up to float rounding, also after a resume; the export has the
    plain q / kv keys (what `dit sample` and train.init_from load); a resume that would switch the layout is refused
    before any work."""
    from dit.config import ConfigError
    from dit.training.checkpoint import CheckpointError

    runs = plain_and_switched(tmp_path, small_shards, small_vae, "model.fused_qkv", steps=4)
    plain, fused_losses = ([r["loss"] for r in records(runs[k])] for k in ("false", "true"))
    assert fused_losses == pytest.approx(plain, rel=1e-5)
    exports = {k: load_weights(list_checkpoints(runs[k])[-1])[0] for k in runs}
    assert sorted(exports["true"]) == sorted(exports["false"])
    assert not any(".qkv." in k for k in exports["true"])
    for k, v in exports["false"].items():
        torch.testing.assert_close(exports["true"][k], v, rtol=1e-4, atol=1e-6)
    state = load_training_state(list_checkpoints(runs["true"])[-1])["model"]
    assert "blocks.0.attn.qkv.weight" in state  # the training state keeps the fused layout, as the optimizer's
    with pytest.raises(CheckpointError, match=r"model.fused_qkv=True there, False here"):
        train.main(small_config(runs["true"], small_shards, small_vae,
                                **{"train.steps": 6, "model.fused_qkv": "false"}))
    for fused in runs:  # both resumed to step 6 (model, optimizer and EMA from their checkpoints): still alike
        train.main(small_config(runs[fused], small_shards, small_vae, **{
            "train.steps": 6, "train.checkpoint_every": 6, "train.lr": 1e-3, "model.fused_qkv": fused}))
    plain, fused_losses = ([r["loss"] for r in records(runs[k])] for k in ("false", "true"))
    assert len(plain) == 6 and fused_losses == pytest.approx(plain, rel=1e-5)
    exports = {k: load_weights(list_checkpoints(runs[k])[-1])[0] for k in runs}
    for k, v in exports["false"].items():
        torch.testing.assert_close(exports["true"][k], v, rtol=1e-4, atol=1e-6)
    with pytest.raises(ConfigError, match="model.fused_qkv"):
        small_config(tmp_path / "y", small_shards, small_vae, **{"model.fused_qkv": "true", "train.lora.rank": 4})
