"""The `dit` command: train, train-vae, sample, demo, make-synthetic.

    dit train --config configs/tiny.yaml train.steps=200 data.shards='data/{00000..00003}.tar'
    dit sample --checkpoint runs/tiny --prompt "a red circle moving left" --out clip.mp4
    dit demo
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _config(args: argparse.Namespace):  # -> Config, imported lazily so `dit --help` is fast
    from dit.config import load_config

    return load_config(args.config, args.overrides)


def cmd_train(args: argparse.Namespace) -> None:
    from dit.training.train import main

    if args.resume is not None:  # --resume X is train.resume=X
        args.overrides = [*args.overrides, f"train.resume={args.resume}"]
    checkpoint = main(_config(args), overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) == 0:  # every rank returns it; one line for the job (the launcher's RANK)
        print(f"checkpoint: {checkpoint}")


def cmd_check(args: argparse.Namespace) -> None:
    from dit.check import run_check

    raise SystemExit(run_check(args.path))


def cmd_plan(args: argparse.Namespace) -> None:
    from dit.plan import check_plan_args, estimate, format_plan, model_size

    cfg = _config(args)
    check_plan_args(args.gpus, args.gpu_memory, args.gpus_per_node, cfg.train.sequence_parallel)
    size = model_size(cfg)
    print(format_plan(cfg, args.gpus, args.gpu_memory,
                      estimate(cfg, args.gpus, args.gpu_memory, args.gpus_per_node, size=size), size))


def cmd_train_vae(args: argparse.Namespace) -> None:
    from dit.training.train_vae import main

    vae = main(_config(args))
    if int(os.environ.get("RANK", "0")) == 0:  # one line for the job, as `dit train`
        print(f"vae: {vae}")


def cmd_sample(args: argparse.Namespace) -> None:
    from dit.sample import run_sample

    run_sample(args)


def cmd_lora_export(args: argparse.Namespace) -> None:
    from dit.lora_export import export_lora

    print(export_lora(args.run, args.out, fmt=args.format))


def cmd_to_diffusers(args: argparse.Namespace) -> None:
    from dit.diffusers_export import export_diffusers

    print(export_diffusers(args.run, args.out, dtype=args.dtype, scale=args.scale))


def cmd_lora_merge(args: argparse.Namespace) -> None:
    from dit.merge import merge_lora_run

    print(merge_lora_run(args.run, args.out, scale=args.scale, lora=args.lora))


def cmd_encode(args: argparse.Namespace) -> None:
    from dit.encode import encode_shards

    # `dit encode SHARDS OUT --config X key=value ...`: options and overrides may come in any order after OUT
    opts = argparse.ArgumentParser(prog="dit encode SHARDS OUT")
    opts.add_argument("--config", default=None)
    opts.add_argument("--batch-size", type=int, default=8)
    opts.add_argument("--device", default="auto", help="auto (the first CUDA GPU, else the CPU), cpu, cuda, cuda:N")
    opts.add_argument("overrides", nargs="*")
    rest = opts.parse_intermixed_args(args.rest)
    counts = encode_shards(args.shards, args.out, _config(rest), batch_size=rest.batch_size, device=rest.device)
    print(f"encoded {counts['encoded']} shards ({counts['samples']} samples), skipped {counts['skipped']} "
          f"finished ones, into {args.out}")


def cmd_demo(args: argparse.Namespace) -> None:
    from dit.demo import run_demo, run_finetune

    if args.finetune:
        run_finetune(Path(args.out), quick=args.quick, seed=args.seed, rank=args.rank, objective=args.objective)
        return
    run_demo(Path(args.out), quick=args.quick, seed=args.seed, objective=args.objective)


def cmd_make_synthetic(args: argparse.Namespace) -> None:
    from data_pipelines.synthetic import make_synthetic

    shards = make_synthetic(args.out, num_clips=args.num_clips, frames=args.frames, height=args.height,
                            width=args.width, clips_per_shard=args.clips_per_shard, seed=args.seed)
    print(f"wrote {len(shards)} shards to {args.out}")


def cmd_slurm(args: argparse.Namespace) -> None:
    from dit import slurm

    if args.action == "launch":
        raise SystemExit(slurm.launch(args.accelerate_args))
    job = slurm.TrainJob(config=args.config, overrides=args.overrides, nodes=args.nodes,
                         gpus_per_node=args.gpus_per_node, procs_per_node=args.procs_per_node,
                         cpus_per_task=args.cpus_per_task, time=args.time, partition=args.partition,
                         job_name=args.job_name, signal_seconds=args.signal_seconds, sbatch_args=args.sbatch or [])
    slurm.submit(job, dry_run=args.dry_run)


def cmd_make_shards(args: argparse.Namespace) -> None:
    import json

    from data_pipelines.make_shards import make_shards
    from dit.config import ConfigError

    stats = make_shards(args.src, args.out, maxcount=args.maxcount, workers=args.workers, overwrite=args.overwrite)
    print(json.dumps({k: stats[k] for k in ("files", "written", "videos", "images", "rejected")}))
    print(f"wrote {len(stats['shards'])} shards and stats.json to {args.out}")
    if not stats["written"]:
        raise ConfigError(f"none of the {stats['files']} files could be used (rejected: {stats['rejected']}); "
                          f"{Path(args.out) / 'stats.json'} lists each with its reason")


def cmd_inspect_shards(args: argparse.Namespace) -> None:
    import json

    from data_pipelines.make_shards import inspect_shards
    from dit.config import ConfigError

    if args.num < 0:
        raise ConfigError(f"--num must be >= 0, got {args.num}")
    summary = inspect_shards(args.spec, dump=args.dump, num=args.num)
    print(json.dumps(summary, indent=2))
    unreadable = summary["unreadable_shards"]
    if unreadable and len(unreadable) == summary["shards"] and not summary["samples"]:
        raise ConfigError(f"none of the {summary['shards']} shards could be read as tar files: {unreadable[0]}"
                          f"{f' (and {len(unreadable) - 1} more, listed above)' if len(unreadable) > 1 else ''}")
    if unreadable:
        print(f"warning: {len(unreadable)} of {summary['shards']} shards are unreadable (at least in part): see "
              "unreadable_shards", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dit", description="Train and sample latent video diffusion transformers.")
    sub = parser.add_subparsers(dest="command", required=True)

    for name, fn, help_ in (("train", cmd_train, "train a DiT"), ("train-vae", cmd_train_vae, "train the causal VAE")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--config", default=None, help="YAML experiment config (configs/*.yaml)")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=200 data.frames=17")
        p.set_defaults(fn=fn)
        if name == "train":
            p.add_argument("--resume", default=None, metavar="auto|never|CKPT",
                           help="auto (default): the newest complete checkpoint in train.output_dir, if any; "
                                "never: start fresh; or a checkpoint directory (= train.resume)")
            p.add_argument("--overwrite", action="store_true",
                           help="first delete what an earlier run wrote into train.output_dir (checkpoints, logs, "
                                "config.yaml); without it a folder holding another run is refused")

    p = sub.add_parser("check", help="verify a run's checkpoints (sizes + sha256 against each manifest)")
    p.add_argument("path", help="training output directory (every checkpoint) or one checkpoint directory")
    p.set_defaults(fn=cmd_check)

    p = sub.add_parser("plan", help="per-GPU memory of a training config under each strategy, before launching")
    p.add_argument("--config", default=None, help="YAML experiment config (configs/*.yaml)")
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs (ranks) in the job")
    p.add_argument("--gpu-memory", type=float, required=True, help="memory per GPU in GiB, e.g. 80")
    p.add_argument("--gpus-per-node", type=int, default=8, help="for train.fsdp_shard=hybrid (default 8)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.preset=DiT-XL/2 train.batch_size=4")
    p.set_defaults(fn=cmd_plan)

    p = sub.add_parser("sample", help="generate clips from prompts")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="training output dir (newest checkpoint) or a checkpoint dir")
    which.add_argument("--config", default=None, help="a released model straight from its diffusers folders, no "
                       "training run: its experiment YAML (configs/wan2.1-t2v-1.3b.yaml, ...) with the folders as "
                       "overrides (model.pretrained=... vae.pretrained=... text.path=...)")
    p.add_argument("overrides", nargs="*", help="with --config: dotted overrides, e.g. model.pretrained=DIR")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts", help="a file with one prompt per line")
    p.add_argument("--frames", type=int, default=None, help="4k+1 (default: the size the checkpoint was trained at)")
    p.add_argument("--height", type=int, default=None, help="default: the trained height")
    p.add_argument("--width", type=int, default=None, help="default: the trained width")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the run's sample.steps)")
    p.add_argument("--sampler", default=None, choices=["ddim", "ddpm", "dpm_solver", "cogvideox_dpm", "flow_euler",
                                                          "flow_dpm_solver", "flow_unipc"],
                   help="default: the run's sample.sampler, else ddim, or flow_euler for a flow checkpoint "
                        "(diffusion.objective=flow)")
    p.add_argument("--cfg", type=float, default=None,
                   help="classifier-free guidance scale (default: the run's sample.cfg)")
    p.add_argument("--dynamic-cfg", action=argparse.BooleanOptionalAction, default=None,
                   help="CogVideoX's use_dynamic_cfg: the guidance scale rises over the steps (default: the run's "
                        "sample.dynamic_cfg)")
    p.add_argument("--guidance", type=float, default=None, help="HunyuanVideo (guidance-distilled): the embedded "
                   "guidance scale its transformer is given (default: the run's sample.guidance, else 6.0)")
    p.add_argument("--eta", type=float, default=None, help="DDIM eta, 0: deterministic (default: the run's sample.eta)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fps", type=int, default=None, help="frames per second of .mp4/.gif (default: the run's "
                   "sample.fps)")
    p.add_argument("--batch-size", type=int, default=8, help="clips sampled together")
    p.add_argument("--decode-chunk", type=int, default=0, help="latent frames per VAE decode chunk (0: all)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="bf16: the denoiser under bf16 autocast (faster on GPUs and on CPUs with bf16 instructions); "
                   "auto (default): bf16 on a CUDA GPU that has it, else fp32")
    p.add_argument("--fp8", action="store_true",
                   help="hold the denoiser blocks' linear weights in fp8 e4m3 with a scale per row (a quarter of "
                   "fp32's bytes, half of bf16's; outputs about 1%% off), dequantized at each call")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay the denoiser from a CUDA graph at every step (CUDA only): fewer kernel launches")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each denoiser block in place (as model.compile=true in training): the first "
                   "step compiles, the later ones run fused kernels; needs a C++ compiler (and triton on a GPU)")
    p.add_argument("--out", default="outputs/sample.mp4", help=".mp4/.gif/.png file, or a folder for many prompts")
    p.add_argument("--image", default=None, help="image-to-video: the first frame to continue (png/jpg/webp, "
                   "resized and center-cropped to the sampling size); needs a model.condition=first_frame checkpoint")
    p.add_argument("--last-image", default=None, help="Wan 2.1 FLF2V: the last frame to reach (with --image, the "
                   "first); resized and center-cropped as --image")
    p.add_argument("--lora", default=None, metavar="RUN", help="apply a LoRA run's adapter (its newest checkpoint, a "
                   "checkpoint dir or a *lora*.safetensors file) to the model; also another tool's LoRA file "
                   "(ComfyUI, musubi-tuner, kohya, diffusers layouts: converted by diffusers' loader of the family)")
    p.add_argument("--lora-scale", type=float, default=1.0, help="scale of --lora's update (0: the base alone)")
    p.add_argument("--expert", default=None, metavar="PATH", help="Wan 2.2 A14B: the other expert of a checkpoint "
                   "trained as one (diffusion.sigma_min / sigma_max): a run, checkpoint dir or diffusers transformer "
                   "folder (e.g. the download's transformer_2/); the two switch at the boundary of their ranges")
    p.add_argument("--cfg-low", type=float, default=None, help="with --expert: the low-noise expert's guidance scale "
                   "(default: --cfg), as the pipelines' guidance_scale_2")
    p.add_argument("--sequence-parallel", type=int, default=1, metavar="N", help="split each clip's tokens over the N "
                   "processes of a launch (torchrun --nproc-per-node N ... -m dit.cli sample ...): long clips on "
                   "several GPUs; rank 0 writes the files")
    p.set_defaults(fn=cmd_sample)

    p = sub.add_parser("lora", help="LoRA adapters: merge one into its base, or export it for another tool")
    lora_sub = p.add_subparsers(dest="lora_command", required=True)
    q = lora_sub.add_parser("merge", help="write a normal checkpoint directory: the base with the adapter merged")
    q.add_argument("run", help="a LoRA run (its newest checkpoint) or a LoRA checkpoint directory")
    q.add_argument("--out", required=True, help="the new checkpoint directory (must not exist)")
    q.add_argument("--scale", type=float, default=1.0, help="scale of the adapter's update")
    q.add_argument("--lora", default=None, metavar="FILE_OR_RUN", help="merge this adapter into RUN instead (any "
                   "checkpoint; a LoRA file of ours, diffusers', ComfyUI's, musubi-tuner's or kohya's layout, or a "
                   "LoRA run), at --scale")
    q.set_defaults(fn=cmd_lora_merge)
    q = lora_sub.add_parser("export", help="the adapter in another tool's layout (comfyui: Wan models' original "
                            "module names under diffusion_model., lora_down / lora_up / alpha)")
    q.add_argument("run", help="a LoRA run (its newest checkpoint) or a LoRA checkpoint directory")
    q.add_argument("--out", required=True, help="the .safetensors file to write (must not exist)")
    q.add_argument("--format", default="comfyui", choices=["comfyui"], help="the layout (default comfyui)")
    q.set_defaults(fn=cmd_lora_export)

    p = sub.add_parser("to-diffusers", help="a pretrained family's trained transformer as a diffusers model folder "
                       "(config.json + safetensors) for diffusers' pipelines and the tools that read them")
    p.add_argument("run", help="a run (its newest checkpoint) or a checkpoint directory; a LoRA run is merged first")
    p.add_argument("--out", required=True, help="the new folder (must not exist)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="the weights' dtype")
    p.add_argument("--scale", type=float, default=1.0, help="a LoRA run: scale of the adapter's update")
    p.set_defaults(fn=cmd_to_diffusers)

    p = sub.add_parser("encode", help="raw shards -> latent shards (VAE posterior + text states), one per input")
    p.add_argument("shards", help="shard spec (brace pattern, directory, comma list)")
    p.add_argument("out", help="output folder; shards already there are skipped")
    p.add_argument("rest", nargs=argparse.REMAINDER,
                   metavar="[--config YAML] [--batch-size N] [--device auto|cpu|cuda[:N]] [key=value ...]",
                   help="the experiment config (data size, vae.checkpoint, text encoder) and dotted overrides")
    p.set_defaults(fn=cmd_encode)

    p = sub.add_parser("demo", help="synthetic data -> VAE -> DiT -> clips -> prompt-following score")
    p.add_argument("--out", default="outputs/demo")
    p.add_argument("--objective", default="flow", choices=["flow", "diffusion"],
                   help="the DiT's training objective (flow: rectified flow + flow_euler, 2400 steps; diffusion: eps + "
                        "DDIM as configs/demo.yaml, 3600 steps; with --finetune: of the base when it is trained first)")
    p.add_argument("--quick", action="store_true", help="a much shorter run (smoke test; low score expected)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, both trainings and the samples")
    p.add_argument("--finetune", action="store_true", help="then teach the demo model a new colour (magenta) from a "
                   "folder of mp4 clips with LoRA, printing the score before and after")
    p.add_argument("--rank", type=int, default=None, help="--finetune: LoRA rank (0: full fine-tuning)")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("make-synthetic", help="write shards of captioned moving-shape clips")
    p.add_argument("out")
    p.add_argument("--num-clips", type=int, default=256)
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--clips-per-shard", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_make_synthetic)

    p = sub.add_parser("make-shards", help="a folder (sidecar .txt captions), CSV or JSONL of media -> checked shards")
    p.add_argument("src", help="folder, .csv (path,caption) or .jsonl ({path, caption})")
    p.add_argument("out", help="output folder for 00000.tar, ... and stats.json")
    p.add_argument("--maxcount", type=int, default=1000, help="samples per shard")
    p.add_argument("--workers", type=int, default=4, help="files probed in parallel")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier make-shards output in OUT (otherwise OUT must be new or empty)")
    p.set_defaults(fn=cmd_make_shards)

    p = sub.add_parser("inspect-shards", help="summarize shards; --dump writes a few samples' media and captions")
    p.add_argument("spec", help="shard spec: brace pattern, directory, comma list or .txt list")
    p.add_argument("--dump", default=None, help="folder for the first --num samples (mp4/jpg/png + txt)")
    p.add_argument("--num", type=int, default=3)
    p.set_defaults(fn=cmd_inspect_shards)

    p = sub.add_parser("slurm", help="SLURM jobs: submit training (slurm/train.sbatch); the per-node launcher")
    slurm_sub = p.add_subparsers(dest="action", required=True)
    q = slurm_sub.add_parser("submit", help="fill slurm/train.sbatch for this experiment and sbatch it")
    q.add_argument("--config", required=True, help="YAML experiment config")
    q.add_argument("overrides", nargs="*", help="dotted overrides for dit train, e.g. train.steps=100000")
    q.add_argument("--nodes", type=int, default=1)
    q.add_argument("--gpus-per-node", type=int, default=8, help="0: a CPU partition (gloo)")
    q.add_argument("--procs-per-node", type=int, default=None, help="default: --gpus-per-node (1 without GPUs)")
    q.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per node for its processes "
                   "(default: whole nodes, --exclusive)")
    q.add_argument("--time", default=None, help="time limit, e.g. 24:00:00")
    q.add_argument("--partition", default=None)
    q.add_argument("--job-name", default=None)
    q.add_argument("--signal-seconds", type=int, default=300,
                   help="SIGUSR1 this many seconds before the time limit: checkpoint and requeue")
    q.add_argument("--sbatch", action="append", metavar="OPTION",
                   help="another sbatch option, e.g. --sbatch=--account=abc (repeatable)")
    q.add_argument("--dry-run", action="store_true", help="print the sbatch command and script, submit nothing")
    q = slurm_sub.add_parser("launch", help="(run by slurm/train.sbatch on each node) accelerate launch -- ARGS that "
                             "passes SIGUSR1 to the training and exits with its exit code")
    q.add_argument("accelerate_args", nargs="*", help="-- then the arguments of accelerate launch")
    p.set_defaults(fn=cmd_slurm)
    return parser


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("httpx", "urllib3", "transformers", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    from dit.config import ConfigError

    try:
        args.fn(args)
        _teardown()
    except (ConfigError, FileNotFoundError) as e:  # the user's to fix (ConfigError: a config, argument or data
        print(f"error: {error_line(e)}", file=sys.stderr)  # problem): one line, no traceback; bugs keep theirs
        raise SystemExit(2) from None
    except SystemExit as e:
        from dit.distributed.preemption import Preempted

        if isinstance(e, Preempted):  # every rank stopped after the same step: the group can go too
            _teardown()
        raise


def _teardown() -> None:
    """A launched command's process group, destroyed before the interpreter exits (dit/distributed/setup.py)."""
    if "torch.distributed" in sys.modules:
        from dit.distributed.setup import teardown_distributed

        teardown_distributed()


def error_line(e: BaseException) -> str:
    """A user error's message. One re-raised from a DataLoader worker carries the worker's traceback as text
    ("Caught X in DataLoader worker process 0. Original Traceback ..."): its last line holds the message."""
    text = str(e).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text


if __name__ == "__main__":
    main()
