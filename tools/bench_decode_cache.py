"""Loader time per batch with and without ``data.decode_cache_mb`` (a tool, not a test), interleaved rounds.

    .venv/bin/python tools/bench_decode_cache.py --shards outputs/demo/vae_data --frames 5 --height 32 --width 32

Each round builds one loader per setting, reads past the first two epochs (the cache is full from the third on)
and times the next ``--batches`` batches; the median of the rounds is printed for each setting.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipelines.loader import build_loader  # noqa: E402
from dit.config import DataConfig  # noqa: E402


def ms_per_batch(cfg: DataConfig, batch: int, skip: int, batches: int) -> float:
    it = iter(build_loader(cfg, batch, seed=0))
    for _ in range(skip):
        next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return (time.perf_counter() - t0) / batches * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", required=True)
    ap.add_argument("--frames", type=int, default=5)
    ap.add_argument("--height", type=int, default=32)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--mb", type=float, default=64, help="data.decode_cache_mb of the cached setting")
    ap.add_argument("--skip", type=int, default=130, help="batches read before timing (two epochs of the demo's)")
    ap.add_argument("--batches", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    times: dict[float, list[float]] = {0: [], a.mb: []}
    for _ in range(a.rounds):
        for mb in times:
            cfg = DataConfig(shards=a.shards, frames=a.frames, height=a.height, width=a.width, decode_cache_mb=mb)
            times[mb].append(ms_per_batch(cfg, a.batch, a.skip, a.batches))
    for mb, ts in times.items():
        print(f"decode_cache_mb={mb:g}: {statistics.median(ts):.1f} ms per batch of {a.batch} "
              f"(rounds: {', '.join(f'{t:.1f}' for t in ts)})")


if __name__ == "__main__":
    main()
