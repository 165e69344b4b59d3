"""The analytic FLOP count (dit/models/flops.py) against FlopCounterMode, and the two speed benchmarks run end to end
(tools/bench_train.py, tools/bench_sample.py) at a tiny size. No timing is asserted."""

from __future__ import annotations

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
