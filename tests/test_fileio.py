"""Atomic writes: the target is the old one or the complete new one, never half of it."""

from __future__ import annotations

from pathlib import Path

import pytest

from dit.fileio import atomic_file, publish, sha256_file


def test_atomic_file_replaces_the_target_only_when_complete(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    target.write_text("old")
    with atomic_file(target) as tmp:
        tmp.write_text("new")
        assert target.read_text() == "old" and tmp.parent == tmp_path and tmp.name.startswith(".a.json.")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_an_error_leaves_the_old_target_and_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_publish_renames_a_whole_directory(tmp_path: Path) -> None:
    tmp = tmp_path / ".tmp-x"
    (tmp / "sub").mkdir(parents=True)
    (tmp / "sub" / "f.bin").write_bytes(b"1234")
    publish(tmp, tmp_path / "x")
    assert (tmp_path / "x" / "sub" / "f.bin").read_bytes() == b"1234" and not tmp.exists()


def test_sha256_file_streams_the_file(tmp_path: Path) -> None:
    import hashlib

    data = bytes(range(256)) * 20_000  # 5 MB: more than one chunk
    (tmp_path / "big.bin").write_bytes(data)
    assert sha256_file(tmp_path / "big.bin") == hashlib.sha256(data).hexdigest()
