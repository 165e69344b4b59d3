"""Run under torchrun (DeepSpeed on CPU): in the strategy's sampling context the EMA model is whole one block at a
time, in the block's forward, and gives what the plain model with every weight whole gives. Each rank asserts, for
a full fine-tune under ZeRO-2 and ZeRO-3 (the EMA's partitions filled in block by block) and for a LoRA DiT under
ZeRO-3 (its EMA model shares the partitioned base, gathered block by block too).
tests/distributed/test_strategies.py runs it."""

from __future__ import annotations

import copy

import torch
from deepspeed.runtime.zero.partition_parameters import GatheredParameters

from dit.config import ModelConfig, TrainConfig
from dit.distributed.parallelize import parallelize
from dit.distributed.setup import setup_distributed, teardown_distributed
from dit.models.dit import build_dit
from dit.models.lora import inject_lora
from dit.training.ema import build_ema
from dit.training.optim import build_optimizer


def whole(block: torch.nn.Module, lora: bool) -> bool:
    """Whether the block is whole where it is read: a LoRA run's partitioned base gathered, a full fine-tune's EMA
    parameters filled in (empty between reads)."""
    if lora:
        base = [p for p in block.parameters() if hasattr(p, "ds_id")]
        assert base
        return all(p.numel() == p.ds_numel for p in base)
    return all(p.numel() > 0 for p in block.parameters())


def check(env: object, strategy_name: str, lora: bool) -> None:
    cfg = TrainConfig(strategy=strategy_name, batch_size=2)
    torch.manual_seed(0)
    model = build_dit(ModelConfig(hidden_size=32, depth=3, num_heads=2), in_channels=4, text_dim=16)
    if lora:
        inject_lora(model, 4, 8)
        for name, p in model.named_parameters():  # an adapter that is not zero, so it shows in the output
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
    plain = copy.deepcopy(model)  # the reference: every weight whole (the EMA starts from the weights)
    ema = build_ema(model, 0.9, share_frozen=lora, partitioned=True)
    strategy = parallelize(model, env, cfg, ema=ema, make_optimizer=lambda params: build_optimizer(params, cfg))
    gen = torch.Generator().manual_seed(1)
    x, text = torch.randn(2, 4, 2, 4, 4, generator=gen), torch.randn(2, 6, 16, generator=gen)
    t, mask = torch.tensor([10, 700]), torch.ones(2, 6, dtype=torch.bool)

    module = strategy.ema.module
    blocks = list(module.blocks)
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    trained = [p for p in module.parameters() if id(p) not in in_blocks and not hasattr(p, "ds_id")]
    seen: list[list[bool]] = []
    assert not any(whole(b, lora) for b in blocks)
    with strategy.sampling():
        assert not any(whole(b, lora) for b in blocks)  # outside the forward: none
        assert all(p.numel() > 0 for p in trained)  # the rest (embeddings, final layers): for the whole context
        probes = [b.register_forward_pre_hook(lambda b, args: seen.append([whole(c, lora) for c in blocks]))
                  for b in blocks]
        with torch.no_grad():
            out = module(x, t, text=text, text_mask=mask)
        for h in probes:
            h.remove()
    assert seen == [[i == j for j in range(len(blocks))] for i in range(len(blocks))], seen  # one at a time
    assert not any(whole(b, lora) for b in blocks)
    filled = [n for n, p in module.named_parameters() if p.numel() and not hasattr(p, "ds_id")]
    assert filled == ([] if lora else [n for n, p in model.named_parameters() if not p.requires_grad]), filled
    with torch.no_grad():
        ref = plain.eval()(x, t, text=text, text_mask=mask)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    if strategy_name == "zero3":
        with GatheredParameters(list(strategy.module.parameters())):  # (the live model: its own hooks, unchanged)
            pass
    print(f"rank {env.rank} {strategy_name}{' lora' if lora else ''}: blocks whole one at a time, output "
          f"{float((out - ref).abs().max()):.2e} from whole")


def main() -> None:
    env = setup_distributed(needs_group=True)
    for strategy_name, lora in [("zero3", True), ("zero3", False), ("zero2", False)]:
        check(env, strategy_name, lora)
    teardown_distributed()


if __name__ == "__main__":
    main()
