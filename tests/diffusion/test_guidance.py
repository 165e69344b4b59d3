"""Classifier-free guidance: one batched call equals the two separate calls combined."""

import pytest
import torch

from dit.diffusion.guidance import cfg_denoiser


class Model:
    """Nonlinear in x, t and the text; counts calls and batch sizes."""

    def __init__(self):
        self.batches = []

    def __call__(self, x, t, text, text_mask, tag="x"):
        assert tag == "x"
        self.batches.append(x.shape[0])
        pooled = (text * text_mask[..., None]).sum(1).mean(-1)  # [B]
        return torch.tanh(x * pooled.reshape(-1, 1, 1) + t.reshape(-1, 1, 1) / 1000)


def inputs(b: int = 3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, 4, 5, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    cond = dict(text=torch.randn(b, 7, 6, generator=g), text_mask=torch.rand(b, 7, generator=g) > 0.3, tag="x")
    uncond = dict(text=torch.randn(b, 7, 6, generator=g), text_mask=torch.ones(b, 7, dtype=torch.bool), tag="x")
    return x, t, cond, uncond


@pytest.mark.parametrize("scale", [0.0, 4.5, 7.5])
def test_one_batched_call_equals_two_calls(scale):
    x, t, cond, uncond = inputs()
    model = Model()
    out = cfg_denoiser(model, cond, uncond, scale)(x, t)
    assert model.batches == [2 * x.shape[0]]
    c, u = model(x, t, **cond), model(x, t, **uncond)
    torch.testing.assert_close(out, u + scale * (c - u))


def test_scale_one_is_the_conditional_model_alone():
    x, t, cond, uncond = inputs()
    model = Model()
    out = cfg_denoiser(model, cond, uncond, 1.0)(x, t)
    assert model.batches == [x.shape[0]]
    torch.testing.assert_close(out, model(x, t, **cond))


def test_mismatched_inputs_raise_clear_errors():
    x, t, cond, uncond = inputs()
    with pytest.raises(ValueError, match="equal shapes"):
        cfg_denoiser(Model(), cond, dict(uncond, text=uncond["text"][:, :5]), 3.0)
    with pytest.raises(ValueError, match="same keys"):
        cfg_denoiser(Model(), cond, {k: v for k, v in uncond.items() if k != "tag"}, 3.0)
    with pytest.raises(ValueError, match="non-tensor"):
        cfg_denoiser(Model(), cond, dict(uncond, tag="y"), 3.0)
