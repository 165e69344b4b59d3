"""Activation checkpointing and torch.compile applied from outside, in place: same names, same numbers."""

from __future__ import annotations

import copy

import torch

from dit.distributed.parallelize import apply_activation_checkpointing, apply_compile
from dit.models.dit import DiT


def _model_and_inputs() -> tuple[DiT, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    model = DiT(in_channels=4, text_dim=16, hidden_size=32, depth=2, num_heads=2)
    for p in model.parameters():  # leave the zero init, so outputs and gradients are not trivially zero
        torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(2, 4, 2, 4, 4), torch.tensor([10, 500])
    text, mask = torch.randn(2, 5, 16), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    return model, (x, t, text, mask)


def test_compile_in_place_keeps_keys_outputs_and_grads() -> None:
    eager, inputs = _model_and_inputs()
    compiled = apply_compile(apply_activation_checkpointing(copy.deepcopy(eager)))
    ref = apply_activation_checkpointing(copy.deepcopy(eager))
    assert list(compiled.state_dict()) == list(ref.state_dict()) == list(eager.state_dict())  # one set of names
    out_c, out_e = compiled(*inputs), ref(*inputs)
    torch.testing.assert_close(out_c, out_e, atol=1e-5, rtol=1e-4)
    out_c.square().mean().backward()
    out_e.square().mean().backward()
    grads = dict(ref.named_parameters())
    for name, p in compiled.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, atol=1e-5, rtol=1e-4, msg=name)


@torch.no_grad()
def test_a_copy_of_a_compiled_model_computes_with_its_own_weights() -> None:
    # A deep copy of a compiled model (as an EMA could be) must use its own parameters, not the original's.
    model, inputs = _model_and_inputs()
    apply_compile(model)
    before = model(*inputs).clone()
    twin = copy.deepcopy(model)
    for p in model.parameters():
        p.add_(0.1)
    torch.testing.assert_close(twin(*inputs), before, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(model(*inputs), before, atol=1e-3)
