"""Run under torchrun (ZeRO-3 on CPU): a LoRA DiT whose EMA model shares the partitioned base, read in the strategy's
sampling context, has one block of that base whole at a time (in the block's forward), none outside, and gives what
the plain model with every weight whole gives. Each rank asserts; tests/finetune/test_lora_distributed.py runs it."""

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


def whole(block: torch.nn.Module) -> bool:
    """Whether the block's partitioned (base) parameters are gathered."""
    base = [p for p in block.parameters() if hasattr(p, "ds_id")]
    assert base
    return all(p.numel() == p.ds_numel for p in base)


def main() -> None:
    env = setup_distributed(needs_group=True)
    cfg = TrainConfig(strategy="zero3", batch_size=2)
    torch.manual_seed(0)
    model = build_dit(ModelConfig(hidden_size=32, depth=3, num_heads=2), in_channels=4, text_dim=16)
    inject_lora(model, 4, 8)
    for name, p in model.named_parameters():  # an adapter that is not zero, so it shows in the output
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    plain = copy.deepcopy(model)  # the reference: every weight whole
    ema = build_ema(model, 0.9, share_frozen=True, partitioned=True)
    strategy = parallelize(model, env, cfg, ema=ema, make_optimizer=lambda params: build_optimizer(params, cfg))
    gen = torch.Generator().manual_seed(1)
    x, text = torch.randn(2, 4, 2, 4, 4, generator=gen), torch.randn(2, 6, 16, generator=gen)
    t, mask = torch.tensor([10, 700]), torch.ones(2, 6, dtype=torch.bool)

    blocks = list(strategy.ema.module.blocks)
    seen: list[list[int]] = []
    assert not any(whole(b) for b in blocks)
    with strategy.sampling():
        assert not any(whole(b) for b in blocks)  # outside the forward: none
        probes = [b.register_forward_pre_hook(lambda b, args: seen.append([whole(c) for c in blocks]))
                  for b in blocks]
        with torch.no_grad():
            out = strategy.ema.module(x, t, text=text, text_mask=mask)
        for h in probes:
            h.remove()
    assert seen == [[i == j for j in range(len(blocks))] for i in range(len(blocks))], seen  # one at a time
    assert not any(whole(b) for b in blocks)
    assert all(p.numel() == 0 for n, p in strategy.ema.module.named_parameters() if "lora_" in n)  # emptied again
    with torch.no_grad():
        ref = plain.eval()(x, t, text=text, text_mask=mask)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    with GatheredParameters(list(strategy.module.parameters())):  # (the live model: its own hooks, unchanged)
        pass
    print(f"rank {env.rank}: blocks gathered one at a time, output {float((out - ref).abs().max()):.2e} from whole")
    teardown_distributed()


if __name__ == "__main__":
    main()
