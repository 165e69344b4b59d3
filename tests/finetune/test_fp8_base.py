"""A LoRA run's frozen base in fp8 (train.lora.base_dtype=fp8) without a training run: the rounding against torch's
own e4m3 cast, the layer's forward and backward against F.linear on the rounded weight (fp32 and bf16 autocast),
which layers it takes, what it saves for the backward, and `dit plan`'s count against the real model's bytes."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dit.config import ConfigError, load_config
from dit.models.families import build_denoiser
from dit.models.fp8 import FP8, MODULATION, Fp8Linear, quantize_rows
from dit.models.lora import inject_lora
from dit.plan import estimate, model_size
from dit.training.finetune import hold_frozen_base

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
WAN = ["model.family=wan", "model.patch_size=null", "diffusion.objective=flow", "diffusion.min_snr_gamma=null",
       "sample.sampler=flow_euler", "model.family_config.num_attention_heads=2",
       "model.family_config.attention_head_dim=16", "model.family_config.num_layers=2",
       "model.family_config.ffn_dim=64"]
FAMILIES = {"dit": ["model.preset=dit-tiny"], "wan": WAN}


def test_each_row_is_rounded_to_e4m3_of_its_own_range():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 32, generator=g) * torch.logspace(-4, 2, 6)[:, None]  # rows six decades apart
    w[2, :5] = 0.0
    codes, scale = quantize_rows(w)
    assert codes.dtype == torch.uint8 and scale.shape == (6, 1) and scale.dtype == torch.float32
    ref_scale = w.abs().amax(1, keepdim=True) / 448.0  # e4m3's largest finite value
    torch.testing.assert_close(scale, ref_scale, rtol=0, atol=0)
    deq = codes.view(FP8).float() * scale
    assert torch.equal(deq, (w / ref_scale).to(torch.float8_e4m3fn).float() * ref_scale)  # torch's own rounding
    assert torch.equal(deq.abs().amax(1), w.abs().amax(1))  # each row's largest weight exactly
    normal = (w / scale).abs() >= 2.0**-6  # e4m3's normal range: 3 mantissa bits, at most half a step off
    assert ((deq - w).abs() <= 2.0**-4 * w.abs())[normal].all()
    assert ((deq - w).abs() <= 2.0**-10 * scale.expand_as(w))[~normal].all()  # subnormal: half of 2^-9
    assert 0.005 < ((deq - w).norm() / w.norm()).item() < 0.05


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_the_layer_computes_with_the_rounded_weight_forward_and_backward(autocast: bool):
    g = torch.Generator().manual_seed(1)
    linear = torch.nn.Linear(24, 40).requires_grad_(False)
    with torch.no_grad():
        linear.weight.normal_(generator=g)
        linear.bias.normal_(generator=g)
    fp8 = Fp8Linear(linear)
    assert not any(p.requires_grad for p in fp8.parameters())
    rounded = torch.nn.Linear(24, 40).requires_grad_(False)
    rounded.weight.copy_(fp8.dequantized())
    rounded.bias.copy_(linear.bias)
    x = torch.randn(3, 7, 24, generator=g)
    ctx = torch.autocast("cpu", torch.bfloat16) if autocast else contextlib.nullcontext()
    outs, grads = [], []
    for layer in (fp8, rounded):
        xi = x.clone().requires_grad_(True)
        with ctx:
            out = layer(xi)
        out.float().square().sum().backward()
        outs.append(out)
        grads.append(xi.grad)
    assert outs[0].dtype == (torch.bfloat16 if autocast else torch.float32) == outs[1].dtype
    assert torch.equal(outs[0], outs[1])  # what autocast's F.linear gives on the rounded weight, bit for bit
    assert torch.equal(grads[0], grads[1])
    assert grads[0].dtype == torch.float32
    assert not torch.equal(F.linear(x, linear.weight), F.linear(x, fp8.dequantized()))  # really rounded


def build(family: str, precision: str, base_dtype: str = "fp8") -> tuple[object, torch.nn.Module, str | None]:
    torch.manual_seed(0)
    cfg = load_config(CONFIGS / "demo.yaml", [*FAMILIES[family], "train.lora.rank=4",
                                              f"train.lora.base_dtype={base_dtype}",
                                              f"train.mixed_precision={precision}"])
    model = build_denoiser(cfg.model, in_channels=8, text_dim=384)
    with torch.no_grad():  # (adaLN-Zero and zero output layers would hide any difference)
        for p in model.parameters():
            p.normal_(std=0.05)
    inject_lora(model, rank=4)
    return cfg, model, hold_frozen_base(model, cfg.train.lora, precision, "ddp")


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("precision", ["bf16", "no"])
def test_plan_counts_the_bytes_the_run_holds_and_only_base_weights_turn_fp8(family: str, precision: str):
    """Every frozen linear of the blocks but the modulation ones is an Fp8Linear; the adapters, norms and the layers
    outside the blocks are not; `dit plan`'s DDP weights are the real model's parameter bytes, exactly."""
    cfg, model, said = build(family, precision)
    assert said.startswith("LoRA base: the blocks' frozen linear weights held in fp8 e4m3")
    fp8 = [n for n, m in model.blocks.named_modules() if isinstance(m, Fp8Linear)]
    plain = [n for n, m in model.blocks.named_modules() if isinstance(m, torch.nn.Linear)
             and ".lora_" not in n]
    assert fp8 and all(n.endswith(".base_layer") for n in fp8)  # (every attention and MLP layer: LoRA targets)
    assert all(any(MODULATION.fullmatch(part) for part in n.split(".")) for n in plain), plain
    assert not any(isinstance(m, Fp8Linear) for name, m in model.named_modules() if "blocks" not in name)
    assert all(p.requires_grad == (".lora_" in n) for n, p in model.named_parameters())
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    est = {e.strategy: e for e in estimate(cfg, gpus=1, gpu_memory_gb=80, size=model_size(cfg))}
    assert est["ddp"].weights == held
    _, auto_model, _ = build(family, precision, "auto")
    assert held < sum(p.numel() * p.element_size() for p in auto_model.parameters())


def saved_bytes(model: torch.nn.Module) -> int:
    """Bytes saved for the backward by one bf16 forward, parameters (held anyway) left out."""
    params, total = {p.data_ptr() for p in model.parameters()}, [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        total[0] += 0 if t.data_ptr() in params else t.numel() * t.element_size()
        return t

    g = torch.Generator().manual_seed(2)
    x, text = torch.randn(2, 8, 3, 8, 8, generator=g), torch.randn(2, 5, 384, generator=g)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16):
        model(x, torch.tensor([10.0, 500.0]), text, torch.ones(2, 5, dtype=torch.bool)).float().sum().backward()
    return total[0]


def test_an_fp8_base_saves_for_the_backward_what_a_bf16_one_does():
    """Its layers keep their codes for the backward (no bf16 copy of the weight), and the output stays within
    e4m3's rounding of the bf16 base's."""
    _, fp8, _ = build("dit", "bf16")
    _, half, _ = build("dit", "bf16", "auto")
    _, full, _ = build("dit", "bf16", "fp32")
    assert saved_bytes(fp8) == saved_bytes(half) < saved_bytes(full)
    g = torch.Generator().manual_seed(3)
    x, text = torch.randn(2, 8, 3, 8, 8, generator=g), torch.randn(2, 5, 384, generator=g)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        a, b = (m(x, torch.tensor([10.0, 500.0]), text, torch.ones(2, 5, dtype=torch.bool)).float()
                for m in (fp8, half))
    assert 0 < ((a - b).norm() / b.norm()).item() < 0.05


def test_fp8_base_settings_that_cannot_work_are_refused():
    with pytest.raises(ConfigError, match="train.lora.base_dtype: fp8 is for train.strategy=ddp .* set "
                                          "train.lora.base_dtype=auto"):
        load_config(CONFIGS / "demo.yaml", ["train.lora.rank=4", "train.lora.base_dtype=fp8", "train.strategy=fsdp"])
    with pytest.raises(ConfigError, match="fp8 holds a LoRA run's frozen base in fp8: set train.lora.rank >= 1"):
        load_config(CONFIGS / "demo.yaml", ["train.lora.base_dtype=fp8"])
    with pytest.raises(ConfigError, match="must be auto, fp32 or fp8, got 'int8'"):
        load_config(CONFIGS / "demo.yaml", ["train.lora.rank=4", "train.lora.base_dtype=int8"])


def test_plan_offers_an_fp8_base_when_a_lora_run_does_not_fit():
    from dit.plan import format_plan

    def plan(memory_gb: float, *more: str) -> tuple[str, float]:
        cfg = load_config(CONFIGS / "demo.yaml", ["model.preset=dit-tiny", "train.lora.rank=4", *more])
        size = model_size(cfg)
        estimates = estimate(cfg, 1, memory_gb, size=size)
        return format_plan(cfg, 1, memory_gb, estimates, size), estimates[0].total

    _, fp8_total = plan(0.01, "train.lora.base_dtype=fp8")
    text, total = plan(0.01)
    assert fp8_total < total
    assert (f"with the base's weights in fp8 (train.lora.base_dtype=fp8, under DDP; 1% off in its outputs): ddp "
            f"{fp8_total / 2**30:.2f} GiB, does not fit either") in text
    assert "lower train.batch_size" in text and "turn on model.gradient_checkpointing" in text  # (demo: both apply)
    assert "train.lora.base_dtype=fp8" not in plan(80)[0]  # it fits: no offer
    assert "train.lora.base_dtype=fp8" not in plan(0.01, "train.lora.base_dtype=fp8")[0]
