"""The analytic FLOP count (dit/models/flops.py) against FlopCounterMode, and the two speed benchmarks run end to end
(tools/bench_train.py, tools/bench_sample.py) at a tiny size. No timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dit.models.dit import DiT
from dit.models.flops import (
    counted_flops,
    counted_forward_flops,
    dit_config,
    dit_flops_breakdown,
    dit_forward_flops,
    train_step_flops,
)

ROOT = Path(__file__).resolve().parents[1]


def _inputs(batch: int, channels: int, grid: tuple[int, int, int], text_len: int, text_dim: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, *grid, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    text = torch.randn(batch, text_len, text_dim, generator=g)
    mask = torch.ones(batch, text_len, dtype=torch.bool)
    mask[-1, text_len // 2:] = False  # padded keys are computed all the same
    return x, t, text, mask


@pytest.mark.parametrize("preset,grid,text_len", [("dit-tiny", (3, 8, 8), 7), ("DiT-S/2", (2, 8, 8), 5)])
def test_forward_flops_match_flop_counter(preset: str, grid: tuple[int, int, int], text_len: int) -> None:
    torch.manual_seed(0)
    cfg = dit_config(preset)
    model = DiT(**cfg).eval()
    batch = 2
    counted = counted_forward_flops(model, *_inputs(batch, cfg["in_channels"], grid, text_len, cfg["text_dim"]))
    analytic = dit_forward_flops(model, grid, text_len, batch)
    assert analytic == dit_forward_flops(cfg, grid, text_len, batch)  # a model or its config
    assert counted > 0
    assert abs(analytic - counted) / counted < 0.02
    parts = dit_flops_breakdown(cfg, grid, text_len, batch)
    assert all(v > 0 for v in parts.values()) and sum(parts.values()) == analytic


def test_train_step_is_three_forwards() -> None:
    """forward + backward under FlopCounterMode is close to (a little under) the 3 x forward convention."""
    torch.manual_seed(0)
    cfg = dit_config("dit-tiny")
    model = DiT(**cfg)
    grid, text_len, batch = (2, 8, 8), 6, 2
    x, t, text, mask = _inputs(batch, cfg["in_channels"], grid, text_len, cfg["text_dim"])
    counted, _ = counted_flops(lambda: model(x, t, text, mask).square().mean().backward())
    analytic = train_step_flops(cfg, grid, text_len, batch)
    assert analytic == 3 * dit_forward_flops(cfg, grid, text_len, batch)
    assert 0.97 < analytic / counted < 1.03


def test_bad_grid() -> None:
    with pytest.raises(ValueError, match="patch size"):
        dit_forward_flops(dit_config("dit-tiny"), (2, 7, 8), 4)


def _run_tool(tool: str, tmp_path: Path, *args: str) -> dict:
    out = tmp_path / f"{tool}.json"
    cmd = [sys.executable, str(ROOT / "tools" / f"{tool}.py"), *args, "--device", "cpu", "--threads", "1",
           "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def _positive(d: dict, *keys: str) -> None:
    for k in keys:
        assert isinstance(d[k], int | float) and d[k] > 0, (k, d[k])


def test_bench_train_runs(tmp_path: Path) -> None:
    r = _run_tool("bench_train", tmp_path, "--preset", "dit-tiny", "--shape", "5x32x32", "--batch", "2",
                  "--compare", "diffusers", "--steps", "1", "--warmup", "1", "--matmul-size", "256")
    assert r["latent_shape"] == [4, 2, 4, 4] and r["tokens_per_sample"] == 8 and r["dtype"] == "fp32"
    assert r["flops_per_step"] == train_step_flops(dit_config("dit-tiny"), (2, 4, 4), r["text_len"], 2)
    assert abs(r["flops_per_step_counted"] / r["flops_per_step"] - 1) < 0.02
    _positive(r, "samples_per_s", "tokens_per_s", "achieved_tflops", "peak_tflops_measured", "mfu",
              "peak_memory_bytes", "step_time_s", "step_cpu_s", "activation_gb", "ratio", "ratio_samples_per_s",
              "ratio_cpu_time")
    assert len(r["step_times_s"]) == 1
    c = r["compare"]
    assert c["model"] == "diffusers.WanTransformer3DModel"
    assert c["config"]["num_layers"] == 4 and c["config"]["num_attention_heads"] == 4
    _positive(c, "samples_per_s", "achieved_tflops", "flops_per_step", "mfu", "activation_gb")
    assert abs(c["flops_per_step"] / r["flops_per_step_counted"] - 1) < 0.1  # the same size of model
    # dit plan's activation term (its family's values per token) against the tensors saved for backward, both models
    # (0.88 and 0.90 here; 0.99 and 1.02 at DiT-S/2, BENCHMARKS.md)
    assert 0.75 < r["plan_activation_gb"] / r["activation_gb"] < 1.33
    assert 0.75 < c["plan_activation_gb"] / c["activation_gb"] < 1.33
    assert "FlopCounterMode" in r["ratio_method"]


def test_bench_train_bf16_without_compare(tmp_path: Path) -> None:
    args = ("--preset", "dit-tiny", "--shape", "1x16x16", "--batch", "1", "--dtype", "bf16", "--steps", "1",
            "--warmup", "1", "--matmul-size", "128")
    r = _run_tool("bench_train", tmp_path, *args)
    assert r["dtype"] == "bf16" and r["autocast"] is True and r["latent_shape"] == [4, 1, 2, 2]
    assert "ratio" not in r and "compare" not in r
    _positive(r, "samples_per_s", "achieved_tflops", "mfu")
    # --checkpoint-every 2: blocks 0 and 2 of 4 recomputed, so fewer activations are saved; the same model FLOPs
    k = _run_tool("bench_train", tmp_path / "k2", *args, "--checkpoint-every", "2")
    assert k["checkpoint_every"] == 2 and r["checkpoint_every"] == 0
    assert 0 < k["activation_gb"] < r["activation_gb"] and k["flops_per_step"] == r["flops_per_step"]
    # --fused-qkv: one q/k/v layer, the same parameters and the same FLOPs as FlopCounterMode counts them
    f = _run_tool("bench_train", tmp_path / "qkv", *args, "--fused-qkv")
    assert f["fused_qkv"] is True and r["fused_qkv"] is False and f["params"] == r["params"]
    assert f["flops_per_step_counted"] == r["flops_per_step_counted"]
    # --lora 4: adapters beside the base (all fp32 without --lora-base: 4 bytes each); --lora-base bf16 holds the
    # base's block linears, most of its bytes, in half
    lora = _run_tool("bench_train", tmp_path / "lora", *args, "--lora", "4", "--lora-base", "bf16")
    assert lora["lora"] == 4 and lora["lora_base"] == "bf16" and lora["params"] > r["params"]
    assert r["param_bytes"] == 4 * r["params"] and 2 * lora["params"] < lora["param_bytes"] < 3 * lora["params"]


def test_bench_sample_runs(tmp_path: Path) -> None:
    r = _run_tool("bench_sample", tmp_path, "--preset", "dit-tiny", "--shape", "5x16x16", "--steps", "2",
                  "--cfg", "5", "--repeats", "1", "--warmup", "1", "--decode-repeats", "1")
    assert r["steps"] == 2 and r["forward_batch"] == 2 and r["latent_shape"] == [4, 2, 2, 2]
    assert len(r["step_times_s"]) == len(r["model_times_s"]) == 2
    _positive(r, "clips_per_s", "clips_per_s_with_decode", "sample_time_s", "model_time_s", "forward_flops")
    assert isinstance(r["overhead"], float) and r["overhead"] > -1
    for key in ("decode_full", "decode_chunked"):
        _positive(r[key], "time_s", "peak_memory_added_bytes")
    assert r["decode_full"]["chunk_size"] == 0 and r["decode_chunked"]["chunk_size"] == 1
    assert r["compile"] == "none"


@pytest.mark.parametrize("sampler", ["flow_unipc", "cogvideox_dpm"])
def test_bench_sample_runs_any_sampler(tmp_path: Path, sampler: str) -> None:
    r = _run_tool("bench_sample", tmp_path, "--preset", "dit-tiny", "--shape", "1x16x16", "--steps", "3",
                  "--repeats", "1", "--warmup", "1", "--decode-repeats", "1", "--sampler", sampler)
    assert r["sampler"] == sampler and len(r["step_times_s"]) == 3
    _positive(r, "sample_time_s", "model_time_s")


def test_bench_sample_compile(tmp_path: Path) -> None:
    """--compile: the blocks compile in the warm-up; the run's figures as without it (a sample is drawn, finite)."""
    r = _run_tool("bench_sample", tmp_path, "--preset", "dit-tiny", "--shape", "1x16x16", "--steps", "2",
                  "--repeats", "1", "--warmup", "1", "--decode-repeats", "1", "--compile")
    assert r["compile"] == "ours" and len(r["step_times_s"]) == 2
    _positive(r, "clips_per_s", "sample_time_s", "model_time_s")


def test_tools_import_without_media_libraries() -> None:
    """The benchmarks run where decord, PyAV and webdataset are missing (a GPU machine): none imported."""
    code = ("import sys; import tools.bench_train, tools.bench_sample; "
            "bad = [m for m in ('decord', 'av', 'webdataset', 'diffusers') if m in sys.modules]; "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("model", ["ours", "diffusers"])
def test_profile_train_step_splits_the_step(tmp_path: Path, model: str) -> None:
    out = tmp_path / "profile.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "profile_train_step.py"), "--preset", "dit-tiny",
                           "--shape", "5x32x32", "--batch", "2", "--model", model, "--steps", "1", "--warmup", "1",
                           "--threads", "1", "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["model"] == model and r["threads"] == 1
    assert set(r["share"]) == {"gemm", "attention", "other"} and abs(sum(r["share"].values()) - 1) < 1e-9
    assert all(v > 0 for v in r["seconds_per_step"].values())  # a training step has all three kinds of work
    ops = {row["op"] for row in r["top"]}
    assert ops & {"aten::mm", "aten::addmm"}  # the linears' GEMMs are among the heaviest ops
    assert f"{model}: " in proc.stdout and "gemm" in proc.stdout


# (CogVideoX, whose text stays whole on each rank: its SP accounting is test_plan.py's, its SP runs
# test_family_distributed.py's; its bench run here was left out for CI time, 2026-12-06)
@pytest.mark.parametrize("family", ["dit", "wan"])
def test_bench_sp_memory_runs(tmp_path: Path, family: str) -> None:
    """tools/bench_sp_memory.py on 2 gloo processes: each rank saves about 0.6 of one process at these 32 tokens (0.52
    at 2,304, BENCHMARKS.md), CogVideoX about 0.7 (its 32 text tokens stay whole on each rank, beside 16 of the
    clip's), and its gathered output is the 1-process one."""
    out = tmp_path / "sp.json"
    cmd = [sys.executable, str(ROOT / "tools" / "bench_sp_memory.py"), "--family", family, "--preset", "dit-tiny",
           "--shape", "5x64x64", "--sp", "1", "2", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["family"] == family and r["tokens"] == 32 and [row["sequence_parallel"] for row in r["rows"]] == [1, 2]
    one, two = r["rows"]
    low, high = (0.6, 0.8) if family == "cogvideox" else (0.45, 0.7)
    assert low < two["ratio_vs_first"] < high and two["max_abs_diff_vs_first"] < 1e-4
    assert len(two["saved_bytes_per_rank"]) == 2 and two["plan_gib_per_rank"] < one["plan_gib_per_rank"]
    # dit plan divides as the measure does (0.55 against 0.60 for ours and Wan, 0.74 against 0.70 for CogVideoX)
    assert abs(two["plan_gib_per_rank"] / one["plan_gib_per_rank"] - two["ratio_vs_first"]) < 0.08
