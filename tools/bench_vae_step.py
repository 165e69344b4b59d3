"""The VAE's training step on CPU (a tool, not a test): plain AdamW, fused AdamW, channels_last_3d conv weights and
input, and both, one step of each in turn so that load on the machine hits all alike; the median per variant.

    .venv/bin/python tools/bench_vae_step.py                 # configs/demo.yaml's VAE, batch 8, frames 1 and 5

Random clips in [-1, 1]; the loss is the demo's (vae.chroma_weight=4, no L1); the loader is not timed
(tools/bench_decode_cache.py times that).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit.config import Config, load_config  # noqa: E402
from dit.models.vae import build_vae, vae_loss  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def variant(cfg: Config, fused: bool, channels_last: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    vae = build_vae(cfg.vae)
    if channels_last:
        for m in vae.modules():
            if isinstance(m, torch.nn.Conv3d):
                m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last_3d)
    return vae, torch.optim.AdamW(vae.parameters(), lr=1e-4, fused=fused or None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--frames", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=25, help="steps per variant (the first 3 untimed)")
    a = ap.parse_args()
    cfg = load_config(CONFIG, ["vae.chroma_weight=4"])
    variants = {"plain": variant(cfg, False, False), "fused": variant(cfg, True, False),
                "channels_last": variant(cfg, False, True), "fused+channels_last": variant(cfg, True, True)}
    for frames in a.frames:
        x = torch.rand(a.batch, 3, frames, a.size, a.size) * 2 - 1
        times: dict[str, list[float]] = {k: [] for k in variants}
        for i in range(a.steps):
            for name, (vae, opt) in variants.items():
                xi = x.contiguous(memory_format=torch.channels_last_3d) if "channels_last" in name else x
                t0 = time.perf_counter()
                recon, posterior = vae(xi)
                loss, _ = vae_loss(recon, xi, posterior, cfg.vae.kl_weight, 0.0, 4.0)
                loss.backward()
                opt.step()
                opt.zero_grad()
                if i >= 3:
                    times[name].append(time.perf_counter() - t0)
        print(f"{a.batch}x{frames}x{a.size}x{a.size}: " +
              "  ".join(f"{k} {statistics.median(v) * 1e3:.1f} ms" for k, v in times.items()))


if __name__ == "__main__":
    main()
