"""Training from latent shards (`dit encode` output, data.latents=true) equals training from the raw shards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from family_runs import losses
from runs import small_config

from data_pipelines.latents import check_latent_shards
from dit.config import Config, ConfigError
from dit.encode import encode_shards
from dit.models.text import HFTextEncoder, TextEncoder, build_text_encoder
from dit.models.vae import CausalVAE, encoder_digest, load_vae, save_vae
from dit.training import train


def check(cfg: Config, vae: CausalVAE, text: TextEncoder) -> bool:
    """check_latent_shards as training calls it."""
    return check_latent_shards(cfg.data, vae_path=cfg.vae.checkpoint, latent_channels=vae.latent_channels,
                               vae_encoder=encoder_digest(vae), text_encoder=cfg.text.encoder,
                               text_max_length=cfg.text.max_length, text_dim=text.dim, text_name=text.name)


@pytest.fixture(scope="module")
def latent_shards(tmp_path_factory, small_shards: str, small_vae: Path) -> str:
    out = tmp_path_factory.mktemp("latent_shards")
    cfg = small_config(out, small_shards, small_vae)
    assert encode_shards(small_shards, out, cfg, batch_size=8) == {"encoded": 4, "skipped": 0, "samples": 64}
    return str(out)


def test_latent_shards_train_like_the_raw_ones(tmp_path, small_shards, small_vae, latent_shards, monkeypatch):
    """Same seed, so the same batches, posterior draws, timesteps, noise and dropped prompts: the same losses.
    (Without text.cache_dir, which would serve the empty prompt from the session's store.)"""
    common = {"train.steps": 4, "train.checkpoint_every": 1000, "diffusion.prompt_dropout": 0.5,
              "text.cache_dir": "null"}
    raw_run, latent_run = tmp_path / "raw", tmp_path / "latent"
    train.main(small_config(raw_run, small_shards, small_vae, **common))

    prompts: list[str] = []  # the latent run never codes a clip nor a caption (only the empty prompt)
    original = HFTextEncoder._encode_uncached
    monkeypatch.setattr(HFTextEncoder, "_encode_uncached", lambda self, p: (prompts.extend(p), original(self, p))[1])
    monkeypatch.setattr(CausalVAE, "encode", lambda *a, **k: pytest.fail("the VAE encoder ran on latent shards"))
    train.main(small_config(latent_run, latent_shards, small_vae, **common, **{"data.latents": "true"}))
    assert set(prompts) == {""}

    raw, latent = losses(raw_run), losses(latent_run)
    assert len(raw) == 4 and len({round(x, 6) for x in raw}) == 4
    torch.testing.assert_close(torch.tensor(latent), torch.tensor(raw), rtol=1e-5, atol=1e-6)


def test_with_a_warm_text_cache_a_latent_run_never_loads_the_text_encoder(tmp_path, small_shards, small_vae,
                                                                          latent_shards, monkeypatch):
    """text.cache_dir: the raw run stores its captions' and the empty prompt's states; a run from latent shards then
    reads "" from the store, never builds the encoder (a Wan run would hold no umT5), and trains as without it."""
    from dit.models.text_cache import CachedTextEncoder, prompt_file

    common = {"train.steps": 4, "train.checkpoint_every": 1000, "diffusion.prompt_dropout": 0.5,
              "data.latents": "true"}
    cache = tmp_path / "cache"
    train.main(small_config(tmp_path / "raw", small_shards, small_vae, **{**common, "data.latents": "false",
                                                                          "text.cache_dir": cache}))
    (folder,) = cache.iterdir()
    assert len(list(folder.glob("*.safetensors"))) > 4  # the captions of 4 batches and ""
    train.main(small_config(tmp_path / "plain", latent_shards, small_vae, **common, **{"text.cache_dir": "null"}))
    with monkeypatch.context() as m:
        m.setattr(CachedTextEncoder, "_load", lambda self: pytest.fail("the text encoder was loaded"))
        train.main(small_config(tmp_path / "cached", latent_shards, small_vae, **common, **{"text.cache_dir": cache}))
    plain, cached = losses(tmp_path / "plain"), losses(tmp_path / "cached")
    assert len(plain) == 4
    torch.testing.assert_close(torch.tensor(cached), torch.tensor(plain), rtol=1e-5, atol=1e-6)

    # `dit sample` of the run (its recorded text.cache_dir): a new prompt loads the encoder and is stored; sampled
    # again, it is read, and the image is the same
    import numpy as np
    from PIL import Image

    from dit.cli import main as dit

    args = ["sample", "--checkpoint", str(tmp_path / "cached"), "--prompt", "a purple heptagon", "--frames", "1",
            "--steps", "2"]
    dit([*args, "--out", str(tmp_path / "first.png")])
    assert prompt_file(folder, "a purple heptagon").is_file()
    monkeypatch.setattr(CachedTextEncoder, "_load", lambda self: pytest.fail("the text encoder was loaded"))
    dit([*args, "--out", str(tmp_path / "again.png")])
    first, again = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("first", "again"))
    assert first.std() > 0 and np.array_equal(first, again)


def test_a_mismatch_with_the_shards_stops_before_training(tmp_path, small_shards, small_vae, latent_shards):
    vae, text = load_vae(small_vae), build_text_encoder(small_config(tmp_path, small_shards, None).text)
    cfg = small_config(tmp_path, latent_shards, small_vae, **{"data.latents": "true"})
    assert check(cfg, vae, text) is True  # the VAE and text encoder that made them

    with pytest.raises(ConfigError, match=r"text.max_length 16 \(shards\) vs 8 \(config\)"):
        short = small_config(tmp_path, latent_shards, small_vae, **{"data.latents": "true", "text.max_length": 8})
        check(short, vae, build_text_encoder(short.text))
    with pytest.raises(ConfigError, match="text.encoder 'minilm' \\(shards\\) vs 'none'.*text dim 384"):
        none = small_config(tmp_path, latent_shards, small_vae, **{"data.latents": "true", "text.encoder": "none"})
        check(none, vae, build_text_encoder(none.text))
    other = tmp_path / "other_vae"
    torch.manual_seed(1)
    save_vae(CausalVAE(latent_channels=vae.latent_channels, base_channels=8), other)
    with pytest.raises(ConfigError, match="encoded by another VAE"):
        check(cfg, load_vae(other), text)
    with pytest.raises(ConfigError, match="holds no latent samples"):
        check(small_config(tmp_path, small_shards, small_vae, **{"data.latents": "true"}), vae, text)
    with pytest.raises(ConfigError, match="set data.latents=true"):
        check(small_config(tmp_path, latent_shards, small_vae), vae, text)
    with pytest.raises(ConfigError, match="encoded by another VAE"):  # train.main checks before any step
        train.main(small_config(tmp_path / "run", latent_shards, other, **{"data.latents": "true"}))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unmasked_text_states_are_stored_whole_and_train_like_the_raw_shards(tmp_path, small_shards, small_vae,
                                                                           monkeypatch):
    """text.padding=unmasked (CogVideoX, LTX: the encoder sees the padding, so the states there are not zeros):
    `dit encode` keeps all text.max_length states and the mask, so the latent run codes no caption either."""
    import webdataset as wds

    from data_pipelines.latents import load_npy

    common = {"train.steps": 4, "train.checkpoint_every": 1000, "diffusion.prompt_dropout": 0.5,
              "text.padding": "unmasked", "text.cache_dir": "null"}
    latents = tmp_path / "latents"
    cfg = small_config(latents, small_shards, small_vae, **{"text.padding": "unmasked"})
    assert encode_shards(small_shards, latents, cfg, batch_size=8)["samples"] == 64
    sample = next(iter(wds.WebDataset(str(sorted(latents.glob("*.tar"))[0]), shardshuffle=False)))
    text = build_text_encoder(cfg.text)
    states, mask = text.encode([sample["txt"].decode()])  # [1, L, D], [1, L]
    stored, stored_mask = load_npy(sample["text.npy"]), load_npy(sample["text_mask.npy"])
    assert stored.shape == (cfg.text.max_length, text.dim) and 0 < stored_mask.sum() < cfg.text.max_length
    torch.testing.assert_close(stored, states[0])
    assert torch.equal(stored_mask, mask[0].float()) and torch.count_nonzero(stored[~mask[0]]) > 0

    raw_run, latent_run = tmp_path / "raw", tmp_path / "latent"
    train.main(small_config(raw_run, small_shards, small_vae, **common))
    prompts: list[str] = []
    original = HFTextEncoder._encode_uncached
    monkeypatch.setattr(HFTextEncoder, "_encode_uncached", lambda self, p: (prompts.extend(p), original(self, p))[1])
    train.main(small_config(latent_run, str(latents), small_vae, **common, **{"data.latents": "true"}))
    assert set(prompts) == {""}
    torch.testing.assert_close(torch.tensor(losses(latent_run)), torch.tensor(losses(raw_run)), rtol=1e-5, atol=1e-6)

    masked = small_config(tmp_path, str(latents), small_vae, **{"data.latents": "true"})  # text.padding=mask
    with pytest.raises(ConfigError, match=r"text.padding 'unmasked' \(shards\) vs 'mask' \(config\)"):
        check_latent_shards(masked.data, vae_path=str(small_vae), latent_channels=load_vae(small_vae).latent_channels,
                            vae_encoder=encoder_digest(load_vae(small_vae)), text_encoder="minilm",
                            text_max_length=masked.text.max_length, text_dim=text.dim, text_name=text.name,
                            text_padding="mask")
