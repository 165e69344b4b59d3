"""Our ModelEma against timm's ModelEmaV3 (use_warmup=True), which it replaces: the decay at each step, and the
averaged weights bitwise over a real training run, including non-float buffers and a mixed-dtype model."""

from __future__ import annotations

import torch
from timm.utils import ModelEmaV3
from torch import nn

from dit.training.ema import ModelEma, build_ema


def test_decay_schedule_matches_timm() -> None:
    ours, ref = ModelEma(nn.Linear(2, 2), 0.999), ModelEmaV3(nn.Linear(2, 2), decay=0.999, use_warmup=True)
    for step in [None, -1, 0, 1, 2, 3, 10, 100, 1000, 10**5, 10**7]:
        assert ours.get_decay(step) == ref.get_decay(step), step
    assert ours.get_decay(1) == 0.0 and ours.get_decay(10**7) == 0.999  # first update copies; capped


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 3)
        self.register_buffer("count", torch.zeros((), dtype=torch.long))  # non-float: copied, not averaged

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.count += 1
        return self.b(torch.tanh(self.a(x)))


def test_training_run_matches_timm_bitwise() -> None:
    torch.manual_seed(0)
    model = Net()
    ours, ref = build_ema(model, 0.99), ModelEmaV3(model, decay=0.99, use_warmup=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(1, 31):
        x = torch.randn(4, 6)
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        ours.update(model, step=step)
        ref.update(model, step=step)
        for k, v in ref.module.state_dict().items():
            assert torch.equal(ours.module.state_dict()[k], v), (step, k)
    assert ours.module.count.item() == 30
    # the average lags the model: it is neither the model nor the start
    assert not torch.equal(ours.module.a.weight, model.a.weight)


def test_mixed_dtype_update_matches_timm() -> None:
    torch.manual_seed(1)
    model = nn.Linear(5, 5)
    ours, ref = ModelEma(model, 0.9), ModelEmaV3(model, decay=0.9, use_warmup=True)
    low = nn.Linear(5, 5).to(torch.bfloat16)  # a model whose weights a strategy holds in bf16 (DeepSpeed bf16)
    for step in range(1, 6):
        with torch.no_grad():
            low.weight.normal_()
        ours.update(low, step=step)
        ref.update(low, step=step)
        assert torch.equal(ours.module.weight, ref.module.weight)
        assert ours.module.weight.dtype == torch.float32


def test_share_frozen_holds_the_models_frozen_parameters() -> None:
    model = Net()
    model.a.requires_grad_(False)
    ema = build_ema(model, 0.9, share_frozen=True)
    assert ema.module.a.weight is model.a.weight  # not copied
    assert ema.module.b.weight is not model.b.weight
    assert torch.equal(ema.module.b.weight, model.b.weight)
    # the shared tensors are left out of the average (under ZeRO-3 they are partitioned, not gathered, in the update)
    assert ema.shared == {k for k in model.state_dict() if k.startswith("a.")}
    before = ema.module.b.weight.detach().clone()
    with torch.no_grad():
        model.b.weight.add_(1.0)
    ema.update(model, step=10)
    assert not torch.equal(ema.module.b.weight, before) and ema.module.a.weight is model.a.weight
