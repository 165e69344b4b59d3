"""Your own videos and images → checked WebDataset shards (``dit make-shards``); a look inside (``dit inspect-shards``).

A source is one of

- a folder: every video (mp4/webm/mkv/avi/mov) and image (jpg/jpeg/png/webp) under it, each with a
  sidecar caption ``NAME.txt`` next to it;
- a ``.csv`` with a header and the columns ``path,caption``;
- a ``.jsonl`` with one ``{"path": ..., "caption": ...}`` per line.

Relative paths are relative to the CSV/JSONL file. Every file is probed (opened and one frame decoded:
frame count, fps, size); files that are missing, unreadable or have no caption are rejected by reason,
never written. Samples are sorted by path and keyed by their index, and tar timestamps are fixed, so
the same files and captions give byte-identical shards whatever the source form.
"""

from __future__ import annotations

import csv
import json
import tarfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tqdm import tqdm

from data_pipelines.decode import IMAGE_EXTS, VIDEO_EXTS, DecodeError, decode_image, decode_video
from data_pipelines.shards import expand_shards
from data_pipelines.writer import write_shards

MTIME = 1_700_000_000.0  # fixed tar timestamps: same inputs, same bytes


def _sidecar(path: Path) -> str | None:
    txt = path.with_suffix(".txt")
    return (txt.read_text(encoding="utf-8").strip() or None) if txt.is_file() else None


def read_source(src: str | Path) -> list[tuple[Path, str | None]]:
    """``[(media path, caption or None), ...]`` from a folder, CSV or JSONL (see the module docstring)."""
    src = Path(src)
    if src.is_dir():
        files = sorted(p for p in src.rglob("*") if p.suffix.lower().lstrip(".") in VIDEO_EXTS + IMAGE_EXTS)
        return [(p.resolve(), _sidecar(p)) for p in files]
    if not src.is_file():
        raise FileNotFoundError(f"source {str(src)!r} does not exist; give a folder of media with sidecar .txt "
                                "captions, a .csv (path,caption) or a .jsonl ({\"path\", \"caption\"})")
    if src.suffix.lower() == ".csv":
        with open(src, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        if rows and not {"path", "caption"} <= set(rows[0]):
            raise ValueError(f"{src}: the CSV needs a header with the columns path,caption; got {list(rows[0])}")
    elif src.suffix.lower() == ".jsonl":
        rows = [json.loads(line) for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
        bad = [i + 1 for i, r in enumerate(rows) if not isinstance(r, dict) or "path" not in r]
        if bad:
            raise ValueError(f"{src}: lines {bad[:5]} are not objects with a \"path\" (and \"caption\")")
    else:
        raise ValueError(f"source {str(src)!r}: expected a folder, a .csv or a .jsonl file")
    resolve = lambda p: (Path(p) if Path(p).is_absolute() else src.parent / p).resolve()  # noqa: E731
    return [(resolve(r["path"]), (r.get("caption") or "").strip() or None) for r in rows]


def probe(path: Path) -> dict[str, Any]:
    """Open a media file and decode one frame: ``{"kind", "ext", "width", "height", ("frames", "fps")}``.

    Raises ``FileNotFoundError`` or ``DecodeError``.
    """
    ext = path.suffix.lower().lstrip(".")
    data = path.read_bytes()
    if ext in IMAGE_EXTS:
        img = decode_image(data)
        return {"kind": "image", "ext": ext, "width": img.shape[1], "height": img.shape[0]}
    if ext not in VIDEO_EXTS:
        raise DecodeError(f"unsupported extension .{ext}; use one of {', '.join(VIDEO_EXTS + IMAGE_EXTS)}")
    frames, info = decode_video(data, [0])
    return {"kind": "video", "ext": ext, "width": info.width, "height": info.height, "frames": info.num_frames,
            "fps": round(info.fps, 3)}


def _check(item: tuple[Path, str | None]) -> tuple[Path, str | None, dict[str, Any] | None, str | None]:
    path, caption = item
    if not path.is_file():
        return path, caption, None, "missing"
    if caption is None:
        return path, caption, None, "no_caption"
    try:
        return path, caption, probe(path), None
    except (DecodeError, ValueError, IndexError, RuntimeError) as e:
        return path, caption, None, f"decode_error: {str(e)[:200]}"


def make_shards(src: str | Path, out: str | Path, *, maxcount: int = 1000, workers: int = 4,
                progress: bool = True) -> dict[str, Any]:
    """Probe every file of ``src`` and write ``out/00000.tar, ...`` plus ``out/stats.json``; returns the stats."""
    items = sorted(read_source(src), key=lambda x: str(x[0]))
    if not items:
        raise ValueError(f"source {str(src)!r} lists no media files ({', '.join(VIDEO_EXTS + IMAGE_EXTS)})")
    with ThreadPoolExecutor(max(1, workers)) as pool:  # decoders release the GIL
        checked = list(tqdm(pool.map(_check, items), total=len(items), desc="probe", disable=not progress))
    good = [(p, c, m) for p, c, m, why in checked if why is None]
    rejects = [{"path": str(p), "reason": why} for p, _, _, why in checked if why is not None]
    samples = ({"__key__": f"{i:09d}", m["ext"]: p.read_bytes(), "txt": c,
                "json": {"source": str(p), "caption": c, **{k: v for k, v in m.items() if k != "ext"}}}
               for i, (p, c, m) in enumerate(good))
    shards = write_shards(samples, str(Path(out) / "%05d.tar"), maxcount=maxcount, mtime=MTIME) if good else []
    durations = Counter()
    for _, _, m in good:
        if m["kind"] == "video" and m["fps"]:
            seconds = m["frames"] / m["fps"]
            durations[next(f"<{b}s" for b in (1, 2, 5, 10, 30, 60, float("inf")) if seconds < b)] += 1
    stats = {"source": str(src), "files": len(items), "written": len(good), "shards": shards,
             "videos": sum(m["kind"] == "video" for _, _, m in good),
             "images": sum(m["kind"] == "image" for _, _, m in good),
             "rejected": dict(Counter(r["reason"].split(":")[0] for r in rejects)), "rejects": rejects,
             "duration_histogram": dict(durations),
             "resolution_histogram": dict(Counter(f"{m['width']}x{m['height']}" for _, _, m in good))}
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "stats.json").write_text(json.dumps(stats, indent=2))
    return stats


def inspect_shards(spec: str, *, dump: str | Path | None = None, num: int = 3) -> dict[str, Any]:
    """Count samples, media kinds and captions in the shards of ``spec`` without decoding; with ``dump``,
    write the first ``num`` samples' media (as stored: mp4/jpg/png) and captions there."""
    summary: dict[str, Any] = {"shards": 0, "samples": 0, "extensions": Counter(), "no_caption": 0,
                               "unreadable_shards": [], "examples": []}
    dumped = 0
    for url in expand_shards(spec):
        summary["shards"] += 1
        groups: dict[str, dict[str, bytes]] = {}
        try:
            with tarfile.open(url) as tf:
                for m in tf:
                    if m.isfile() and "." in Path(m.name).name:
                        key, ext = Path(m.name).name.split(".", 1)
                        groups.setdefault(key, {})[ext] = tf.extractfile(m).read()
        except (tarfile.TarError, OSError) as e:
            summary["unreadable_shards"].append(f"{url}: {e}")
        for key, sample in groups.items():
            summary["samples"] += 1
            summary["extensions"].update(e for e in sample if e in VIDEO_EXTS + IMAGE_EXTS)
            summary["no_caption"] += "txt" not in sample
            if len(summary["examples"]) < num:
                summary["examples"].append({"key": key, "caption": sample.get("txt", b"").decode("utf-8", "replace")})
            if dump is not None and dumped < num:
                Path(dump).mkdir(parents=True, exist_ok=True)
                for ext in ("txt", *VIDEO_EXTS, *IMAGE_EXTS):
                    if ext in sample:
                        (Path(dump) / f"{key}.{ext}").write_bytes(sample[ext])
                dumped += 1
    summary["extensions"] = dict(summary["extensions"])
    return summary
