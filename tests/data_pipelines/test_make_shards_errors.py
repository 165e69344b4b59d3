"""`dit make-shards` and `dit inspect-shards` on a new user's mistakes (issue 13, defects 6, 7, 12), as a real
subprocess: a bad caption is one rejected sample, not a failed job; a used output folder is refused (or replaced
whole with --overwrite); shards nobody can read are an error."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cli_errors import assert_one_error_line  # noqa: E402

from data_pipelines.config import ConfigError  # noqa: E402
from data_pipelines.make_shards import make_shards  # noqa: E402
from data_pipelines.synthetic import render_clip  # noqa: E402
from data_pipelines.writer import encode_mp4  # noqa: E402

DIT = str(Path(sys.executable).parent / "dit")


def dit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([DIT, *args], capture_output=True, text=True, timeout=300)


def clip(path: Path, color: str) -> None:
    video, _ = render_clip(color, "circle", "left", frames=5, height=32, width=32, rng=random.Random(0))
    path.write_bytes(encode_mp4(video, 8))


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    """Three real clips: a UTF-8 caption (with an accent), a Latin-1 one, a plain one; and a caption alone."""
    src = tmp_path / "videos"
    src.mkdir()
    for name, color in (("a", "red"), ("b", "blue"), ("c", "green")):
        clip(src / f"{name}.mp4", color)
    (src / "a.txt").write_text("a red circle in a café", encoding="utf-8")
    (src / "b.txt").write_bytes("a blue circle in a café".encode("latin-1"))
    (src / "c.txt").write_text("a green circle", encoding="utf-8")
    (src / "lonely.txt").write_text("a caption whose clip is missing", encoding="utf-8")
    return src


def keys_and_captions(shards: list[str]) -> list[str]:
    captions = []
    for shard in shards:
        with tarfile.open(shard) as tf:
            captions += [tf.extractfile(m).read().decode() for m in tf if m.name.endswith(".txt")]
    return sorted(captions)


def test_a_latin1_caption_rejects_its_sample_and_a_lone_caption_is_listed(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    proc = dit("make-shards", str(folder), str(out), "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    stats = json.loads((out / "stats.json").read_text())
    assert stats["written"] == 2 and stats["rejected"] == {"bad_caption": 1, "no_media": 1}
    reasons = {Path(r["path"]).name: r["reason"] for r in stats["rejects"]}
    assert reasons["b.mp4"].startswith("bad_caption: b.txt is not UTF-8") and "0xe9" in reasons["b.mp4"]
    assert reasons["lonely.txt"].startswith("no_media")
    assert keys_and_captions(stats["shards"]) == ["a green circle", "a red circle in a café"]


def test_a_latin1_csv_is_one_error_line_naming_the_file(folder: Path, tmp_path: Path) -> None:
    listing = tmp_path / "list.csv"
    listing.write_bytes("path,caption\nvideos/a.mp4,un café\n".encode("latin-1"))
    proc = dit("make-shards", str(listing), str(tmp_path / "shards"))
    assert_one_error_line(proc, str(listing), "not UTF-8", "save it as UTF-8")
    assert not (tmp_path / "shards").exists()


def test_a_used_output_folder_is_refused_and_overwrite_replaces_it_whole(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    make_shards(folder, out, maxcount=1, workers=1, progress=False)
    first = sorted(p.name for p in out.iterdir())
    assert first == ["00000.tar", "00001.tar", "stats.json"]

    (folder / "a.mp4").unlink()  # a smaller source: one clip left
    proc = dit("make-shards", str(folder), str(out), "--maxcount", "1")
    assert_one_error_line(proc, str(out), "not empty", "new folder", "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == first  # untouched

    proc = dit("make-shards", str(folder), str(out), "--maxcount", "1", "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["00000.tar", "stats.json"]  # no stale 00001.tar
    stats = json.loads((out / "stats.json").read_text())
    assert stats["shards"] == [str(out / "00000.tar")] and keys_and_captions(stats["shards"]) == ["a green circle"]
    assert not list(tmp_path.glob(".shards.*"))  # no temporary folder left

    (out / "notes.md").write_text("mine")  # something make-shards did not write: --overwrite does not delete it
    with pytest.raises(ConfigError, match="notes.md.*new folder"):
        make_shards(folder, out, workers=1, progress=False, overwrite=True)
    assert (out / "notes.md").read_text() == "mine" and (out / "00000.tar").is_file()


def test_no_usable_file_is_an_error_but_stats_json_says_why(tmp_path: Path) -> None:
    src = tmp_path / "videos"
    src.mkdir()
    (src / "x.mp4").write_bytes(b"not a video" * 20)
    (src / "x.txt").write_text("a caption")
    proc = dit("make-shards", str(src), str(tmp_path / "shards"))
    assert_one_error_line(proc, "none of the 1 files", "stats.json")
    assert json.loads((tmp_path / "shards" / "stats.json").read_text())["rejected"] == {"decode_error": 1}


def test_inspect_shards_fails_when_no_shard_is_readable(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "00000.tar").write_bytes(random.Random(0).randbytes(4096))
    (junk / "00001.tar").write_text("hello\n")
    proc = dit("inspect-shards", str(junk))
    assert_one_error_line(proc, "none of the 2 shards", "00000.tar")
    assert json.loads(proc.stdout)["unreadable_shards"]  # the summary is still printed


def test_inspect_shards_of_an_empty_folder_is_one_error_line(tmp_path: Path) -> None:
    assert_one_error_line(dit("inspect-shards", str(tmp_path)), str(tmp_path), "names no shards")
