"""The validation loss (data.val_shards): logged at step 0, at each checkpoint and at the end, one value per noise
level and their mean, of the live model and of the EMA; it leaves the training as it was; a resumed run logs the same
values; bad settings fail before any work."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from runs import small_config

from dit.config import ConfigError
from dit.training import train

STEPS = {"train.steps": 4, "train.checkpoint_every": 2}
VAL = {"train.val_samples": 6, "train.val_levels": 3}  # 6 clips: a batch of 4 and one cut to 2


def val_shard(shards: str) -> str:
    return str(sorted(Path(shards).glob("*.tar"))[-1])


def val_lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "val.jsonl").read_text().splitlines()]


def metrics(run: Path, key: str) -> list[float]:
    return [json.loads(line)[key] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def validated(tmp_path_factory, small_shards: str, small_vae: Path) -> Path:
    run = tmp_path_factory.mktemp("val") / "run"
    train.main(small_config(run, small_shards, small_vae, **STEPS, **VAL,
                            **{"data.val_shards": val_shard(small_shards)}))
    return run


def test_the_validation_loss_is_logged_and_leaves_the_training_as_it_was(validated: Path, small_shards: str,
                                                                          small_vae: Path, tmp_path: Path) -> None:
    lines = val_lines(validated)
    assert [v["step"] for v in lines] == [0, 2, 4]
    for v in lines:
        for suffix in ("", "_ema"):
            levels = list(v[f"by_level{suffix}"].values())
            assert len(levels) == 3 and all(math.isfinite(x) and x > 0 for x in levels)
            assert v[f"val_loss{suffix}"] == pytest.approx(sum(levels) / 3, rel=1e-12)
    assert list(lines[0]["by_level"]) == ["166", "500", "833"]  # (t of 1000: the demo config is eps diffusion)
    assert lines[0]["val_loss"] != lines[-1]["val_loss"]  # the model moved
    assert lines[0]["by_level_ema"] == lines[0]["by_level"]  # at step 0 the EMA is the model's copy
    assert all(v["val_loss_ema"] != v["val_loss"] for v in lines[1:])  # then it lags the live weights
    plain = tmp_path / "plain"
    train.main(small_config(plain, small_shards, small_vae, **STEPS))
    assert not (plain / "val.jsonl").exists()
    for key in ("loss", "grad_norm"):  # no random number, dropout or mode of the training touched
        assert metrics(validated, key) == metrics(plain, key), key
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(validated / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("val/loss")] == [0, 2, 4]
    assert [e.value for e in events.Scalars("val/loss_ema")] == pytest.approx([v["val_loss_ema"] for v in lines])
    assert {"val/loss_at_500", "val/loss_ema_at_500"} <= set(events.Tags()["scalars"])


def test_the_ema_validation_loss_is_that_of_the_exported_weights(validated: Path, small_shards: str,
                                                                  small_vae: Path, tmp_path: Path) -> None:
    """An independent path to the same number: a run started from the last checkpoint's export (the EMA) gives it
    as its live model's loss at step 0."""
    from dit.export import list_checkpoints

    started = tmp_path / "started"
    train.main(small_config(started, small_shards, small_vae, **VAL, **{
        "train.steps": 1, "train.init_from": str(list_checkpoints(validated)[-1]),
        "data.val_shards": val_shard(small_shards)}))
    assert val_lines(started)[0]["by_level"] == pytest.approx(val_lines(validated)[-1]["by_level_ema"], rel=1e-6)
    assert val_lines(started)[0]["val_loss"] != pytest.approx(val_lines(validated)[-1]["val_loss"], rel=1e-3)


def test_a_resumed_run_logs_the_same_validation(validated: Path, small_shards: str, small_vae: Path,
                                                tmp_path: Path) -> None:
    run = tmp_path / "run"
    settings = {**STEPS, **VAL, "data.val_shards": val_shard(small_shards)}
    train.main(small_config(run, small_shards, small_vae, **{**settings, "train.steps": 2}))
    with (run / "val.jsonl").open("a") as f:  # a line past the checkpoint, as a kill after a validation leaves it
        f.write(json.dumps({"step": 3, "val_loss": 9.0, "by_level": {}}) + "\n")
    train.main(small_config(run, small_shards, small_vae, **settings))
    assert val_lines(run) == val_lines(validated)


def test_validation_settings_that_cannot_work_fail_before_any_work(small_shards: str, small_vae: Path,
                                                                   tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        train.main(small_config(tmp_path / "a", small_shards, small_vae,
                                **{"data.val_shards": str(tmp_path / "nowhere" / "{0..3}.tar")}))
    assert not (tmp_path / "a").exists()
    for key, value, message in (("train.val_samples", 0, "must be >= 1"), ("train.val_levels", 0, "must be >= 1"),
                                ("train.val_every", -1, "must be >= 0")):
        with pytest.raises(ConfigError, match=f"{key}: {message}"):
            small_config(tmp_path / "b", small_shards, small_vae, **{key: value})


def test_the_noise_levels_spread_over_the_range_the_run_trains() -> None:
    from runs import DEMO

    from dit.config import load_config
    from dit.training.validation import noise_levels

    flow = ["diffusion.objective=flow", "diffusion.min_snr_gamma=null", "sample.sampler=flow_euler"]
    assert noise_levels(load_config(DEMO, ["train.val_levels=4"])) == [125.0, 375.0, 625.0, 875.0]  # of 1000 steps
    assert noise_levels(load_config(DEMO, [*flow, "train.val_levels=4"])) == [0.125, 0.375, 0.625, 0.875]
    low = load_config(DEMO, [*flow, "train.val_levels=2", "diffusion.sigma_max=0.875"])  # a low-noise expert
    assert noise_levels(low) == pytest.approx([0.21875, 0.65625])


def test_keep_best_keeps_the_checkpoint_of_the_lowest_validation_loss(small_shards: str, small_vae: Path,
                                                                       tmp_path: Path) -> None:
    from dit.export import list_checkpoints

    run = tmp_path / "run"
    train.main(small_config(run, small_shards, small_vae, **VAL, **{
        "train.steps": 5, "train.checkpoint_every": 1, "train.keep_last": 1, "train.keep_best": True,
        "train.lr": 3e-3, "data.val_shards": val_shard(small_shards)}))
    # ranked by the EMA's loss: the weights a checkpoint exports (step 0 has no checkpoint)
    lines = {v["step"]: v["val_loss_ema"] for v in val_lines(run) if v["step"] > 0}
    best = json.loads((run / "best.json").read_text())
    assert best["step"] == min(lines, key=lines.get) and best["val_loss"] == lines[best["step"]]
    assert best["weights"] == "ema"
    kept = {c.name for c in list_checkpoints(run)}
    assert kept == {"step-00000005", Path(best["checkpoint"]).name}
    live = tmp_path / "live"  # train.val_ema=false: the live model's loss ranks, the only one logged
    train.main(small_config(live, small_shards, small_vae, **VAL, **{
        "train.steps": 3, "train.checkpoint_every": 1, "train.keep_last": 1, "train.keep_best": True,
        "train.lr": 3e-3, "train.val_ema": False, "data.val_shards": val_shard(small_shards)}))
    lines = {v["step"]: v["val_loss"] for v in val_lines(live) if v["step"] > 0}
    assert all("val_loss_ema" not in v for v in val_lines(live))
    best = json.loads((live / "best.json").read_text())
    assert best["step"] == min(lines, key=lines.get) and best["weights"] == "live"
    with pytest.raises(ConfigError, match="train.keep_best: keeps the checkpoint of the lowest validation loss: set "
                                          "data.val_shards"):
        small_config(tmp_path / "b", small_shards, small_vae, **{"train.keep_best": True})


def test_pruning_spares_the_kept_step_and_a_later_best_record_is_dropped_on_resume(tmp_path: Path) -> None:
    from dit.export import EXPORT_FILES, write_manifest
    from dit.training.checkpoint import prune, read_best, write_best

    for step in (1, 2, 3, 4):  # intact checkpoints of empty files
        d = tmp_path / "checkpoints" / f"step-{step:08d}"
        d.mkdir(parents=True)
        for name in EXPORT_FILES:
            (d / name).write_text("")
        write_manifest(d)
    prune(tmp_path, keep_last=1, keep=(2,))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    write_best(tmp_path, 3, 0.5)
    assert read_best(tmp_path, 3) == {"step": 3, "val_loss": 0.5, "weights": "ema",
                                      "checkpoint": "checkpoints/step-00000003"}
    assert read_best(tmp_path, 2) is None  # resuming at step 2: a best of step 3 is from steps taken again
    assert read_best(tmp_path, 3, "live") is None  # a resume that switched train.val_ema: the losses do not compare
