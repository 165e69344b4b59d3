"""model.attention: each SDPA kernel named (flash, efficient, cudnn, math) computes the attention of a plain softmax
reference, with and without a key mask, forward and backward; a kernel the device lacks fails up front."""

from __future__ import annotations

import pytest
import torch

from dit.config import ATTENTION_BACKENDS, ConfigError, ModelConfig, load_config
from dit.models.attention import CUDA_ONLY, SDPA_KERNELS, attention, resolve_backend
from dit.models.dit import DiT
from dit.training.train import check_attention


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    scores = (q.double() @ k.double().transpose(-1, -2)) / q.shape[-1] ** 0.5  # [B, H, N, M]
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return (scores.softmax(-1) @ v.double()).to(q.dtype)


def inputs(device: str, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 24, 32, generator=g)
    k, v = torch.randn(2, 4, 7, 32, generator=g), torch.randn(2, 4, 7, 32, generator=g)
    mask = torch.tensor([[True] * 4 + [False] * 3, [True] * 7])  # the first sample's prompt is padded
    return (*(x.to(device, dtype).requires_grad_() for x in (q, k, v)), mask.to(device))


def check_kernel(backend: str, device: str, dtype: torch.dtype, tol: float) -> None:
    for masked in (False, True):
        q, k, v, mask = inputs(device, dtype)
        mask = mask if masked else None
        out = attention(q, k, v, mask=mask, backend=resolve_backend(backend, torch.device(device)))
        ref = reference(q, k, v, mask)
        torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
        grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
        ref_grads = torch.autograd.grad(ref.float().square().sum(), (q, k, v))
        for g, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g.float(), r.float(), atol=tol * 10, rtol=tol * 10)
        if masked:  # a masked key changes nothing
            k2 = k.detach().clone()
            k2[0, :, 5] += 10.0
            out2 = attention(q, k2, v, mask=mask, backend=resolve_backend(backend, torch.device(device)))
            torch.testing.assert_close(out2, out, atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", ["auto", "sdpa", "flash", "math"])
def test_cpu_kernels_match_the_softmax_reference(backend: str) -> None:
    check_kernel(backend, "cpu", torch.float32, 1e-5)


@pytest.mark.parametrize("backend", ["efficient", "cudnn", "xformers"])
def test_a_kernel_the_device_lacks_fails_before_any_work(backend: str) -> None:
    with pytest.raises(RuntimeError, match="model.attention=sdpa"):
        resolve_backend(backend, torch.device("cpu"))
    with pytest.raises(ConfigError, match=f"model.attention={backend}"):
        check_attention(ModelConfig(attention=backend), torch.device("cpu"))
    check_attention(ModelConfig(attention="flash"), torch.device("cpu"))  # CPU has this one
    with pytest.raises(ConfigError, match="model.attention"):
        load_config(None, ["model.attention=flash2"])


def test_every_configurable_backend_is_known_to_the_kernel_code() -> None:
    for name in ATTENTION_BACKENDS:  # the config's list and attention.py's tables agree
        assert name in ("auto", "sdpa", "xformers") or name in SDPA_KERNELS
        try:
            resolved = resolve_backend(name, torch.device("cpu"))
        except RuntimeError as e:
            assert name in CUDA_ONLY and "model.attention=sdpa" in str(e)
        else:
            assert resolved in ("sdpa", *SDPA_KERNELS) and name not in CUDA_ONLY


def test_dit_with_a_pinned_kernel_matches_the_default() -> None:
    torch.manual_seed(0)
    a = DiT(in_channels=4, text_dim=16, hidden_size=32, depth=2, num_heads=2)
    for p in a.parameters():
        torch.nn.init.normal_(p, std=0.05)
    b = DiT(in_channels=4, text_dim=16, hidden_size=32, depth=2, num_heads=2, attention="math")
    b.load_state_dict(a.state_dict())
    x, t = torch.randn(2, 4, 2, 4, 4), torch.tensor([10, 500])
    text, mask = torch.randn(2, 5, 16), torch.tensor([[1, 1, 1, 0, 0], [1] * 5], dtype=torch.bool)
    torch.testing.assert_close(b(x, t, text, mask), a(x, t, text, mask), atol=1e-5, rtol=1e-4)
    assert {m.backend for m in b.modules() if hasattr(m, "kernel")} == {"math"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["auto", "flash", "efficient", "cudnn", "math"])
def test_cuda_kernels_match_the_softmax_reference_in_bf16(backend: str) -> None:
    check_kernel(backend, "cuda", torch.bfloat16, 2e-2)
