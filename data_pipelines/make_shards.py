"""Your own videos and images → checked WebDataset shards (``dit make-shards``); a look inside (``dit inspect-shards``).

A source is one of

- a folder: every video (mp4/webm/mkv/avi/mov) and image (jpg/jpeg/png/webp) under it, each with a
  sidecar caption ``NAME.txt`` next to it;
- a ``.csv`` with a header and the columns ``path,caption``;
- a ``.jsonl`` with one ``{"path": ..., "caption": ...}`` per line.

Relative paths are relative to the CSV/JSONL file. Every file is probed (opened and one frame decoded:
frame count, fps, size); files that are missing, unreadable or have no caption or one that is not UTF-8 text are
rejected by reason (as the loader names them: ``missing``, ``decode_error``, ``no_caption``, ``bad_caption``, and
``no_media`` for a folder's caption file without a media file), listed in stats.json, never written. Samples are
sorted by path and keyed by their index, and tar timestamps are fixed, so the same files and captions give
byte-identical shards whatever the source form.

The output folder must be new or empty: shards left there by an earlier run would be read with the new ones.
``overwrite=True`` (``--overwrite``) replaces a folder that holds only an earlier make-shards output (.tar files,
stats.json). The shards are written to a temporary folder beside it and renamed into place when complete.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tarfile
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tqdm import tqdm

from data_pipelines.config import ConfigError
from data_pipelines.decode import IMAGE_EXTS, VIDEO_EXTS, DecodeError, decode_image, decode_video
from data_pipelines.shards import expand_shards
from data_pipelines.writer import write_shards

MTIME = 1_700_000_000.0  # fixed tar timestamps: same inputs, same bytes


Item = tuple[Path, "str | None", "str | None"]  # (media path, caption or None, why it is rejected or None)


def _not_utf8(e: UnicodeDecodeError) -> str:
    return f"not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); save it as UTF-8"


def _sidecar(path: Path) -> tuple[str | None, str | None]:
    """(caption, problem) of a media file's ``NAME.txt``: (None, None) when there is none."""
    txt = path.with_suffix(".txt")
    if not txt.is_file():
        return None, None
    try:
        return txt.read_text(encoding="utf-8").strip() or None, None
    except UnicodeDecodeError as e:
        return None, f"bad_caption: {txt.name} is {_not_utf8(e)}"


def _read_text(src: Path) -> str:
    try:
        return src.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{src} is {_not_utf8(e)}") from None


def _caption(value: object) -> tuple[str | None, str | None]:
    """(caption, problem) of a CSV/JSONL caption value."""
    if value is None or isinstance(value, str):
        return (value or "").strip() or None, None
    return None, f"bad_caption: the caption is a {type(value).__name__} ({str(value)[:50]!r}), not text"


def read_source(src: str | Path) -> list[Item]:
    """``[(media path, caption or None, reject reason or None), ...]`` from a folder, CSV or JSONL (see the module
    docstring). A folder's caption file without a media file is listed too, with the reason ``no_media``."""
    src = Path(src)
    if src.is_dir():
        media = VIDEO_EXTS + IMAGE_EXTS
        files = sorted(p for p in src.rglob("*") if p.suffix.lower().lstrip(".") in media)
        stems = {p.with_suffix("") for p in files}
        orphans = sorted(p for p in src.rglob("*.txt") if p.with_suffix("") not in stems)
        return [(p.resolve(), *_sidecar(p)) for p in files] + [
            (p.resolve(), None, f"no_media: a caption without a media file ({p.stem}.mp4, .jpg, ...) beside it")
            for p in orphans]
    if not src.is_file():
        raise FileNotFoundError(f"source {str(src)!r} does not exist; give a folder of media with sidecar .txt "
                                "captions, a .csv (path,caption) or a .jsonl ({\"path\", \"caption\"})")
    if src.suffix.lower() == ".csv":
        rows = list(csv.DictReader(_read_text(src).splitlines()))
        if rows and not {"path", "caption"} <= set(rows[0]):
            raise ConfigError(f"{src}: the CSV needs a header with the columns path,caption; got {list(rows[0])}")
    elif src.suffix.lower() == ".jsonl":
        rows = []
        for i, line in enumerate(_read_text(src).splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{src}: line {i} is not JSON ({e}); each line must be an object like "
                                      "{\"path\": \"clip.mp4\", \"caption\": \"...\"}") from None
        bad = [i + 1 for i, r in enumerate(rows) if not isinstance(r, dict) or "path" not in r]
        if bad:
            raise ConfigError(f"{src}: lines {bad[:5]} are not objects with a \"path\" (and \"caption\")")
    else:
        raise ConfigError(f"source {str(src)!r}: expected a folder, a .csv or a .jsonl file")
    resolve = lambda p: (Path(p) if Path(p).is_absolute() else src.parent / p).resolve()  # noqa: E731
    return [(resolve(r["path"]), *_caption(r.get("caption"))) for r in rows]


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


def _check(item: Item) -> tuple[Path, str | None, dict[str, Any] | None, str | None]:
    path, caption, problem = item
    if problem is not None:
        return path, caption, None, problem
    if not path.is_file():
        return path, caption, None, "missing"
    if caption is None:
        return path, caption, None, "no_caption"
    try:
        return path, caption, probe(path), None
    except (DecodeError, ValueError, IndexError, RuntimeError) as e:
        return path, caption, None, f"decode_error: {str(e)[:200]}"


OUTPUTS = ("*.tar", "stats.json")  # what make_shards writes: all that --overwrite may replace


def check_output(out: str | Path, overwrite: bool = False) -> None:
    """Refuse an output folder that is not new or empty (its old shards would be read with the new ones), unless
    ``overwrite`` and it holds only an earlier make-shards output; ``ConfigError`` says what to do."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {str(out)!r} is a file, not a folder; pick a folder name")
    held = sorted(out.iterdir()) if out.is_dir() else []
    if not held:
        return
    if not overwrite:
        names = ", ".join(p.name for p in held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
        raise ConfigError(f"output folder {str(out)!r} is not empty (it holds {names}): shards left there would be "
                          "read with the new ones. Pick a new folder, or pass --overwrite to replace it whole")
    foreign = [p for p in held if not (p.is_file() and any(p.match(g) for g in OUTPUTS))]
    if foreign:
        raise ConfigError(f"--overwrite replaces only an earlier make-shards output (.tar files and stats.json), but "
                          f"{str(out)!r} also holds {', '.join(p.name for p in foreign[:3])}: pick a new folder or "
                          "remove them yourself")


def make_shards(src: str | Path, out: str | Path, *, maxcount: int = 1000, workers: int = 4,
                progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Probe every file of ``src`` and write ``out/00000.tar, ...`` plus ``out/stats.json``; returns the stats.

    ``out`` must be new or empty; ``overwrite`` replaces an earlier make-shards output there (``check_output``)."""
    if maxcount < 1 or workers < 1:
        raise ConfigError(f"--maxcount (samples per shard) and --workers must be >= 1, got {maxcount} and {workers}")
    out = Path(out)
    check_output(out, overwrite)  # before any work
    items = sorted(read_source(src), key=lambda x: str(x[0]))
    if not any(why is None or not why.startswith("no_media") for _, _, why in items):
        raise ConfigError(f"source {str(src)!r} lists no media files ({', '.join(VIDEO_EXTS + IMAGE_EXTS)})")
    with ThreadPoolExecutor(max(1, workers)) as pool:  # decoders release the GIL
        checked = list(tqdm(pool.map(_check, items), total=len(items), desc="probe", disable=not progress))
    good = [(p, c, m) for p, c, m, why in checked if why is None]
    rejects = [{"path": str(p), "reason": why} for p, _, _, why in checked if why is not None]
    samples = ({"__key__": f"{i:09d}", m["ext"]: p.read_bytes(), "txt": c,
                "json": {"source": str(p), "caption": c, **{k: v for k, v in m.items() if k != "ext"}}}
               for i, (p, c, m) in enumerate(good))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial"))
    try:
        umask = os.umask(0o022)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # a folder as mkdir makes it (mkdtemp's is private to this user)
        written = write_shards(samples, str(tmp / "%05d.tar"), maxcount=maxcount, mtime=MTIME) if good else []
        shards = [str(out / Path(p).name) for p in written]
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
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2))
        check_output(out, overwrite)  # (still so: nothing else was written there meanwhile)
        if out.is_dir():
            shutil.rmtree(out)  # empty, or an earlier output that overwrite replaces
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return stats


def inspect_shards(spec: str, *, dump: str | Path | None = None, num: int = 3) -> dict[str, Any]:
    """Count samples, media kinds and captions in the shards of ``spec`` without decoding; with ``dump``,
    write the first ``num`` samples' media (as stored: mp4/jpg/png) and captions there."""
    summary: dict[str, Any] = {"shards": 0, "samples": 0, "extensions": Counter(), "no_caption": 0,
                               "unreadable_shards": [], "examples": []}
    dumped = 0
    for url in expand_shards(spec, name="SPEC"):
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
