"""Run under torchrun (2 processes, one node): the other expert of a run (train.sample_expert) is held once per node.
argv: the low-noise expert's run. Each rank asserts:
- every parameter and buffer of the expert lies in the one node-local file mapped by both processes, already
  unlinked, and only the node's first process built it;
- it is the expert each process would load alone, to the bit, and draws the same output;
- `expert_on` hands back those same mapped tensors after the device (here "meta") held it;
- when no node-local file can be written, each process loads its own, equal, and the run goes on.
tests/training/test_expert_samples.py runs it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from dit.distributed import node_shared
from dit.distributed.setup import setup_distributed, teardown_distributed
from dit.experts import expert_on, load_expert
from dit.export import resolve_checkpoint


def mapped(name: str) -> list[tuple[int, int, str]]:
    """The address ranges of this process that map files whose path holds ``name``."""
    out = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and name in parts[5]:
            lo, hi = (int(a, 16) for a in parts[0].split("-"))
            out.append((lo, hi, parts[5]))
    return out


def tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def main() -> None:
    env = setup_distributed(needs_group=True)
    low = Path(sys.argv[1])
    config = json.loads((resolve_checkpoint(low) / "config.json").read_text())
    config["experiment"]["diffusion"].update(sigma_min=0.5, sigma_max=1.0)  # the high-noise expert it pairs with

    builds = []
    build = node_shared.node_shared_state

    def counted(fn, env_, name):  # (how often this process built the weights)
        return build(lambda: builds.append(1) or fn(), env_, name)

    node_shared.node_shared_state = counted
    shared = load_expert(config, low, "cpu", dtype=torch.bfloat16, env=env)
    node_shared.node_shared_state = build
    everyone = [None] * env.world_size
    dist.all_gather_object(everyone, len(builds))
    assert everyone == [1, 0], everyone  # the node's first process only

    regions = mapped("dit-expert-")
    assert regions and all(path.endswith("(deleted)") for *_, path in regions), regions  # mapped, already unlinked
    assert len({path for *_, path in regions}) == 1, regions
    assert not list(node_shared.node_dir(0).glob("dit-expert-*")), "the node-local file was left behind"

    def in_file(t: torch.Tensor) -> bool:
        ptr = t.untyped_storage().data_ptr()
        return any(lo <= ptr < hi for lo, hi, _ in regions)

    held = tensors(shared.other)
    assert all(in_file(t) for t in held.values()), [n for n, t in held.items() if not in_file(t)]

    alone = load_expert(config, low, "cpu", dtype=torch.bfloat16)  # as `dit sample --expert` loads it
    ref = tensors(alone.other)
    assert held.keys() == ref.keys()
    for name, t in held.items():
        assert t.dtype == ref[name].dtype and torch.equal(t, ref[name]), name
    gen = torch.Generator().manual_seed(0)
    cfg = config["dit"]
    x = torch.randn(1, cfg["in_channels"], 2, 4, 4, generator=gen)
    text, mask = torch.randn(1, 6, cfg["text_dim"], generator=gen), torch.ones(1, 6, dtype=torch.bool)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        a = shared.other(x, torch.tensor([700]), text=text, text_mask=mask)
        b = alone.other(x, torch.tensor([700]), text=text, text_mask=mask)
    assert torch.equal(a, b)

    where = {n: t.untyped_storage().data_ptr() for n, t in held.items()}
    with expert_on(shared, torch.device("meta")):
        assert all(t.is_meta for t in tensors(shared.other).values())
    assert {n: t.untyped_storage().data_ptr() for n, t in tensors(shared.other).items()} == where

    # no room for the node-local file: each process holds its own
    node_shared.node_dir = lambda nbytes: Path("/nonexistent-dit-dir")
    own = load_expert(config, low, "cpu", dtype=torch.bfloat16, env=env)
    assert all(torch.equal(t, ref[n]) for n, t in tensors(own.other).items())
    assert not any(in_file(t) for t in tensors(own.other).values())
    print(f"rank {env.rank}: the expert mapped once per node, {len(held)} tensors")
    teardown_distributed()


if __name__ == "__main__":
    main()
