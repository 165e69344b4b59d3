"""`dit to-diffusers`: a family checkpoint of ours as a diffusers model folder that the family's class loads with
the same weights (and outputs), in fp32 or cast; our own DiT, an existing --out and a damaged checkpoint are refused
with one line. (A LoRA run merged on the way: tests/training/test_flux_training.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_families import inputs

from dit.cli import main as dit
from dit.config import ModelConfig, load_config
from dit.export import write_export
from dit.models.families import build_denoiser


@pytest.fixture(scope="module")
def vae(tmp_path_factory) -> str:
    from tiny_vaes import save_tiny_vae

    folder = tmp_path_factory.mktemp("vae") / "vae"
    save_tiny_vae("wan", folder)
    return str(folder)


def export(tmp_path: Path, model: torch.nn.Module, cfg) -> Path:
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000001"
    ckpt.mkdir(parents=True)
    write_export(ckpt, weights=model.state_dict(), config={"dit": model.config, "experiment": cfg.to_dict()},
                 vae=cfg.vae)
    return tmp_path / "run"


def test_a_wan_checkpoint_becomes_a_diffusers_folder(tiny_folder, vae, tmp_path, capsys):
    from diffusers import WanTransformer3DModel

    cfg = load_config(None, ["model.family=wan", f"model.pretrained={tiny_folder('wan')}", "diffusion.objective=flow",
                             "text.encoder=none", "vae.family=wan", f"vae.pretrained={vae}"])
    ours = build_denoiser(cfg.model, in_channels=4, text_dim=16).eval()
    run = export(tmp_path, ours, cfg)
    dit(["to-diffusers", str(run), "--out", str(tmp_path / "wan")])
    assert capsys.readouterr().out.strip() == str(tmp_path / "wan")
    saved = json.loads((tmp_path / "wan" / "config.json").read_text())
    assert saved["_class_name"] == "WanTransformer3DModel" and (tmp_path / "wan" /
                                                               "diffusion_pytorch_model.safetensors").is_file()
    theirs = WanTransformer3DModel.from_pretrained(tmp_path / "wan").eval()
    x, t, text, mask = inputs()
    with torch.no_grad():
        want = ours(x, t, text, mask)
        got = theirs(hidden_states=x, timestep=t, encoder_hidden_states=text * mask[..., None], return_dict=False)[0]
    torch.testing.assert_close(got, want, atol=0, rtol=0)

    dit(["to-diffusers", str(run), "--out", str(tmp_path / "wan-bf16"), "--dtype", "bf16"])
    from safetensors.torch import load_file

    half = load_file(tmp_path / "wan-bf16" / "diffusion_pytorch_model.safetensors")  # (as the releases store it)
    assert half.keys() == theirs.state_dict().keys() and {v.dtype for v in half.values()} == {torch.bfloat16}
    for k, v in half.items():
        assert torch.equal(v, theirs.state_dict()[k].to(torch.bfloat16)), k


def test_what_cannot_be_exported_is_refused(vae, tmp_path, capsys):
    cfg = load_config(None, ["text.encoder=none", "vae.family=wan", f"vae.pretrained={vae}"])
    run = export(tmp_path / "ours", build_denoiser(ModelConfig(), in_channels=16, text_dim=8), cfg)
    with pytest.raises(SystemExit) as e:
        dit(["to-diffusers", str(run), "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and "no diffusers class" in capsys.readouterr().err and not (tmp_path / "x").exists()
    (tmp_path / "taken").mkdir()
    with pytest.raises(SystemExit):
        dit(["to-diffusers", str(run), "--out", str(tmp_path / "taken")])
    assert "exists; give a new directory" in capsys.readouterr().err
