"""Per-rank activation memory with sequence parallelism (a tool, not a test): one forward + backward of our DiT
(or, ``--family wan|cogvideox``, that adapter at the preset's sizes) on a long clip, with train.sequence_parallel =
1, 2, ... ranks (real gloo processes on CPU, or NCCL on GPUs).

    .venv/bin/python tools/bench_sp_memory.py --preset DiT-S/2 --shape 33x256x256 --sp 1 2 --json sp_memory.json

Activation memory = the bytes of the tensors autograd saves for backward in one forward (parameters excluded,
each storage counted once; dit.training.metrics.saved_tensor_bytes, as tools/bench_train.py counts): independent of
the allocator and of what else runs on the machine. Each rank of an SP group holds its slice of the tokens, so its
figure should be about 1/SP of the 1-process one; `dit plan`'s estimate (dit/plan.py) is printed beside it.
The gathered outputs of the SP ranks are checked against the 1-process output (max abs difference in the JSON).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipelines.config import latent_shape  # noqa: E402
from dit.distributed.sequence import apply_sequence_parallel  # noqa: E402
from dit.models.dit import DiT  # noqa: E402
from dit.models.presets import PRESETS  # noqa: E402
from dit.plan import ModelSize, activation_bytes  # noqa: E402
from dit.training.metrics import saved_tensor_bytes  # noqa: E402

CHANNELS, TEXT_DIM, TEXT_LEN = 16, 384, 32  # Wan-like latents, MiniLM-wide text states


def build(args: argparse.Namespace) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The same model and inputs in every process (seeded): our DiT, or (--family wan) the Wan adapter around
    diffusers' WanTransformer3DModel of the preset's width, depth, heads and patch."""
    p = PRESETS[args.preset]
    torch.manual_seed(0)
    sizes = dict(hidden_size=p["hidden_size"], depth=args.depth or p["depth"], num_heads=p["num_heads"],
                 patch_size=tuple(p["patch_size"]))
    t, h, w = latent_shape(*args.shape)
    if args.family == "wan":
        from bench_train import wan_equivalent

        from dit.models.families.wan import WanDenoiser

        model: nn.Module = WanDenoiser(wan_equivalent(dict(sizes, in_channels=CHANNELS, text_dim=TEXT_DIM,
                                                           mlp_ratio=4.0)))
    elif args.family == "cogvideox":  # CogVideoX 1.0 with RoPE (5B's layout), its RoPE base grid the clip's
        from diffusers import CogVideoXTransformer3DModel

        from dit.models.families.cogvideox import CogVideoXDenoiser

        d, heads, (_, _, patch) = sizes["hidden_size"], sizes["num_heads"], sizes["patch_size"]
        model = CogVideoXDenoiser(CogVideoXTransformer3DModel(
            num_attention_heads=heads, attention_head_dim=d // heads, in_channels=CHANNELS, out_channels=CHANNELS,
            time_embed_dim=d, text_embed_dim=TEXT_DIM, num_layers=sizes["depth"], patch_size=patch,
            sample_frames=args.shape[0], sample_height=h, sample_width=w, max_text_seq_length=TEXT_LEN,
            use_rotary_positional_embeddings=True))
    else:
        model = DiT(in_channels=CHANNELS, text_dim=TEXT_DIM, **sizes)
    for param in model.parameters():  # adaLN-Zero starts at zero output: give every path a value to compare
        if not param.any():
            torch.nn.init.normal_(param, std=0.02)
    gen = torch.Generator().manual_seed(1)
    inputs = dict(x=torch.randn(args.batch, CHANNELS, t, h, w, generator=gen),
                  t=torch.randint(0, 1000, (args.batch,), generator=gen).float(),
                  text=torch.randn(args.batch, TEXT_LEN, TEXT_DIM, generator=gen),
                  text_mask=torch.ones(args.batch, TEXT_LEN, dtype=torch.bool))
    return model, inputs


def worker(rank: int, sp: int, store: str, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if sp > 1:
        dist.init_process_group("nccl" if cuda else "gloo", init_method=store, rank=rank, world_size=sp)
    model, inputs = build(args)
    model.to(device)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    if sp > 1:
        apply_sequence_parallel(model, dist.group.WORLD)
    pred, nbytes = saved_tensor_bytes(lambda: model(**inputs), exclude=model.parameters())
    pred.square().mean().backward()  # (the backward runs too: the all-to-alls' reverse)
    torch.save({"saved_bytes": nbytes, "output": pred.detach().cpu()}, f"{out}/rank{rank}.pt")
    if sp > 1:
        dist.destroy_process_group()


def plan_bytes(args: argparse.Namespace, sp: int) -> float:
    """dit plan's per-rank activation estimate for the same model and clip (fp32, no checkpointing)."""
    p, (t, h, w) = PRESETS[args.preset], latent_shape(*args.shape)
    pt, ph, pw = p["patch_size"]
    size = ModelSize(params=0, frozen=0, hidden=p["hidden_size"], depth=args.depth or p["depth"],
                     heads=p["num_heads"], tokens=(t // pt) * (h // ph) * (w // pw), text_len=TEXT_LEN)
    return activation_bytes(size, args.batch, args.family, sequence_parallel=sp)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="DiT-S/2", choices=sorted(PRESETS))
    ap.add_argument("--family", default="dit", choices=["dit", "wan", "cogvideox"],
                    help="our DiT, or diffusers' Wan or CogVideoX transformer at the preset's sizes (model.family)")
    ap.add_argument("--shape", default="33x256x256", help="FRAMESxHEIGHTxWIDTH of the clip (pixels)")
    ap.add_argument("--depth", type=int, default=None, help="fewer blocks than the preset (activations scale with it)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--sp", type=int, nargs="+", default=[1, 2], help="sequence-parallel sizes to measure")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    args.shape = tuple(int(v) for v in args.shape.lower().split("x"))
    rows, reference = [], None
    for sp in args.sp:
        with tempfile.TemporaryDirectory() as tmp:
            if sp == 1:
                worker(0, 1, "", args, tmp)
            else:
                mp.spawn(worker, args=(sp, f"file://{tmp}/store", args, tmp), nprocs=sp, join=True)
            ranks = [torch.load(f"{tmp}/rank{r}.pt", weights_only=True) for r in range(sp)]
        if reference is None:
            reference = ranks[0]["output"]
        measured = [r["saved_bytes"] for r in ranks]
        rows.append({"sequence_parallel": sp, "saved_bytes_per_rank": measured,
                     "saved_gib_max_rank": max(measured) / 2**30, "plan_gib_per_rank": plan_bytes(args, sp) / 2**30,
                     "max_abs_diff_vs_first": max(float((r["output"] - reference).abs().max()) for r in ranks)})
        print(f"sp={sp}: saved for backward per rank {[f'{b / 2**20:.1f}' for b in measured]} MiB "
              f"(dit plan: {rows[-1]['plan_gib_per_rank'] * 1024:.1f} MiB), output max |diff| "
              f"{rows[-1]['max_abs_diff_vs_first']:.2e}", flush=True)
    base = rows[0]["saved_gib_max_rank"]
    for row in rows:
        row["ratio_vs_first"] = row["saved_gib_max_rank"] / base
    result = {"family": args.family, "preset": args.preset, "shape": list(args.shape),
              "depth": args.depth or PRESETS[args.preset]["depth"],
              "batch": args.batch, "tokens": latent_tokens(args), "device": "cuda" if torch.cuda.is_available()
              else "cpu", "torch": torch.__version__, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


def latent_tokens(args: argparse.Namespace) -> int:
    (t, h, w), (pt, ph, pw) = latent_shape(*args.shape), PRESETS[args.preset]["patch_size"]
    return (t // pt) * (h // ph) * (w // pw)


if __name__ == "__main__":
    main()
