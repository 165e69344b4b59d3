"""`load_pipeline` rebuilds a family denoiser from the checkpoint alone (config.json "dit" + model.safetensors):
the diffusers folder it was fine-tuned from is not needed any more."""

from __future__ import annotations

import shutil

import torch
from tiny_families import inputs, tiny_transformer

from dit.config import load_config
from dit.export import write_export
from dit.models.families import build_denoiser
from dit.models.families.wan import WanDenoiser
from dit.models.vae import CausalVAE, save_vae
from dit.pipeline import load_pipeline


def test_family_checkpoint_loads_without_its_source_folder(tmp_path):
    folder = tmp_path / "Wan-Diffusers" / "transformer"
    tiny_transformer("wan", text_dim=8).save_pretrained(folder)  # width 8: text.encoder=none
    cfg = load_config(None, ["model.family=wan", "diffusion.objective=flow", f"model.pretrained={folder}",
                             "text.encoder=none",
                             "data.frames=9", "data.height=32", "data.width=48"])
    model = build_denoiser(cfg.model, in_channels=4, text_dim=8)
    with torch.no_grad():
        for p in model.parameters():  # "fine-tuned": no longer the folder's weights
            p.mul_(1.5)
    torch.manual_seed(0)
    save_vae(CausalVAE(latent_channels=4, base_channels=8, channel_mults=(1, 1, 1, 1)), tmp_path / "vae")
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000001"
    ckpt.mkdir(parents=True)
    write_export(ckpt, weights=model.state_dict(), config={"dit": model.config, "experiment": cfg.to_dict()},
                 vae_dir=tmp_path / "vae")
    shutil.rmtree(folder.parent)

    pipe = load_pipeline(tmp_path / "run")
    assert isinstance(pipe.model, WanDenoiser) and pipe.model.patch == (1, 2, 2)
    x, t, _, mask = inputs()
    text = torch.randn(2, 6, 8)
    with torch.no_grad():
        torch.testing.assert_close(pipe.model(x, t, text, mask), model.eval()(x, t, text, mask), atol=0, rtol=0)
