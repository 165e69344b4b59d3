"""`dit check`: one line per checkpoint against its manifest; the exit status says whether the newest is intact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dit.check import run_check
from dit.cli import main as dit_main
from dit.export import MANIFEST, write_export


def export(run: Path, step: int) -> Path:
    ckpt = run / "checkpoints" / f"step-{step:08d}"
    ckpt.mkdir(parents=True)
    write_export(ckpt, weights={"w": torch.arange(1000.0)}, config={"dit": {}, "experiment": {}})
    return ckpt


def test_each_checkpoint_gets_a_line_and_the_newest_decides_the_exit_status(tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture) -> None:
    one, two = export(tmp_path, 1), export(tmp_path, 2)
    (tmp_path / "checkpoints" / ".tmp-step-00000003").mkdir()  # a save cut short
    assert run_check(tmp_path) == 0
    assert capsys.readouterr().out.splitlines() == [
        "step-00000001  ok    3 files, 0.0 MB",
        "step-00000002  ok    3 files, 0.0 MB",
        ".tmp-step-00000003  unfinished save: never loaded, removed by the next save of that step",
        "newest intact: step-00000002 (what train.resume=auto takes)"]

    (two / "model.safetensors").write_bytes(b"")
    assert run_check(tmp_path) == 1  # the newest is torn
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("step-00000002  torn  model.safetensors is 0 bytes, its manifest says ")
    assert out[-1] == "newest intact: step-00000001 (what train.resume=auto takes)"
    assert run_check(two) == 1 and run_check(one) == 0  # one checkpoint directory: its own line
    capsys.readouterr()

    (one / MANIFEST).unlink()
    assert run_check(tmp_path) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("step-00000001  unverified  no manifest.json")
    assert out[-1] == "no intact checkpoint: train.resume=auto and dit sample refuse this run"


def test_a_folder_without_checkpoints_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stop:
        dit_main(["check", str(tmp_path)])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip() == (f"error: no checkpoint in {str(tmp_path)!r}: pass a training output "
                                               "directory (train.output_dir) or a checkpoint directory "
                                               "(RUN/checkpoints/step-N)")
