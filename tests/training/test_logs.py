"""Logs fit for a batch job: with stdout and stderr to a file (as under SLURM), `dit train` writes one progress
line every train.log_every steps instead of a redrawn bar."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from runs import DEMO, ROOT, small_config, small_overrides


def test_a_100_step_run_logged_to_a_file_writes_a_few_kb(tmp_path: Path, small_shards: str, small_vae: Path) -> None:
    log = tmp_path / "train.log"
    cmd = [sys.executable, "-m", "dit.cli", "train", "--config", str(DEMO),
           *small_overrides(tmp_path / "run", small_shards, small_vae, **{"train.steps": 100, "train.log_every": 10,
                                                                           "train.checkpoint_every": 50})]
    with open(log, "w") as f:  # not a terminal
        done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=f,
                              stderr=subprocess.STDOUT, timeout=900)
    text = log.read_text()
    assert done.returncode == 0, text[-3000:]
    assert "\r" not in text  # no redrawn bar
    progress = re.findall(r"train step (\d+)/100 loss [\d.]+ \| [\d.]+ steps/s \| ETA \S+", text)
    assert [int(s) for s in progress] == list(range(10, 101, 10))
    assert log.stat().st_size < 6 * 1024, text


def test_a_bf16_run_logs_its_samples_sampled_under_bf16(tmp_path: Path, small_shards: str, small_vae: Path,
                                                        monkeypatch) -> None:
    """The clips logged during training: drawn with the EMA model in the run's precision (bf16 autocast in a bf16
    run: less activation memory at the sampling step), written to TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dit.training import run_log, train

    dtypes, real = [], run_log.generate

    def generate(*args, **kwargs):
        dtypes.append(kwargs.get("dtype", "fp32"))
        return real(*args, **kwargs)

    monkeypatch.setattr(run_log, "generate", generate)  # (what log_samples calls)
    for precision, expected in (("bf16", "bf16"), ("no", "fp32")):
        run = tmp_path / precision
        dtypes.clear()
        train.main(small_config(run, small_shards, small_vae, **{
            "train.steps": 2, "train.checkpoint_every": 2, "train.mixed_precision": precision,
            "train.sample_prompts": '["a red circle moving left"]', "sample.steps": 2}))
        assert dtypes == [expected]  # once, at the end of the run
        events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0}).Reload()
        assert events.Tags()["images"] == ["samples/0"]
