"""LoRA fine-tuning from a base run: only the adapter trains and is checkpointed, in diffusers' LoRA file format;
sampling merges it into the recorded base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from runs import small_config
from safetensors import safe_open

from dit.export import list_checkpoints, load_weights
from dit.models.lora import LORA_FILE
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
