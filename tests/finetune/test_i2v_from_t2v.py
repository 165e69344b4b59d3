"""An image-to-video run (model.condition=first_frame) started from a text-to-video base with train.init_from: the
patch embedding widens with zero columns, so the new model at step 0 is the base; LoRA, which would freeze them, is
refused before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import small_config

from dit.config import ConfigError
from dit.models.condition import first_frame_condition
from dit.models.dit import DiT
from dit.training import train
from dit.training.finetune import check_finetune, load_init_from
from dit.weights import checkpoint_weights


def test_an_image_to_video_run_starts_from_a_text_to_video_base(tmp_path: Path, small_shards: str,
                                                                small_vae: Path, base_run: Path) -> None:
    weights, config = checkpoint_weights(base_run)
    kwargs = {**config["dit"], "patch_size": tuple(config["dit"]["patch_size"])}
    base = DiT(**kwargs).eval()
    base.load_state_dict(weights)
    c = kwargs["in_channels"]
    i2v = DiT(**kwargs, condition_channels=c + 1).eval()
    cfg = small_config(tmp_path / "i2v", small_shards, small_vae,
                       **{"model.condition": "first_frame", "train.init_from": str(base_run)})
    check_finetune(cfg, json.loads(json.dumps(i2v.config)))  # allowed: only condition_channels differs
    load_init_from(i2v, str(base_run))
    n = base.x_embed.in_features
    assert torch.equal(i2v.x_embed.weight[:, :n], base.x_embed.weight) and not i2v.x_embed.weight[:, n:].any()
    torch.manual_seed(0)
    x, t = torch.randn(2, c, 2, 4, 4), torch.tensor([10, 700])
    text, mask = torch.randn(2, 3, kwargs["text_dim"]), torch.ones(2, 3, dtype=torch.bool)
    cond = first_frame_condition(torch.randn(2, c, 1, 4, 4), 2)
    with torch.no_grad():
        expected = base(x, t, text, mask)
        assert torch.equal(i2v(x, t, text, mask), expected)  # no image: the base exactly
        assert torch.equal(i2v(x, t, text, mask, condition=cond), expected)  # and the image is not seen yet

    with pytest.raises(ConfigError, match="LoRA freezes: use full fine-tuning"):
        train.main(small_config(tmp_path / "lora", small_shards, small_vae, **{
            "model.condition": "first_frame", "train.init_from": str(base_run), "train.lora.rank": 4}))
    assert not (tmp_path / "lora").exists()

    train.main(small_config(tmp_path / "i2v", small_shards, small_vae, **{
        "model.condition": "first_frame", "train.init_from": str(base_run), "train.steps": 2,
        "train.checkpoint_every": 2}))
    trained, _ = checkpoint_weights(tmp_path / "i2v")
    assert trained["x_embed.weight"].shape == i2v.x_embed.weight.shape
    assert trained["x_embed.weight"][:, n:].abs().sum() > 0  # the new inputs learn
