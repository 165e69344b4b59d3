"""Bad folders and mismatched parts fail before any work, with one message that names the path and the fix."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tiny_families import TINY

from dit.config import ConfigError, ModelConfig, load_config
from dit.models.families import build_denoiser, check_fit, denoiser_from_config


def test_missing_folder(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=rf"model.pretrained: '{missing}' does not exist.*transformer"):
        ModelConfig(family="wan", pretrained=str(missing))


def test_folder_without_config_json(tmp_path):
    with pytest.raises(ConfigError, match=r"is not a diffusers model folder \(no config.json\).*transformer/"):
        ModelConfig(family="wan", pretrained=str(tmp_path))


def test_pipeline_root_points_to_its_transformer(tmp_path, tiny_folder):
    """A whole diffusers pipeline folder gets the hint to use its transformer/ subfolder."""
    root = tmp_path / "Wan-Diffusers"
    shutil.copytree(tiny_folder("wan"), root / "transformer")
    (root / "model_index.json").write_text("{}")
    with pytest.raises(ConfigError, match=rf"use model.pretrained={root / 'transformer'}"):
        ModelConfig(family="wan", pretrained=str(root))
    assert ModelConfig(family="wan", pretrained=str(root / "transformer")).patch_size == [1, 2, 2]


def test_wrong_class_names_the_right_family(tiny_folder):
    with pytest.raises(ConfigError, match=r"holds a LTXVideoTransformer3DModel, but model.family=wan needs a "
                                          r"WanTransformer3DModel; set model.family=ltx"):
        ModelConfig(family="wan", pretrained=str(tiny_folder("ltx")))


def test_folder_without_safetensors(tmp_path, tiny_folder):
    folder = tmp_path / "transformer"
    folder.mkdir()
    shutil.copy(tiny_folder("wan") / "config.json", folder / "config.json")
    with pytest.raises(ConfigError, match=r"has no \*.safetensors weights"):
        ModelConfig(family="wan", pretrained=str(folder))


@pytest.mark.parametrize("family, text_key", [("wan", "text_dim"), ("ltx", "caption_channels"),
                                              ("cogvideox", "text_embed_dim")])
def test_latent_channels_and_text_width_mismatch(family, text_key, tiny_folder):
    cfg = ModelConfig(family=family, pretrained=str(tiny_folder(family)))
    with pytest.raises(ConfigError, match=rf"model.pretrained '{tiny_folder(family)}': the {family} transformer "
                                          r"takes 4 latent channels but the VAE gives 16; use the VAE"):
        build_denoiser(cfg, in_channels=16, text_dim=16)
    with pytest.raises(ConfigError, match=rf"takes text states of width 16 \({text_key}\) but the text encoder "
                                          r"gives 384; use the text encoder it was trained with"):
        build_denoiser(cfg, in_channels=4, text_dim=384)


def test_check_fit_needs_only_the_configs(tiny_folder, tmp_path):
    """check_fit reads config.json alone: the weights may be absent (it runs before anything loads)."""
    folder = tmp_path / "transformer"
    folder.mkdir()
    shutil.copy(tiny_folder("wan") / "config.json", folder / "config.json")
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"")  # never read
    cfg = ModelConfig(family="wan", pretrained=str(folder))
    check_fit(cfg, in_channels=4, text_dim=16)
    with pytest.raises(ConfigError, match=r"takes 4 latent channels but the VAE gives 48"):
        check_fit(cfg, in_channels=48, text_dim=16)
    check_fit(ModelConfig(), in_channels=48, text_dim=3)  # our DiT takes any


def test_explicit_family_config_channels_must_match_the_vae():
    sizes = dict(TINY["wan"])
    with pytest.raises(ConfigError, match=r"model.family_config: the wan transformer takes 4 latent channels but "
                                          r"the VAE gives 16"):
        build_denoiser(ModelConfig(family="wan", family_config=sizes), in_channels=16, text_dim=16)


@pytest.mark.parametrize("overrides, match", [
    (["model.family=sdxl"], r"model.family: unknown family 'sdxl'; choose one of dit, wan, cogvideox, ltx"),
    (["model.pretrained=/x"], r"model.pretrained: needs model.family=wan, cogvideox, ltx, hunyuan, hunyuan15, flux, "
                              r"sd3, zimage or qwenimage"),
    (["model.family=wan", "model.family_config.num_layerz=2"], r"\['num_layerz'\] are not WanTransformer3DModel "
                                                                r"arguments; valid: .*num_layers"),
    (["model.family=wan", "model.hidden_size=64"], r"model.hidden_size: sizes our DiT only"),
    (["model.family=wan", "model.fused_qkv=true"], r"model.fused_qkv: is implemented for our DiT"),
    (["model.family=ltx", "model.patch_size=[1,2,2]"], r"model.patch_size: \[1, 2, 2\] differs from the ltx "
                                                        r"transformer's patch \[1, 1, 1\]"),
])
def test_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_family_config_with_pretrained_must_agree_with_the_folder(tiny_folder):
    """A config file may record the model's sizes; the folder must then hold that model."""
    folder = str(tiny_folder("wan"))
    with pytest.raises(ConfigError, match=r"model.family_config: num_layers=1 but the folder has 2 .*another model"):
        ModelConfig(family="wan", pretrained=folder, family_config={"num_layers": 1, "ffn_dim": 32})
    assert ModelConfig(family="wan", pretrained=folder, family_config={"num_layers": 2, "patch_size": [1, 2, 2]})


def test_family_patch_drives_the_experiment_config():
    """Config.patch_size() (buckets, sizes) is the family's patch, filled in by ModelConfig."""
    cfg = load_config(None, ["model.family=ltx", "diffusion.objective=flow", "model.family_config.num_layers=1",
                             "data.height=32", "data.width=32"])
    assert cfg.model.patch_size == [1, 1, 1] and cfg.patch_size() == (1, 1, 1)


def test_unknown_family_in_a_checkpoint_config():
    with pytest.raises(ConfigError, match=r"unknown model family 'mochi'"):
        denoiser_from_config({"family": "mochi"})


def test_our_dit_round_trips_through_denoiser_from_config():
    from dit.models.dit import build_dit

    dit = build_dit(ModelConfig(depth=1), in_channels=4, text_dim=16)
    config = json.loads(json.dumps(dit.config))
    rebuilt = denoiser_from_config(config, dict(dit.state_dict()))
    assert type(rebuilt) is type(dit)
    for k, v in dit.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[k], v)


def test_cli_prints_one_error_line(tmp_path, capsys):
    """`dit plan` (any command) with a bad folder: exit 2, one `error:` line naming the path and the fix."""
    from dit.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["plan", "--gpus", "1", "--gpu-memory", "80", "model.family=wan", f"model.pretrained={tmp_path}"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: model.pretrained: '{tmp_path}' is not a diffusers model folder (no config.json); point it at the "
        "transformer/ subfolder of a diffusers wan pipeline"]


def test_train_refuses_a_text_encoder_of_another_width_before_loading_anything(tiny_folder, tmp_path):
    """The packaged MiniLM (384 wide) cannot drive the tiny Wan (16): `dit train` says so from the configs, before
    the VAE, the text encoder or the data are touched (the VAE folder holds no weights at all here)."""
    from tiny_vaes import TINY as TINY_VAES

    from dit.training import train

    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLWan", **TINY_VAES["wan"], "z_dim": 4}))
    (vae / "diffusion_pytorch_model.safetensors").write_bytes(b"")  # never read
    cfg = load_config(None, ["model.family=wan", "diffusion.objective=flow", f"model.pretrained={tiny_folder('wan')}",
                             "vae.family=wan", f"vae.pretrained={vae}", "text.encoder=minilm", "data.frames=9",
                             "data.height=32", "data.width=48", f"data.shards={tmp_path}",
                             f"train.output_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=r"takes text states of width 16 \(text_dim\) but the text encoder gives 384"):
        train.main(cfg)
    assert not (tmp_path / "run").exists()


def test_image_to_video_needs_an_i2v_transformer_and_the_condition(tmp_path, tiny_folder):
    """model.condition=first_frame and an image-to-video CogVideoX folder (in_channels 2C) go together, checked
    from the configs before any weights load; the adapter refuses a condition a text-to-video model cannot take."""
    from tiny_families import tiny_transformer

    tiny_transformer("cogvideox", in_channels=8, out_channels=4).save_pretrained(tmp_path / "i2v")
    t2v = ModelConfig(family="cogvideox", pretrained=str(tiny_folder("cogvideox")), condition="first_frame")
    with pytest.raises(ConfigError, match=r"a text-to-video cogvideox transformer \(in_channels 4 = the VAE's latent "
                                          r"channels\) cannot take model.condition=first_frame; use an image-to-video"):
        check_fit(t2v, 4, 16)
    i2v = ModelConfig(family="cogvideox", pretrained=str(tmp_path / "i2v"))
    with pytest.raises(ConfigError, match=r"an image-to-video cogvideox transformer \(in_channels 8 = 4 latent \+ 4 "
                                          r"image-condition channels\): set model.condition=first_frame"):
        check_fit(i2v, 4, 16)
    with pytest.raises(ConfigError, match=r"takes 4 latent channels \(\+ 4 of an image condition\) but the VAE "
                                          r"gives 16"):
        check_fit(ModelConfig(family="cogvideox", pretrained=str(tmp_path / "i2v"), condition="first_frame"), 16, 16)
    model = build_denoiser(ModelConfig(family="cogvideox", pretrained=str(tmp_path / "i2v"), condition="first_frame"),
                           in_channels=4, text_dim=16)
    assert (model.in_channels, model.condition_channels, model.config["condition_channels"]) == (4, 4, 4)
    x, t, text = torch.randn(1, 4, 3, 4, 6), torch.tensor([500]), torch.randn(1, 6, 16)
    mask = torch.ones(1, 6, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"image condition of shape \(1, 5, 3, 4, 6\) does not fit latents"):
        model(x, t, text, mask, condition=torch.zeros(1, 5, 3, 4, 6))
    with torch.no_grad():  # no condition means zeros, and the condition reaches the output
        plain = model(x, t, text, mask)
        assert torch.equal(plain, model(x, t, text, mask, condition=torch.zeros(1, 4, 3, 4, 6)))
        assert (model(x, t, text, mask, condition=torch.randn(1, 4, 3, 4, 6)) - plain).abs().max() > 1e-3
    text_only = build_denoiser(ModelConfig(family="cogvideox", pretrained=str(tiny_folder("cogvideox"))),
                               in_channels=4, text_dim=16)
    with pytest.raises(ValueError, match="takes no image condition"):
        text_only(x, t, text, mask, condition=torch.zeros(1, 4, 3, 4, 6))
    # random weights (model.family_config): first_frame builds the I2V layout from the VAE's channels
    sizes = {k: v for k, v in TINY["cogvideox"].items() if k not in ("in_channels", "out_channels")}
    made = build_denoiser(ModelConfig(family="cogvideox", condition="first_frame", family_config=sizes),
                          in_channels=4, text_dim=16)
    assert (made.transformer.config.in_channels, made.transformer.config.out_channels) == (8, 4)
    assert (made.in_channels, made.condition_channels) == (4, 4)
    plain = build_denoiser(ModelConfig(family="cogvideox", family_config=sizes), in_channels=4, text_dim=16)
    assert (plain.transformer.config.in_channels, plain.condition_channels) == (4, 0)


def test_wan_first_frame_takes_a_text_to_video_folder_and_wan21_i2v_needs_it(tmp_path, tiny_folder):
    """Wan's image-to-video replaces the first latent frame (Wan 2.2 TI2V), so a text-to-video folder takes
    model.condition=first_frame (and is recorded so); a Wan 2.1 I2V folder (CLIP image tokens) needs it set."""
    from tiny_families import tiny_transformer

    model = build_denoiser(ModelConfig(family="wan", pretrained=str(tiny_folder("wan")), condition="first_frame"),
                           in_channels=4, text_dim=16)
    assert model.first_frame and model.config["first_frame"] and model.condition_channels == 5
    assert denoiser_from_config(model.config, model.state_dict()).first_frame
    old = {k: v for k, v in model.config.items() if k not in ("first_frame", "condition_channels")}
    assert not denoiser_from_config(old, model.state_dict()).first_frame  # a checkpoint from before the option
    x, t, text = torch.randn(1, 4, 3, 4, 6), torch.tensor([500.0]), torch.randn(1, 6, 16)
    mask = torch.ones(1, 6, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"does not fit latents .*\(4 latent channels and the mask\)"):
        model(x, t, text, mask, condition=torch.zeros(1, 4, 3, 4, 6))
    with pytest.raises(ValueError, match="takes no image condition"):
        build_denoiser(ModelConfig(family="wan", pretrained=str(tiny_folder("wan"))), in_channels=4,
                       text_dim=16)(x, t, text, mask, condition=torch.zeros(1, 5, 3, 4, 6))
    tiny_transformer("wan", in_channels=12, image_dim=8).save_pretrained(tmp_path / "wan21_i2v")
    with pytest.raises(ConfigError, match=r"an image-to-video wan transformer \(in_channels 12 = 4 latent \+ 8 "
                                          r"image-condition channels\): set model.condition=first_frame"):
        check_fit(ModelConfig(family="wan", pretrained=str(tmp_path / "wan21_i2v")), 4, 16)
