"""LoRA fine-tuning from a base run: only the adapter trains and is checkpointed, in diffusers' LoRA file format;
sampling merges it into the recorded base."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from runs import small_config
from safetensors import safe_open

from dit.export import list_checkpoints, load_weights
from dit.models.lora import LORA_FILE
from dit.pipeline import generate, load_pipeline
from dit.training import train
from dit.training.checkpoint import load_training_state
from dit.weights import checkpoint_weights

LORA = {"train.lora.rank": 4, "train.lora.alpha": 8, "train.steps": 4, "train.checkpoint_every": 4,
        "train.lr": 1e-2, "train.ema_decay": 0.0}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, small_shards: str, small_vae: Path, base_run: Path) -> Path:
    run = tmp_path_factory.mktemp("lora") / "run"
    train.main(small_config(run, small_shards, small_vae, **{**LORA, "train.init_from": str(base_run)}))
    return run


def test_only_the_adapter_trains_and_is_saved(lora_run: Path, base_run: Path) -> None:
    ckpt = list_checkpoints(lora_run)[-1]
    state = load_training_state(ckpt)
    assert state["model"] and all(".lora_A." in k or ".lora_B." in k for k in state["model"])
    assert set(state["ema"]) == set(state["model"])
    adapter, config = load_weights(ckpt)
    assert config["lora"]["rank"] == 4 and config["lora"]["alpha"] == 8
    assert config["lora"]["base"] == {"init_from": str(base_run.resolve())}
    base, _ = load_weights(list_checkpoints(base_run)[-1])
    adapter_bytes = (ckpt / LORA_FILE).stat().st_size
    base_bytes = sum(v.numel() * v.element_size() for v in base.values())
    assert adapter_bytes <= 0.05 * base_bytes, (adapter_bytes, base_bytes)
    moved = [k for k, v in adapter.items() if ".lora_B." in k and v.abs().max() > 0]
    assert moved, "lora_B stayed at zero: the adapter did not train"

    with safe_open(str(ckpt / LORA_FILE), framework="pt") as f:  # diffusers' pipeline layout
        keys, meta = list(f.keys()), json.loads(f.metadata()["lora_adapter_metadata"])
    assert keys and all(k.startswith("transformer.blocks.") and (".lora_A.weight" in k or ".lora_B.weight" in k)
                        for k in keys)
    assert meta["transformer.r"] == 4 and meta["transformer.lora_alpha"] == 8
    assert sorted(meta["transformer.target_modules"]) == config["lora"]["modules"]

    merged, merged_config = checkpoint_weights(ckpt)  # the base with the adapter merged: plain keys
    assert "lora" not in merged_config and merged.keys() == base.keys()
    changed = [k for k in base if not torch.equal(base[k], merged[k])]
    assert changed and all(k.endswith(".weight") for k in changed)


def sample_png(out: Path, checkpoint: Path, *extra: str) -> np.ndarray:
    from PIL import Image

    from dit.cli import main as dit

    dit(["sample", "--checkpoint", str(checkpoint), "--prompt", "a red circle moving left", "--frames", "1",
         "--steps", "3", "--seed", "1", "--out", str(out), *extra])
    return np.asarray(Image.open(out)).astype(np.int16)


def test_merged_checkpoint_base_plus_adapter_and_the_lora_run_sample_alike(lora_run: Path, base_run: Path,
                                                                            tmp_path: Path) -> None:
    from dit.merge import merge_lora_run

    merged = merge_lora_run(lora_run, tmp_path / "merged")
    assert (merged / "model.safetensors").is_file() and "lora" not in json.loads((merged / "config.json").read_text())
    run = sample_png(tmp_path / "run.png", lora_run)
    assert np.abs(sample_png(tmp_path / "merged.png", merged) - run).max() <= 1
    assert np.abs(sample_png(tmp_path / "plus.png", base_run, "--lora", str(lora_run)) - run).max() <= 1
    base = sample_png(tmp_path / "base.png", base_run)
    assert np.array_equal(sample_png(tmp_path / "zero.png", base_run, "--lora", str(lora_run), "--lora-scale", "0"),
                          base)  # scale 0 is the base, exactly
    assert np.abs(run - base).max() > 1  # and the adapter changes the image


def test_bad_fine_tune_inputs_fail_before_any_work(tmp_path: Path, small_shards: str, small_vae: Path,
                                                    base_run: Path, lora_run: Path) -> None:
    from dit.config import ConfigError
    from dit.merge import merge_lora_run
    from dit.weights import checkpoint_weights

    not_a_run = tmp_path / "empty"
    not_a_run.mkdir()
    with pytest.raises(ConfigError, match="train.init_from: .* is neither a run / checkpoint directory of dit"):
        train.main(small_config(tmp_path / "a", small_shards, small_vae, **{"train.init_from": str(not_a_run)}))
    with pytest.raises(ConfigError, match=r"train.init_from: .* holds another model than this config builds "
                                          r"\(depth: 4 there, 12 here; hidden_size: 128 there, 384 here"):
        train.main(small_config(tmp_path / "b", small_shards, small_vae, **{"train.init_from": str(base_run),
                                                                             "model.preset": "DiT-S/2"}))
    with pytest.raises(ConfigError, match="train.lora.rank: LoRA adapts trained weights"):
        train.main(small_config(tmp_path / "c", small_shards, small_vae, **{"train.lora.rank": 4}))
    with pytest.raises(ConfigError, match=r"train.lora.targets: set train.lora.rank >= 1"):
        small_config(tmp_path / "d", small_shards, small_vae, **{"train.lora.targets": "[blocks.0.attn.q]"})
    with pytest.raises(ConfigError, match=r"train.lora.rank: must be >= 0"):
        small_config(tmp_path / "e", small_shards, small_vae, **{"train.lora.rank": -1})
    assert not any((tmp_path / n).exists() for n in "abc")

    other = tmp_path / "other"  # a DiT of another width: the adapter's shapes do not fit it
    train.main(small_config(other, small_shards, small_vae, **{"train.steps": 1, "model.hidden_size": 64,
                                                               "model.num_heads": 2}))
    with pytest.raises(ValueError, match=r"the adapter's 'blocks.0.attn.kv' is 256x128 \(rank 4\) but the base "
                                         r"weight is 128x64: an adapter for another model"):
        checkpoint_weights(other, lora=lora_run)
    with pytest.raises(ConfigError, match="is not a LoRA checkpoint"):
        merge_lora_run(base_run, tmp_path / "m")


def test_a_bf16_lora_run_holds_its_frozen_base_in_bf16_with_the_same_losses(tmp_path: Path, small_shards: str,
                                                                               small_vae: Path, base_run: Path,
                                                                               caplog) -> None:
    """train.lora.base_dtype=auto (the default) in a bf16 DDP run keeps the blocks' frozen linear layers in bf16,
    which is what autocast computes them in: the losses, gradient norms and adapter equal those of a run that keeps
    the base in fp32 (train.lora.base_dtype=fp32), and the log says how much memory it saved. base_dtype=fp8 trains
    on the base rounded to e4m3: losses within 0.2%, not the same ones; its adapter samples."""
    import logging

    runs, said = {}, {"auto": "blocks' frozen linear layers held in bf16",
                      "fp8": "blocks' frozen linear weights held in fp8 e4m3 with a scale per row, the modulation "
                             "layers in bf16"}
    for base_dtype in ("auto", "fp32", "fp8"):
        runs[base_dtype] = tmp_path / base_dtype
        with caplog.at_level(logging.INFO, logger="dit.train"):
            train.main(small_config(runs[base_dtype], small_shards, small_vae, **{
                **LORA, "train.init_from": str(base_run), "train.mixed_precision": "bf16",
                "train.lora.base_dtype": base_dtype, "model.gradient_checkpointing": True}))
        assert [k for k, line in said.items() if line in caplog.text] == ([base_dtype] if base_dtype in said else [])
        caplog.clear()
    metrics = {k: [json.loads(line) for line in (r / "metrics.jsonl").read_text().splitlines()]
               for k, r in runs.items()}
    for key in ("loss", "grad_norm"):
        assert [m[key] for m in metrics["auto"]] == [m[key] for m in metrics["fp32"]], key
    a, b = (load_training_state(list_checkpoints(runs[k])[-1])["model"] for k in ("auto", "fp32"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(".lora_B." in k and a[k].abs().max() > 0 for k in a)  # the adapter trained
    fp8, half = ([m["loss"] for m in metrics[k]] for k in ("fp8", "auto"))
    assert fp8 != half and fp8 == pytest.approx(half, rel=2e-3)  # (measured: 1e-4 at most)
    c = load_training_state(list_checkpoints(runs["fp8"])[-1])["model"]
    assert c.keys() == a.keys() and any(not torch.equal(c[k], a[k]) for k in a)  # (the checkpoint: the adapter)
    video = generate(load_pipeline(runs["fp8"]), ["a red circle"], frames=5, height=16, width=16, steps=2)
    assert torch.isfinite(video).all()


TINY = {  # 4 latent channels, text width 16; (family_config, latent grid)
    "dit": (None, (3, 4, 4)),
    "wan": (dict(num_attention_heads=2, attention_head_dim=12, ffn_dim=32, num_layers=2, rope_max_seq_len=32,
                 freq_dim=32, patch_size=[1, 2, 2]), (3, 4, 4)),
    "ltx": (dict(num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16, num_layers=2,
                 caption_channels=16), (3, 2, 2)),
    "cogvideox": (dict(num_attention_heads=2, attention_head_dim=16, time_embed_dim=16, num_layers=2,
                       sample_frames=9, sample_height=4, sample_width=4, max_text_seq_length=5, patch_size=2),
                  (3, 4, 4)),
}


@pytest.mark.parametrize("family", list(TINY))
def test_the_frozen_base_in_bf16_is_what_autocast_computes(family: str) -> None:
    """frozen_block_linears_to_bf16 casts only the blocks' frozen linear layers (not the adapters, norms or the
    layers outside the blocks), and under bf16 autocast the model's output and the adapter's gradients are
    unchanged, bit for bit: our DiT and the three families."""
    from dit.config import ModelConfig
    from dit.models.dit import DiT
    from dit.models.families import build_denoiser
    from dit.models.lora import inject_lora
    from dit.training.finetune import frozen_block_linears_to_bf16

    torch.manual_seed(0)
    sizes, grid = TINY[family]
    model = (DiT(in_channels=4, text_dim=16, hidden_size=64, depth=2, num_heads=4, patch_size=(1, 2, 2))
             if family == "dit" else
             build_denoiser(ModelConfig(family=family, family_config=sizes), in_channels=4, text_dim=16))
    inject_lora(model, rank=4)
    for p in model.parameters():  # every path carries a value (LoRA's B and adaLN-Zero start at zero)
        torch.nn.init.normal_(p, std=0.1)
    gen = torch.Generator().manual_seed(1)
    x, t, text = torch.randn(2, 4, *grid, generator=gen), torch.tensor([10.0, 500.0]), torch.randn(2, 5, 16,
                                                                                                  generator=gen)
    mask = torch.ones(2, 5, dtype=torch.bool)

    def forward_backward() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t, text, mask)
        out.float().square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    before, grads = forward_backward()
    blocks = {id(p) for p in model.blocks.parameters()}
    frozen_linear = {id(p) for m in model.modules() if isinstance(m, torch.nn.Linear)
                     for p in m.parameters(recurse=False) if not p.requires_grad and id(p) in blocks}
    saved = frozen_block_linears_to_bf16(model)
    half = {id(p) for p in model.parameters() if p.dtype == torch.bfloat16}
    assert half == frozen_linear and len(half) < len(blocks)  # the blocks' norms, tables and adapters stay fp32
    assert all(p.dtype == torch.float32 for p in model.parameters() if id(p) not in half)
    assert saved == 2 * sum(p.numel() for p in model.parameters() if id(p) in half)
    after, grads_after = forward_backward()
    assert torch.equal(after, before)
    assert grads.keys() == grads_after.keys() and all(torch.equal(grads[n], grads_after[n]) for n in grads)
