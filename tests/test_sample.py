"""`dit sample` as a user runs it, on a checkpoint made without training (random weights, tiny sizes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dit.config import ConfigError, load_config
from dit.export import write_export
from dit.models.dit import build_dit
from dit.models.vae import CausalVAE, save_vae

DIT = str(Path(sys.executable).parent / "dit")
SIZE = (5, 16, 32)  # frames, height, width: not the old CLI defaults (17 x 64 x 64)


def write_checkpoint(root: Path, *overrides: str, randomize: bool = False) -> Path:
    """A run folder as the trainer writes it (weights, config.json, vae/) at SIZE with random weights; randomize:
    draw every weight (not the adaLN-Zero init, whose prediction is all zeros)."""
    frames, height, width = SIZE
    cfg = load_config(None, [f"data.frames={frames}", f"data.height={height}", f"data.width={width}",
                             "text.encoder=none", "model.preset=dit-tiny", *overrides])
    torch.manual_seed(0)
    vae = CausalVAE(latent_channels=4, base_channels=8, channel_mults=(1, 1, 1, 1))
    save_vae(vae, root / "vae")
    model = build_dit(cfg.model, in_channels=vae.latent_channels, text_dim=8)
    if randomize:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.05)
    ckpt = root / "run" / "checkpoints" / "step-00000001"
    ckpt.mkdir(parents=True)
    write_export(ckpt, weights=model.state_dict(), config={"dit": model.config, "experiment": cfg.to_dict()},
                 vae_dir=root / "vae")
    return root / "run"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A checkpoint directory as the trainer writes it: weights, config.json, vae/."""
    return write_checkpoint(tmp_path_factory.mktemp("sample"))


def test_sample_without_size_flags_writes_the_trained_size(checkpoint: Path, tmp_path: Path) -> None:
    from PIL import Image

    out = tmp_path / "clip.gif"
    proc = subprocess.run([DIT, "sample", "--checkpoint", str(checkpoint), "--prompt", "a red circle",
                           "--steps", "2", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"{out}\ta red circle"]  # where it wrote the file, and for which prompt
    gif = Image.open(out)
    frames, height, width = SIZE
    assert gif.n_frames == frames and gif.size == (width, height)


def test_dynamic_cfg_is_said_and_needs_a_scale_above_one(checkpoint: Path, tmp_path: Path) -> None:
    base = [DIT, "sample", "--checkpoint", str(checkpoint), "--prompt", "a", "--steps", "2", "--frames", "1"]
    done = subprocess.run([*base, "--dynamic-cfg", "--out", str(tmp_path / "a.png")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "cfg 5 (dynamic)" in done.stderr  # (the default sample.cfg)
    bad = subprocess.run([*base, "--dynamic-cfg", "--cfg", "1", "--out", str(tmp_path / "b.png")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "--dynamic-cfg raises the guidance scale above 1 over the steps: give --cfg > 1" in bad.stderr
    assert not (tmp_path / "b.png").exists()
    with pytest.raises(ConfigError, match=r"sample\.dynamic_cfg: raises the guidance scale above 1"):
        load_config(None, ["sample.dynamic_cfg=true", "sample.cfg=1"])


def test_a_size_flag_overrides_only_its_own_dimension(checkpoint: Path, tmp_path: Path) -> None:
    from PIL import Image

    out = tmp_path / "clip.gif"
    proc = subprocess.run([DIT, "sample", "--checkpoint", str(checkpoint), "--prompt", "x", "--frames", "9",
                           "--steps", "2", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    gif = Image.open(out)
    assert gif.n_frames == 9 and gif.size == (SIZE[2], SIZE[1])


def test_bf16_sampling_follows_fp32(checkpoint: Path) -> None:
    """--dtype bf16: the denoiser under bf16 autocast gives the fp32 latents to bf16 precision (and is not fp32)."""
    from dit.pipeline import load_pipeline, sample_latents

    pipe = load_pipeline(checkpoint)
    torch.manual_seed(1)
    with torch.no_grad():  # leave the adaLN-Zero init, so that the prediction is not all zeros
        for p in pipe.model.parameters():
            p.normal_(0, 0.05)
    noise = torch.randn(2, 4, 2, 2, 4)
    text = torch.randn(2, 3, 8)
    cond = dict(text=text, text_mask=torch.ones(2, 3, dtype=torch.bool))
    uncond = dict(text=torch.zeros_like(text), text_mask=torch.tensor([[True, False, False]] * 2))
    fp32 = sample_latents(pipe, noise, cond, uncond, steps=4, cfg=3.0)
    bf16 = sample_latents(pipe, noise, cond, uncond, steps=4, cfg=3.0, dtype="bf16")
    assert bf16.dtype == torch.float32
    err = (bf16 - fp32).norm() / fp32.norm()
    assert 0 < err < 0.03, err
    with pytest.raises(ValueError, match="dtype"):
        sample_latents(pipe, noise, cond, uncond, steps=1, dtype="fp16")


def test_bf16_sampling_holds_the_weights_in_bf16(checkpoint: Path) -> None:
    """`dit sample` in bf16 holds the denoiser's weights in bf16 (load_pipeline(weights_dtype=)): half the memory,
    and as close to the fp32 latents as fp32 weights under the same autocast are (measured 1.396% against 1.398%;
    the two 0.36% apart: the ops autocast leaves in fp32, QK-norm's, see bf16-rounded weights)."""
    from dit.pipeline import load_pipeline, sample_latents

    held = load_pipeline(checkpoint, weights_dtype=torch.bfloat16)
    assert {p.dtype for p in held.model.parameters()} == {torch.bfloat16}
    pipe = load_pipeline(checkpoint)
    torch.manual_seed(1)
    with torch.no_grad():  # (off the adaLN-Zero init, as above)
        for p in pipe.model.parameters():
            p.normal_(0, 0.05)
    noise, text = torch.randn(2, 4, 2, 2, 4), torch.randn(2, 3, 8)
    cond = dict(text=text, text_mask=torch.ones(2, 3, dtype=torch.bool))
    uncond = dict(text=torch.zeros_like(text), text_mask=torch.tensor([[True, False, False]] * 2))
    fp32 = sample_latents(pipe, noise, cond, uncond, steps=4, cfg=3.0)
    autocast = sample_latents(pipe, noise, cond, uncond, steps=4, cfg=3.0, dtype="bf16")
    with torch.no_grad():
        for p in pipe.model.parameters():
            p.data = p.data.to(torch.bfloat16)
    bf16 = sample_latents(pipe, noise, cond, uncond, steps=4, cfg=3.0, dtype="bf16")
    err, err_autocast = ((x - fp32).norm() / fp32.norm() for x in (bf16, autocast))
    assert 0 < err < 1.1 * err_autocast < 0.03, (err, err_autocast)


def test_sample_flags_for_the_gpu(checkpoint: Path, tmp_path: Path) -> None:
    """--dtype bf16 samples on CPU too; --cuda-graphs without a CUDA device stops with the fix, before loading."""
    out = tmp_path / "clip.gif"
    proc = subprocess.run([DIT, "sample", "--checkpoint", str(checkpoint), "--prompt", "x", "--steps", "2",
                           "--dtype", "bf16", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and "denoiser in bf16, its weights in bf16" in proc.stderr
    if not torch.cuda.is_available():
        proc = subprocess.run([DIT, "sample", "--checkpoint", str(checkpoint), "--prompt", "x", "--cuda-graphs",
                               "--out", str(tmp_path / "g.gif")], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and "--cuda-graphs needs a CUDA device" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and not (tmp_path / "g.gif").exists()


def test_sample_compile_draws_the_eager_image(tmp_path: Path) -> None:
    """--compile: each block through torch.compile, the same image (to a uint8 step); refused with --cuda-graphs."""
    import numpy as np
    from PIL import Image

    run = write_checkpoint(tmp_path / "ckpt", randomize=True)
    images = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        out = tmp_path / f"{name}.png"
        proc = subprocess.run([DIT, "sample", "--checkpoint", str(run), "--prompt", "a red circle", "--frames", "1",
                               "--steps", "3", "--out", str(out), *extra], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert ("its blocks compiled" in proc.stderr) == (name == "compiled")
        images[name] = np.asarray(Image.open(out), dtype=np.int16)
    assert images["eager"].std() > 0
    assert np.abs(images["compiled"] - images["eager"]).max() <= 1
    proc = subprocess.run([DIT, "sample", "--checkpoint", str(run), "--prompt", "x", "--compile", "--cuda-graphs",
                           "--out", str(tmp_path / "g.png")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--cuda-graphs and --compile" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_dtype_auto_is_bf16_on_a_gpu_only() -> None:
    from dit.sample import sample_dtype

    assert sample_dtype("auto", torch.device("cpu")) == "fp32"  # bf16 pays on CPU only with bf16 instructions
    assert sample_dtype("bf16", torch.device("cpu")) == "bf16" and sample_dtype("fp32", torch.device("cpu")) == "fp32"
    if torch.cuda.is_available():
        expected = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        assert sample_dtype("auto", torch.device("cuda")) == expected


def test_a_checkpoint_trained_with_a_cuda_only_kernel_samples_on_cpu(tmp_path: Path) -> None:
    """model.attention=cudnn (a GPU run's choice) names a kernel, not a model: on a CPU the sampler uses sdpa, says
    so, and draws what the default kernel draws."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU cudnn is there")
    runs = {}
    for kernel in ("cudnn", "auto"):
        run = write_checkpoint(tmp_path / kernel, f"model.attention={kernel}", randomize=True)
        out = tmp_path / f"{kernel}.png"
        proc = subprocess.run([DIT, "sample", "--checkpoint", str(run), "--prompt", "x", "--frames", "1", "--steps",
                               "2", "--out", str(out)], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        runs[kernel] = (proc.stderr, out.read_bytes())
    assert "trained with model.attention=cudnn, which cpu lacks: sampling with sdpa" in runs["cudnn"][0]
    assert "model.attention" not in runs["auto"][0]
    assert runs["cudnn"][1] == runs["auto"][1]


def test_fp8_sampling_follows_fp32_with_its_block_weights_in_a_byte(tmp_path: Path) -> None:
    """--fp8: every block linear but the modulation ones holds e4m3 codes + row scales (converted before the move to
    the device); the latents follow fp32's within e4m3's rounding, and the CLI says so."""
    from dit.models.fp8 import Fp8Linear, fp8_candidates
    from dit.pipeline import load_pipeline, sample_latents

    run = write_checkpoint(tmp_path, randomize=True)
    plain, fp8 = load_pipeline(run), load_pipeline(run, fp8=True)
    swapped = [n for n, m in fp8.model.blocks.named_modules() if isinstance(m, Fp8Linear)]
    assert swapped == [n for n, _ in fp8_candidates(plain.model.blocks)] and swapped
    size = lambda model: sum(p.numel() * p.element_size() for p in model.blocks.parameters())  # noqa: E731
    linears = [m for _, m in fp8_candidates(plain.model.blocks)]  # fp32 weights -> 1 byte each + an fp32 row scale
    assert size(plain.model) - size(fp8.model) == sum(3 * m.weight.numel() - 4 * m.out_features for m in linears)
    noise, text = torch.randn(2, 4, 2, 2, 4), torch.randn(2, 3, 8)
    cond = dict(text=text, text_mask=torch.ones(2, 3, dtype=torch.bool))
    uncond = dict(text=torch.zeros_like(text), text_mask=torch.tensor([[True, False, False]] * 2))
    a, b = (sample_latents(p, noise, cond, uncond, steps=4, cfg=3.0) for p in (plain, fp8))
    assert 0 < ((b - a).norm() / a.norm()).item() < 0.05
    out = tmp_path / "clip.gif"
    proc = subprocess.run([DIT, "sample", "--checkpoint", str(run), "--prompt", "x", "--steps", "2", "--fp8",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and "its block weights in fp8" in proc.stderr
