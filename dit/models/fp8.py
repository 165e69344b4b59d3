"""A LoRA run's frozen base in fp8 (train.lora.base_dtype=fp8): each frozen linear layer of the blocks, except the
adaLN modulation ones, holds its weight as float8 e4m3 codes with one fp32 scale per output row (the row's largest
magnitude maps to e4m3's 448), a quarter of the fp32 bytes; each call dequantizes it to the compute dtype (bf16
under autocast, else the input's). The backward needs only the weight (it is frozen), so nothing is saved but the
codes themselves. musubi-tuner's ``--fp8_base --fp8_scaled`` stores Wan and HunyuanVideo bases this way.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
# adaLN modulation layers stay in the compute dtype: our DiT's adaLN, diffusers' norm*.linear, Qwen-Image's
# img_mod / txt_mod, Z-Image's adaLN_modulation
MODULATION = re.compile(r"norm.*|adaLN.*|.*_mod|.*modulation.*")


def fp8_candidates(blocks: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The linear layers of ``blocks`` whose weights an fp8 base holds in fp8: all but the modulation ones (and
    peft's lora_A / lora_B, which train)."""
    return [(name, m) for name, m in blocks.named_modules() if isinstance(m, nn.Linear)
            and not any(MODULATION.fullmatch(part) or part in ("lora_A", "lora_B") for part in name.split("."))]


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] -> its e4m3 codes (as uint8, which every collective carries) and the scale [out, 1] (fp32)
    such that codes * scale is the weight rounded to e4m3 of its row's range."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    return (w / scale).to(FP8).view(torch.uint8), scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (codes.view(FP8).float() * scale).to(dtype)


class _Fp8Matmul(torch.autograd.Function):
    """x @ W^T (+ b) with W dequantized from its codes in the forward and again in the backward (W is frozen: only
    the input's gradient flows)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                dtype: torch.dtype) -> torch.Tensor:
        ctx.save_for_backward(codes, scale)
        ctx.dtype, ctx.x_dtype = dtype, x.dtype
        return F.linear(x.to(dtype), dequantize(codes, scale, dtype), None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        codes, scale = ctx.saved_tensors
        grad_x = grad.to(ctx.dtype) @ dequantize(codes, scale, ctx.dtype)
        return grad_x.to(ctx.x_dtype), None, None, None, None


class Fp8Linear(nn.Module):
    """A frozen ``nn.Linear`` held as e4m3 codes + row scales (``quantize_rows``); computes in the autocast dtype
    when autocast is on, else in the input's dtype."""

    def __init__(self, linear: nn.Linear, bias_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        codes, scale = quantize_rows(linear.weight)
        self.weight_fp8 = nn.Parameter(codes, requires_grad=False)
        self.weight_scale = nn.Parameter(scale, requires_grad=False)
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(bias_dtype or bias.dtype),
                                                           requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kind = x.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
        with torch.autocast(kind, enabled=False):  # (the dtype is chosen above; the function casts itself)
            return _Fp8Matmul.apply(x, self.weight_fp8, self.weight_scale, self.bias, dtype)

    def dequantized(self) -> torch.Tensor:
        """The weight [out, in] as it computes it, in fp32."""
        return dequantize(self.weight_fp8, self.weight_scale, torch.float32)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 with row scales"


def frozen_block_linears_to_fp8(model: nn.Module, bias_dtype: torch.dtype | None = None) -> int:
    """Replace every frozen candidate linear layer of ``model.blocks`` (``fp8_candidates``; peft's base layers
    included) by an ``Fp8Linear``; returns the bytes saved (weights from their dtype to 1 byte, plus the scales).
    ``bias_dtype``: what their biases are held in (None: as they are)."""
    saved = 0
    for name, linear in fp8_candidates(model.blocks):
        if any(p.requires_grad for p in linear.parameters()):
            continue
        owner, _, attr = name.rpartition(".")
        parent = model.blocks.get_submodule(owner) if owner else model.blocks
        fp8 = Fp8Linear(linear, bias_dtype)
        saved += linear.weight.numel() * (linear.weight.element_size() - 1) - fp8.weight_scale.numel() * 4
        if linear.bias is not None:
            saved += linear.bias.numel() * (linear.bias.element_size() - fp8.bias.element_size())
        setattr(parent, attr, fp8)
    return saved
