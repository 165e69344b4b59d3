"""Atomic checkpoint directories, and the test hook that pauses one mid-write (tests/training/hooked_cli.py)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from hooked_cli import apply_hooks

from dit.export import list_checkpoints
from dit.training import checkpoint
from dit.training.checkpoint import atomic_checkpoint


def save(run: Path, step: int, keep_last: int = 3) -> None:
    with atomic_checkpoint(run, step, keep_last=keep_last) as tmp:
        (tmp / "model.safetensors").write_bytes(b"w")
        (tmp / "config.json").write_text("{}")


def test_checkpoints_appear_whole_and_only_the_newest_are_kept(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        save(tmp_path, step, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]
    with pytest.raises(RuntimeError), atomic_checkpoint(tmp_path, 4) as tmp:
        (tmp / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("crash while writing")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]
    assert (tmp_path / "checkpoints" / ".tmp-step-00000004").is_dir()  # never loaded; the next save of 4 clears it
    save(tmp_path, 4)
    assert not (tmp_path / "checkpoints" / ".tmp-step-00000004").exists()


def test_the_pause_hook_holds_a_complete_checkpoint_before_its_rename(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(checkpoint, "publish", checkpoint.publish)  # undone after the test
    apply_hooks('{"checkpoint_pause_s": 1.5}')
    writer = threading.Thread(target=save, args=(tmp_path, 7))
    writer.start()
    marker = tmp_path / "checkpoints" / ".writing"
    deadline = time.monotonic() + 30
    while not (marker.is_file() and marker.read_text() == "7"):
        assert time.monotonic() < deadline, "the hook never paused"
        time.sleep(0.01)
    assert (tmp_path / "checkpoints" / ".tmp-step-00000007" / "config.json").is_file()
    assert list_checkpoints(tmp_path) == []
    writer.join()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000007"] and not marker.exists()


def test_an_unknown_hook_is_refused() -> None:
    with pytest.raises(SystemExit, match="unknown hook 'nope'"):
        apply_hooks('{"nope": 1}')
