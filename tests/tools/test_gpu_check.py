"""tools/gpu_check.sh, the script a session lent a GPU runs first, dry-run on CPU (``--cpu``) at its cheapest
meaningful size: the wheels and env parts and the DiT-B/2 slot's two benchmarks (tiny on CPU), without a wheelhouse
(CI has none). The JSON it writes is checked, never a timing. And tools/gpu_env.py's install of a wheelhouse."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import zipfile
from pathlib import Path

from dit.models.flops import dit_config, dit_forward_flops, train_step_flops

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "gpu_check.sh"


def gpu_check(out: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = ["bash", str(SCRIPT), "--cpu", "--python", sys.executable, "--out", str(out),
           "--wheels", str(out / "no_wheelhouse"), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def positive(d: dict, *keys: str) -> None:
    for k in keys:
        assert isinstance(d[k], int | float) and d[k] > 0, (k, d[k])


def test_cpu_dry_run_writes_sane_figures(tmp_path: Path) -> None:
    proc = gpu_check(tmp_path, "--only", "bench_train_B2,bench_sample_B2,variants")
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    log = (tmp_path / "gpu_check.log").read_text()
    assert "no wheelhouse at" in log and "using the packages already installed" in log
    assert log == proc.stdout  # everything printed is in the log
    table = log[log.rindex("part "):].splitlines()
    variants = ["variant_B2_math", "variant_B2_checkpoint_every_2", "variant_B2_fused_qkv", "variant_B2_sample_math",
                "variant_B2_lora_bf16_base"]
    assert [line.split()[:2] for line in table[1:]] == [
        ["wheels", "ok"], ["env", "ok"], ["bench_train_B2", "ok"], ["bench_sample_B2", "ok"],
        *[[v, "ok"] for v in variants], ["total", "ok"]]

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ok"] is True and summary["mode"] == "cpu"
    assert [p["part"] for p in summary["parts"]] == ["wheels", "env", "bench_train_B2", "bench_sample_B2", *variants]
    # the variants: one file, each run with its one option, named in its figures line
    runs = json.loads((tmp_path / "bench_variants.json").read_text())
    assert sorted(runs) == sorted(variants)
    assert (runs["variant_B2_math"]["attention"], runs["variant_B2_checkpoint_every_2"]["checkpoint_every"],
            runs["variant_B2_fused_qkv"]["fused_qkv"], runs["variant_B2_sample_math"]["attention"]) == (
        "math", 2, True, "math")
    assert "[fused_qkv]" in summary["figures"]["variant_B2_fused_qkv"]
    assert "[lora 4, lora_base bf16]" in summary["figures"]["variant_B2_lora_bf16_base"]
    assert "[attention math]" in summary["figures"]["variant_B2_math"]
    assert "[checkpoint_every 2]" in summary["figures"]["variant_B2_checkpoint_every_2"]
    env = summary["env"]
    assert env["problems"] == [] and env["media_imports"] == "[]"  # no PyAV, decord or MiniLM imported
    assert env["cuda_available"] is False and env["modules"]["webdataset"]["ok"]
    assert "DiT-XL/2:33x256x256" in env["plan"]  # the GPU sizes are checked on CPU too

    train = json.loads((tmp_path / "bench_train_B2.json").read_text())
    assert (train["tool"], train["device"], train["preset"], train["shape"], train["batch"], train["dtype"]) == (
        "bench_train", "cpu", "dit-tiny", [5, 32, 32], 2, "bf16")
    assert train["latent_shape"] == [4, 2, 4, 4] and train["tokens_per_sample"] == 8
    assert train["flops_per_step"] == train_step_flops(dit_config("dit-tiny"), (2, 4, 4), train["text_len"], 2)
    assert abs(train["flops_per_step_counted"] / train["flops_per_step"] - 1) < 0.02
    positive(train, "samples_per_s", "tokens_per_s", "achieved_tflops", "mfu", "peak_tflops_measured",
             "peak_memory_bytes", "activation_gb")
    assert train["mfu"] < 1
    assert abs(train["tokens_per_s"] / train["samples_per_s"] - 8) < 1e-6
    if importlib.util.find_spec("diffusers") is not None:  # the compare runs where diffusers imports
        assert train["compare"]["model"] == "diffusers.WanTransformer3DModel"
        positive(train, "ratio")
        positive(train["compare"], "samples_per_s", "achieved_tflops", "flops_per_step")
    assert "samples/s" in summary["figures"]["bench_train_B2"]

    sample = json.loads((tmp_path / "bench_sample_B2.json").read_text())
    assert (sample["tool"], sample["device"], sample["steps"], sample["forward_batch"]) == ("bench_sample", "cpu", 2, 2)
    assert sample["latent_shape"] == [4, 2, 4, 4]
    assert sample["forward_flops"] == dit_forward_flops(dit_config("dit-tiny"), (2, 4, 4), 32, 2)  # text_len 32
    positive(sample, "clips_per_s", "clips_per_s_with_decode", "sample_time_s", "model_time_s", "sampling_tflops")
    positive(sample["decode_full"], "time_s")
    assert sample["overhead"] > -1
    assert not (tmp_path / "bench_train_XL2.json").exists()  # not selected


def test_every_part_is_reported_and_a_failure_exits_nonzero(tmp_path: Path) -> None:
    """No budget left: each selected part is recorded as failed (none stops the others), then exit 1."""
    proc = gpu_check(tmp_path, "--only", "bench_sample_XL2", "--budget", "0")
    assert proc.returncode == 1
    table = proc.stdout[proc.stdout.rindex("part "):].splitlines()[1:]
    assert [line.split()[:2] for line in table] == [
        ["wheels", "FAIL"], ["env", "FAIL"], ["bench_sample_XL2", "FAIL"], ["total", "FAIL"]]
    assert "budget is spent" in table[2]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ok"] is False and len(summary["parts"]) == 3


def test_a_variant_the_budget_cannot_hold_is_skipped_not_failed(tmp_path: Path) -> None:
    proc = gpu_check(tmp_path, "--only", "variant_B2_math", "--budget", "60")  # it may take 90 s
    assert proc.returncode == 0, proc.stdout[-3000:]
    table = proc.stdout[proc.stdout.rindex("part "):].splitlines()[1:]
    assert [line.split()[:2] for line in table] == [
        ["wheels", "ok"], ["env", "ok"], ["variant_B2_math", "skip"], ["total", "ok"]]
    assert "s of the budget left, it may take 90 s" in table[2]
    assert json.loads((tmp_path / "summary.json").read_text())["ok"] is True
    assert not (tmp_path / "bench_variants.json").exists()


def fake_wheel(folder: Path, name: str, tag: str, requires: str = "") -> Path:
    """A minimal valid wheel of a package ``name`` (one module) with an optional Requires-Dist."""
    path = folder / f"{name}-0.1-{tag}.whl"
    info = f"{name}-0.1.dist-info"
    files = {f"{name}/__init__.py": "VALUE = 1\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n"
                                 + (f"Requires-Dist: {requires}\n" if requires else ""),
             f"{info}/WHEEL": f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: {tag}\n"}
    files[f"{info}/RECORD"] = "".join(f"{f},,\n" for f in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for f, text in files.items():
            z.writestr(f, text)
    return path


def test_install_adds_only_what_is_missing(tmp_path: Path) -> None:
    wheels = tmp_path / "wheelhouse"
    wheels.mkdir()
    fake_wheel(wheels, "gpucheck_fake_pkg", "py3-none-any", requires="gpucheck-not-anywhere>=1")
    fake_wheel(wheels, "pytest", "py3-none-any")  # installed here: left alone
    fake_wheel(wheels, "gpucheck_fake_ext", "cp27-cp27mu-manylinux1_x86_64")  # for another interpreter
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_env.py"), "install", "--wheels", str(wheels),
                           "--target", str(site)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {line.split()[0]: line for line in proc.stdout.splitlines() if line.endswith((")", "install"))}
    assert rows["gpucheck_fake_pkg-0.1-py3-none-any.whl"].endswith(" install")
    assert rows["pytest-0.1-py3-none-any.whl"].endswith("skip (installed)")
    assert rows["gpucheck_fake_ext-0.1-cp27-cp27mu-manylinux1_x86_64.whl"].endswith("(not for this interpreter)")
    assert (site / "gpucheck_fake_pkg" / "__init__.py").exists() and not (site / "pytest").exists()
    assert "warning: gpucheck_fake_pkg needs gpucheck-not-anywhere>=1: missing" in proc.stdout
    assert "installed 1 of 3 wheels" in proc.stdout
