"""LoRA pieces without a training run: target selection, the shared-frozen EMA, the file format round trip, the
merge arithmetic against peft's own forward, and `dit plan` for a LoRA run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dit.config import ModelConfig, load_config
from dit.models.dit import build_dit
from dit.models.lora import (
    DEFAULT_TARGETS,
    adapter_weights,
    inject_lora,
    merge_lora,
    read_lora_file,
    target_modules,
    write_lora_file,
)
from dit.plan import estimate, model_size
from dit.training.ema import build_ema

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_dit(ModelConfig(preset="dit-tiny"), in_channels=4, text_dim=8)


def inputs():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 4, 2, 4, 4, generator=g), torch.tensor([10, 500]), torch.randn(2, 3, 8, generator=g),
            torch.ones(2, 3, dtype=torch.bool))


def test_default_targets_are_every_blocks_attention_and_mlp():
    model = tiny()
    names = target_modules(model)
    depth = len(model.blocks)
    assert len(names) == depth * 8  # attn q, kv, proj; cross q, kv, proj; mlp fc1, fc2
    assert "blocks.0.attn.q" in names and f"blocks.{depth - 1}.mlp.fc2" in names and "final.linear" not in names
    with pytest.raises(ValueError, match=r"train.lora.targets: '.*nope' matches no linear layer"):
        target_modules(model, [r"blocks\.\d+\.nope"])
    from dit.models.families import FAMILY_NAMES

    assert set(DEFAULT_TARGETS) == set(FAMILY_NAMES)  # every family has its defaults


def test_hunyuan_default_targets_are_both_streams_and_the_single_blocks():
    from dit.models.families import build_denoiser

    sizes = dict(num_attention_heads=2, attention_head_dim=10, num_layers=2, num_single_layers=3,
                 num_refiner_layers=1, rope_axes_dim=[2, 4, 4], pooled_projection_dim=8)
    model = build_denoiser(ModelConfig(family="hunyuan", family_config=sizes), in_channels=4, text_dim=16)
    names = target_modules(model)
    # dual-stream: q k v out of both streams and both MLPs (8 + 4); single-stream: q k v, MLP in, output (5)
    assert len(names) == 2 * 12 + 3 * 5
    assert "transformer.transformer_blocks.1.attn.to_add_out" in names
    assert "transformer.single_transformer_blocks.2.proj_out" in names
    assert not any("refiner" in n or "norm" in n or "embed" in n for n in names)  # the blocks alone


@torch.no_grad()
def test_merged_weights_give_peft_forward_and_the_file_round_trips(tmp_path):
    model = tiny()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    modules = inject_lora(model, rank=4, alpha=8.0)
    assert all(p.requires_grad == (".lora_" in n) for n, p in model.named_parameters())
    g = torch.Generator().manual_seed(2)
    for n, p in model.named_parameters():
        if ".lora_B." in n:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)  # a trained (nonzero) B
    adapted = model.eval()(*inputs())
    adapter = adapter_weights(model.state_dict())
    write_lora_file(tmp_path / "a.safetensors", adapter, family="dit", rank=4, alpha=8.0, modules=modules)
    read, meta = read_lora_file(tmp_path / "a.safetensors", "dit")
    assert meta["r"] == 4 and meta["lora_alpha"] == 8.0 and read.keys() == adapter.keys()
    assert all(torch.equal(read[k], adapter[k]) for k in adapter)
    plain = tiny()
    plain.load_state_dict(merge_lora(base, read, 8.0 / 4))
    torch.testing.assert_close(plain.eval()(*inputs()), adapted, atol=1e-5, rtol=1e-5)
    zero = tiny()
    zero.load_state_dict(merge_lora(base, read, 0.0))
    assert all(torch.equal(zero.state_dict()[k], base[k]) for k in base)  # scale 0: the base, bit for bit


def test_a_lora_ema_shares_the_frozen_base_and_averages_the_adapter():
    model = tiny()
    inject_lora(model, rank=2)
    ema = build_ema(model, decay=0.5, share_frozen=True)
    mine, theirs = dict(model.named_parameters()), dict(ema.module.named_parameters())
    assert mine.keys() == theirs.keys()
    for n, p in mine.items():
        assert (theirs[n] is p) == (not p.requires_grad), n  # frozen: the same tensor; the adapter: a copy
    frozen_before = {n: p.detach().clone() for n, p in mine.items() if not p.requires_grad}
    with torch.no_grad():
        for p in mine.values():
            if p.requires_grad:
                p.add_(1.0)
    ema.update(model, step=100)
    for n, p in mine.items():
        if p.requires_grad:
            assert not torch.equal(theirs[n], p)  # moved towards the model, not onto it
        else:
            assert torch.equal(p, frozen_before[n])


def test_plan_counts_a_lora_fine_tune():
    full = load_config(CONFIGS / "wan2.1-t2v-1.3b.yaml", [])
    lora = load_config(CONFIGS / "wan2.1-t2v-1.3b.yaml", ["train.lora.rank=16"])
    size_full, size_lora = model_size(full), model_size(lora)
    per_layer = {(1536, 1536): 30 * 8, (1536, 8960): 30, (8960, 1536): 30}  # q/k/v/out of 2 attentions; ffn in/out
    assert size_lora.params == sum(16 * (i + o) * n for (i, o), n in per_layer.items())
    assert size_lora.base == size_full.params
    a = {e.strategy: e for e in estimate(full, gpus=8, gpu_memory_gb=80, size=size_full)}
    b = {e.strategy: e for e in estimate(lora, gpus=8, gpu_memory_gb=80, size=size_lora)}
    assert b["ddp"].optimizer == pytest.approx(8 * size_lora.params) and b["ddp"].optimizer < a["ddp"].optimizer / 50
    assert b["ddp"].ema == pytest.approx(4 * size_lora.params)  # the EMA shares the frozen base under DDP
    assert b["ddp"].total < a["ddp"].total and b["fsdp"].total < a["fsdp"].total


def test_plan_counts_a_bf16_lora_base_under_ddp_as_the_run_casts_it():
    """In a bf16 LoRA run under DDP the blocks' frozen linear layers are held in bf16 (train.lora.base_dtype=auto):
    `dit plan` takes 2 bytes off each of their parameters, which are the ones frozen_block_linears_to_bf16 casts on
    the real model; fp32 (or another strategy: DeepSpeed and FSDP hold the base their own way) keeps 4 bytes."""
    from dit.models.families import build_denoiser
    from dit.training.finetune import frozen_block_linears_to_bf16

    wan = ["model.family_config.num_attention_heads=2", "model.family_config.attention_head_dim=16",
           "model.family_config.num_layers=2", "model.family_config.ffn_dim=64", "train.lora.rank=4"]
    for family, overrides in (("dit", ["model.preset=dit-tiny", "train.lora.rank=4"]),
                              ("wan", ["model.family=wan", "model.patch_size=null", "diffusion.objective=flow",
                                      "diffusion.min_snr_gamma=null", "sample.sampler=flow_euler", *wan])):
        cfg = load_config(CONFIGS / "demo.yaml", [*overrides, "train.mixed_precision=bf16"])
        size = model_size(cfg)
        model = build_denoiser(cfg.model, in_channels=8, text_dim=384)
        inject_lora(model, rank=4)
        assert 0 < 2 * size.base_linear == frozen_block_linears_to_bf16(model) < 2 * size.base, family
        half = {e.strategy: e for e in estimate(cfg, gpus=1, gpu_memory_gb=80, size=size)}
        fp32_cfg = load_config(CONFIGS / "demo.yaml", [*overrides, "train.mixed_precision=bf16",
                                                      "train.lora.base_dtype=fp32"])
        full = {e.strategy: e for e in estimate(fp32_cfg, gpus=1, gpu_memory_gb=80, size=size)}
        assert full["ddp"].weights - half["ddp"].weights == pytest.approx(2 * size.base_linear)
        assert all(full[s].weights == half[s].weights for s in full if s != "ddp")
