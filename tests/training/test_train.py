"""Training end to end on synthetic shards: the VAE trains, the DiT's loss falls, checkpoints resume and load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dit.config import ConfigError, load_config
from dit.export import list_checkpoints, load_weights
from dit.training import train, train_vae
from dit.training.checkpoint import load_training_state

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def demo_config(out: Path, shards: str, **overrides: object):
    items = [f"data.shards={shards}", f"train.output_dir={out}", "data.frames=9", "data.height=32",
             "data.width=32", "train.batch_size=8", "data.shuffle_buffer=16"]
    items += [f"{k}={v}" for k, v in overrides.items()]
    return load_config(CONFIG, items)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    from data_pipelines.synthetic import make_synthetic

    out = tmp_path_factory.mktemp("demo_data")
    make_synthetic(out, num_clips=96, frames=9, height=32, width=32, clips_per_shard=32, seed=1)
    return str(out)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory, shards) -> Path:
    run = tmp_path_factory.mktemp("vae_run")
    cfg = demo_config(run, shards, **{"train.steps": 60, "train.lr": 2e-3, "train.warmup_steps": 5})
    return train_vae.main(cfg)


def test_vae_training_writes_a_loadable_vae_with_fitted_stats(vae_dir: Path) -> None:
    from dit.models.vae import load_vae

    vae = load_vae(vae_dir)
    assert (vae_dir / "vae.safetensors").is_file() and (vae_dir / "vae.json").is_file()
    c = load_config(CONFIG).vae.latent_channels
    assert vae.latent_channels == c
    assert not torch.allclose(vae.latent_std, torch.ones(c))  # fitted from data, not the default
    assert (vae.latent_std > 0).all()


def test_train_vae_from_a_checkpoint_trains_that_vae_further(tmp_path: Path, shards: str, vae_dir: Path) -> None:
    """vae.checkpoint: train-vae starts from that VAE (its sizes, not vae.*'s), so 3 small steps stay near its
    weights, where a new VAE would start far from them."""
    from safetensors.torch import load_file

    from dit.models.vae import CausalVAE, load_vae

    start = load_vae(vae_dir)
    cfg = demo_config(tmp_path / "more", shards, **{"train.steps": 3, "train.lr": 1e-4, "train.warmup_steps": 0,
                                                    "vae.checkpoint": vae_dir, "vae.base_channels": 16,
                                                    "vae.latent_channels": 8})
    more = load_vae(train_vae.main(cfg))
    assert more.config == start.config  # the checkpoint's sizes won over vae.base_channels / latent_channels
    recorded = load_config(tmp_path / "more" / "config.yaml", []).vae
    assert (recorded.base_channels, recorded.latent_channels) == (start.config["base_channels"], start.latent_channels)
    before, after = load_file(vae_dir / "vae.safetensors"), load_file(tmp_path / "more" / "vae" / "vae.safetensors")
    moved = max((after[k] - before[k]).abs().max().item() for k in before if not k.startswith("latent_"))
    assert 0 < moved < 1e-2, moved  # AdamW moves a weight ~lr a step
    fresh = CausalVAE(**start.config).state_dict()
    assert max((fresh[k] - before[k]).abs().max().item() for k in before if not k.startswith("latent_")) > 0.1


def test_train_vae_from_a_folder_without_a_vae_stops_before_any_work(tmp_path: Path, shards: str) -> None:
    cfg = demo_config(tmp_path / "run", shards, **{"vae.checkpoint": tmp_path})
    with pytest.raises(ConfigError, match="holds no vae.json"):
        train_vae.main(cfg)
    assert not (tmp_path / "run").exists()
    (tmp_path / "vae.json").write_text(json.dumps({"family": "wan", "pretrained": str(tmp_path)}))
    with pytest.raises(ConfigError, match="pretrained family's VAE"):
        train_vae.main(cfg)
    assert not (tmp_path / "run").exists()


def test_dit_loss_falls_well_below_its_start(tmp_path: Path, shards: str, vae_dir: Path) -> None:
    run = tmp_path / "dit"
    cfg = demo_config(run, shards, **{"train.steps": 150, "train.log_every": 10, "vae.checkpoint": vae_dir,
                                      "train.checkpoint_every": 1000, "train.sample_prompts": "[]",
                                      "diffusion.min_snr_gamma": "null"})  # unweighted, so the start is known
    ckpt = train.main(cfg)
    losses = [m["loss"] for m in metrics(run)]
    assert len(losses) == 15
    # A fresh DiT predicts zeros, so the eps loss starts at E[eps^2] = 1.
    assert 0.8 < losses[0] < 1.2
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0], losses
    assert ckpt == run / "checkpoints" / "step-00000150"
    weights, config = load_weights(ckpt)
    assert config["experiment"]["train"]["steps"] == 150
    assert config["dit"]["in_channels"] == cfg.vae.latent_channels
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert (ckpt / "vae" / "vae.safetensors").is_file()  # self-contained: the VAE travels with it
    assert list((run / "tensorboard").iterdir())


def test_resume_continues_from_the_newest_checkpoint(tmp_path: Path, shards: str, vae_dir: Path) -> None:
    run = tmp_path / "dit"
    common = {"vae.checkpoint": vae_dir, "train.checkpoint_every": 4, "train.log_every": 2, "train.keep_last": 2,
              "train.sample_prompts": "[]"}
    train.main(demo_config(run, shards, **{"train.steps": 8, **common}))
    assert [p.name for p in list_checkpoints(run)] == ["step-00000004", "step-00000008"]
    before = load_training_state(run / "checkpoints" / "step-00000008")

    train.main(demo_config(run, shards, **{"train.steps": 12, **common}))
    assert [p.name for p in list_checkpoints(run)] == ["step-00000008", "step-00000012"]  # keep_last = 2
    assert [m["step"] for m in metrics(run)] == [2, 4, 6, 8, 10, 12]  # no step repeated
    after = load_training_state(run / "checkpoints" / "step-00000012")
    assert after["step"] == 12
    changed = [k for k in before["model"] if not torch.equal(before["model"][k], after["model"][k])]
    assert changed  # training went on from the restored weights
    assert after["scheduler"]["last_epoch"] == 12  # the LR schedule was restored, not restarted


def test_a_half_written_checkpoint_is_ignored(tmp_path: Path, shards: str, vae_dir: Path) -> None:
    run = tmp_path / "dit"
    common = {"vae.checkpoint": vae_dir, "train.checkpoint_every": 3, "train.sample_prompts": "[]"}
    train.main(demo_config(run, shards, **{"train.steps": 3, **common}))
    # A crash mid-write leaves a temporary directory, and an interrupted copy leaves a step dir without weights.
    (run / "checkpoints" / ".tmp-step-00000006-123").mkdir()
    (run / "checkpoints" / "step-00000009").mkdir()
    (run / "checkpoints" / "step-00000009" / "config.json").write_text("{}")
    assert [p.name for p in list_checkpoints(run)] == ["step-00000003"]
    train.main(demo_config(run, shards, **{"train.steps": 6, **common}))
    assert load_training_state(run / "checkpoints" / "step-00000006")["step"] == 6


def test_bad_config_fails_before_any_work(tmp_path: Path, shards: str) -> None:
    with pytest.raises(ConfigError, match="train.stepz"):
        demo_config(tmp_path, shards, **{"train.stepz": 3})
    with pytest.raises(ConfigError, match="train.lr"):
        demo_config(tmp_path, shards, **{"train.lr": "fast"})
    missing = tmp_path / "nowhere" / "{00000..00003}.tar"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        train_vae.main(demo_config(tmp_path / "run", str(missing), **{"train.steps": 1}))
    assert not (tmp_path / "run").exists()  # nothing was started or written


def test_lr_schedule_warms_up_then_holds_or_decays() -> None:
    from dit.training.optim import lr_lambda

    const, cos = lr_lambda(10, 110, "constant"), lr_lambda(10, 110, "cosine", floor=0.05)
    assert [const(s) for s in (0, 4, 9, 10, 109)] == [0.1, 0.5, 1.0, 1.0, 1.0]
    assert [cos(s) for s in (0, 9, 10)] == [0.1, 1.0, 1.0]
    assert cos(60) == pytest.approx(0.525)  # half way: the midpoint between 1 and the floor
    assert cos(110) == pytest.approx(0.05) and cos(500) == pytest.approx(0.05)
    assert all(cos(s) >= cos(s + 1) for s in range(10, 120))


def test_fp16_on_a_bf16_trained_family_is_warned_by_name(caplog: pytest.LogCaptureFixture) -> None:
    from dit.training.optim import mixed_precision

    with caplog.at_level("WARNING", logger="dit.optim"):
        assert mixed_precision("fp16", "wan") == "fp16"
    assert "model.family=wan: its released weights are bf16" in caplog.text
    assert "train.mixed_precision=no" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="dit.optim"):
        mixed_precision("fp16", "cogvideox")  # (CogVideoX-2B was trained in fp16: the plain note only)
        mixed_precision("bf16", "wan")
    assert "released weights" not in caplog.text and caplog.text.count("dynamic loss scaling") == 1


def test_image_batch_takes_one_real_frame_of_each_clip() -> None:
    x = torch.randn(6, 3, 9, 4, 4)
    out = train_vae.image_batch(x, torch.Generator().manual_seed(0))
    assert out.shape == (6, 3, 1, 4, 4)
    picked = [next(t for t in range(9) if torch.equal(out[b, :, 0], x[b, :, t])) for b in range(6)]
    assert len(set(picked)) > 1  # a random frame per clip, not always the first
    again = train_vae.image_batch(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_vae_image_phase_trains_on_frames_then_clips(tmp_path: Path, shards: str) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "vae"
    train_vae.main(demo_config(run, shards, **{"train.steps": 5, "vae.image_steps": 3, "train.log_every": 1}))
    events = EventAccumulator(str(run / "tensorboard-vae"))
    events.Reload()
    assert [int(e.value) for e in events.Scalars("vae/frames")] == [1, 1, 1, 9, 9]
    with pytest.raises(ConfigError, match="vae.image_steps"):
        demo_config(run, shards, **{"vae.image_steps": -1})
    with pytest.raises(ConfigError, match="data.latents"):
        train_vae.main(demo_config(tmp_path / "lat", shards, **{"data.latents": "true", "train.steps": 1}))


def test_vae_fused_adamw_and_decode_cache_train_as_the_plain_run(tmp_path: Path, shards: str) -> None:
    """The demo's train-vae settings: train.fused_adamw (one fused kernel) and data.decode_cache_mb (one shard of 32
    clips, batch 8: epochs 3 and 4 come from the cache) give the plain run's losses and weights up to float
    rounding."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dit.models.vae import load_vae

    losses, weights = {}, {}
    shard = sorted(Path(shards).glob("*.tar"))[0]
    for name, extra in (("plain", {}), ("fast", {"train.fused_adamw": "true", "data.decode_cache_mb": 16})):
        run = tmp_path / name
        train_vae.main(demo_config(run, str(shard), **{"train.steps": 16, "train.log_every": 1, "data.frames": 5,
                                                       "vae.image_steps": 6, **extra}))
        events = EventAccumulator(str(run / "tensorboard-vae"))
        events.Reload()
        losses[name] = torch.tensor([e.value for e in events.Scalars("vae/loss")])
        weights[name] = load_vae(run / "vae").state_dict()
    assert len(losses["plain"]) >= 16
    torch.testing.assert_close(losses["fast"], losses["plain"], rtol=1e-4, atol=1e-6)
    for k, w in weights["plain"].items():
        torch.testing.assert_close(weights["fast"][k], w, rtol=1e-3, atol=1e-5, msg=k)
