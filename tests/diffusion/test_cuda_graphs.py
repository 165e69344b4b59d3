"""CUDA graphs for sampling (dit/diffusion/cuda_graphs.py): a replayed denoiser gives the eager one's outputs for new
inputs at every call, in fp32 and under bf16 autocast, and a whole DDIM run is unchanged."""

from __future__ import annotations

import pytest
import torch

from dit.diffusion.cuda_graphs import CudaGraphed
from dit.diffusion.guidance import cfg_denoiser
from dit.diffusion.samplers import ddim
from dit.diffusion.schedules import make_schedule
from dit.models.dit import DiT

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def model_and_inputs(device: str) -> tuple[DiT, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = DiT(in_channels=4, text_dim=16, hidden_size=64, depth=2, num_heads=4).to(device).eval()
    with torch.no_grad():
        for p in model.parameters():  # not the adaLN-Zero init: the output must not be all zeros
            p.normal_(0, 0.05)
    text = torch.randn(2, 5, 16, device=device)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1] * 5], dtype=torch.bool, device=device)
    return model, dict(text=text, text_mask=mask)


def test_inputs_off_cuda_are_refused() -> None:
    model, kw = model_and_inputs("cpu")
    with pytest.raises(ValueError, match="CUDA device"):
        CudaGraphed(model)(torch.randn(2, 4, 2, 4, 4), torch.tensor([1, 2]), **kw)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_replayed_forward_matches_eager(bf16: bool) -> None:
    model, kw = model_and_inputs("cuda")
    graphed = CudaGraphed(model)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        for i in range(3):  # new inputs each call: they must reach the captured graph
            x, t = torch.randn(2, 4, 2, 4, 4, device="cuda"), torch.tensor([10 * i, 500], device="cuda")
            tol = 2e-2 if bf16 else 1e-5  # the same kernels, but cuBLAS may choose others while capturing
            torch.testing.assert_close(graphed(x, t, **kw), model(x, t, **kw), atol=tol, rtol=tol)
    assert len(graphed.graphs) == 1  # one shape, one capture


@pytest.mark.gpu
@needs_cuda
def test_ddim_with_graphs_is_unchanged() -> None:
    model, kw = model_and_inputs("cuda")
    uncond = dict(text=torch.zeros_like(kw["text"]), text_mask=kw["text_mask"])
    noise = torch.randn(2, 4, 2, 4, 4, device="cuda")
    schedule = make_schedule("linear", 1000).to("cuda")
    with torch.no_grad():
        eager = ddim(cfg_denoiser(model, kw, uncond, 4.0), noise, schedule, steps=5)
        graphed = ddim(cfg_denoiser(CudaGraphed(model), kw, uncond, 4.0), noise, schedule, steps=5)
    torch.testing.assert_close(graphed, eager, atol=1e-4, rtol=1e-4)



@pytest.mark.gpu
@needs_cuda
def test_sample_latents_captures_once_for_all_calls() -> None:
    """`dit sample`'s path: the pipeline keeps its graphs, so a second batch of the same shape replays them."""
    from dit.pipeline import Pipeline, sample_latents

    model, kw = model_and_inputs("cuda")
    pipe = Pipeline(model=model, vae=None, text=None, schedule=make_schedule("linear", 1000), prediction="eps",
                    config={})
    uncond = dict(text=torch.zeros_like(kw["text"]), text_mask=kw["text_mask"])
    noise = torch.randn(2, 4, 2, 4, 4, device="cuda")
    eager = sample_latents(pipe, noise, kw, uncond, steps=4, cfg=4.0)
    for _ in range(2):
        graphed = sample_latents(pipe, noise, kw, uncond, steps=4, cfg=4.0, cuda_graphs=True)
        torch.testing.assert_close(graphed, eager, atol=1e-4, rtol=1e-4)
    assert len(pipe.graphed.graphs) == 1
