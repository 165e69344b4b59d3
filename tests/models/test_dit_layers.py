"""Our Mlp, RmsNorm and DropPath against timm's (the reference they replace): same parameter names, same values
bitwise, same random draws for stochastic depth."""

from __future__ import annotations

import torch
from timm.layers import DropPath as TimmDropPath
from timm.layers import Mlp as TimmMlp
from timm.layers import RmsNorm as TimmRmsNorm
from torch import nn

from dit.models.layers import DropPath, Mlp, RmsNorm


def test_mlp_matches_timm_bitwise() -> None:
    for act in (lambda: nn.GELU(approximate="tanh"), nn.SiLU):
        torch.manual_seed(0)
        ours = Mlp(24, 40, 16, act_layer=act)
        torch.manual_seed(0)
        ref = TimmMlp(24, 40, 16, act_layer=act)
        assert list(ours.state_dict()) == list(ref.state_dict()) == ["fc1.weight", "fc1.bias", "fc2.weight",
                                                                       "fc2.bias"]
        for k, v in ref.state_dict().items():  # the same init draws, in the same order
            assert torch.equal(ours.state_dict()[k], v)
        x = torch.randn(3, 7, 24)
        assert torch.equal(ours(x), ref(x))
    assert Mlp(8).fc2.out_features == TimmMlp(8).fc2.out_features == 8  # hidden and out default to in


def test_rmsnorm_matches_timm_bitwise() -> None:
    ours, ref = RmsNorm(32), TimmRmsNorm(32)
    with torch.no_grad():
        w = torch.randn(32)
        ours.weight.copy_(w)
        ref.weight.copy_(w)
    x = torch.randn(2, 4, 9, 32) * 3.0
    assert torch.equal(ours(x), ref(x))
    out = ours(x)
    rms = out.div(w).pow(2).mean(-1).sqrt()  # unit RMS before the scale
    assert torch.allclose(rms, torch.ones_like(rms), atol=1e-4)


def test_droppath_matches_timm_draws() -> None:
    x = torch.randn(16, 5, 8)
    ours, ref = DropPath(0.3), TimmDropPath(0.3)
    torch.manual_seed(3)
    a = ours(x)
    torch.manual_seed(3)
    b = ref(x)
    assert torch.equal(a, b)
    kept = (a != 0).flatten(1).all(1)
    assert 0 < kept.sum() < 16  # some samples dropped whole, the rest scaled by 1/0.7
    assert torch.allclose(a[kept], x[kept] / 0.7)
    ours.eval()
    assert ours(x) is x
