"""Z-Image trains through the same loop, on images: a tiny ZImageTransformer2DModel folder on a tiny FLUX.1-kind
image VAE with its Qwen3 text encoder (text.encoder=zimage), from raw shards (each clip's first frame) and from `dit
encode` latent shards alike (each prompt's real tokens stored); its checkpoint samples with `dit sample`; a LoRA
run's adapter loads into diffusers' own transformer with our outputs, and `dit to-diffusers` merges it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from family_runs import raw_then_latent, run_config, write_config
from runs import MEDIA_FREE

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_zimage import WIDTH, save_tiny_zimage  # noqa: E402

from dit.export import list_checkpoints  # noqa: E402
from dit.models.lora import LORA_FILE  # noqa: E402
from dit.training import train  # noqa: E402

LENGTH = 40  # Qwen3 tokens with the chat template: more than the captions fill
SIZE = ["data.frames=1", "data.height=32", "data.width=32"]  # 4 x 4 latents, 2 x 2 patches
pytestmark = pytest.mark.skipif(MEDIA_FREE, reason="needs PyAV and the MiniLM package (not media-free mode)")


@pytest.fixture(scope="module")
def zimage(tmp_path_factory) -> dict[str, Path]:
    f = save_tiny_zimage(tmp_path_factory.mktemp("zimage"))
    f["config"] = write_config(
        f["root"] / "zimage.yaml", model={"family": "zimage", "pretrained": str(f["transformer"])},
        vae={"family": "flux", "pretrained": str(f["vae"])},
        text={"encoder": "zimage", "path": str(f["qwen"]), "max_length": LENGTH},
        diffusion={"objective": "flow", "shift": 3.0, "flow_grid": "steps", "prompt_dropout": 0.5,
                   "timestep_sampling": "logit_normal"},
        sample={"sampler": "flow_euler", "steps": 2, "cfg": 1.0})
    return f


def config(f: dict[str, Path], run: Path, shards: str, **extra: object):
    return run_config(f["config"], run, shards, *SIZE, **extra)


def test_trains_from_raw_and_latent_shards_alike_and_samples(zimage: dict[str, Path], small_shards: str,
                                                             tmp_path: Path) -> None:
    raw_then_latent(zimage["config"], small_shards, tmp_path, *SIZE)
    raw = tmp_path / "raw"

    from PIL import Image

    from dit.cli import main as dit

    dit(["sample", "--checkpoint", str(raw), "--prompt", "a red circle", "--steps", "2", "--cfg", "3", "--out",
         str(tmp_path / "image.png")])
    assert Image.open(tmp_path / "image.png").size == (32, 32)


def test_a_lora_adapter_loads_into_diffusers(zimage: dict[str, Path], small_shards: str, tmp_path: Path) -> None:
    from diffusers import ZImageTransformer2DModel

    from dit.diffusers_export import export_diffusers
    from dit.pipeline import load_pipeline

    run = tmp_path / "lora"
    train.main(config(zimage, run, small_shards, **{"train.steps": 3, "train.checkpoint_every": 3, "train.lr": 3e-2,
                                                    "train.ema_decay": 0.0, "train.lora.rank": 4,
                                                    "train.lora.alpha": 8}))
    ckpt = list_checkpoints(run)[-1]
    ours = load_pipeline(run)  # base + adapter, as `dit sample --checkpoint RUN` samples
    g = torch.Generator().manual_seed(0)
    x, sigma = torch.randn(2, 4, 1, 4, 6, generator=g), torch.tensor([0.8, 0.25])
    text = torch.randn(2, 7, WIDTH, generator=g)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False

    def call(model):  # (the time as the pipeline computes it, from the scheduler's sigma x 1000)
        out = model(list(x.unbind(0)), (1000 - sigma * 1000) / 1000, [text[0], text[1, :4]], return_dict=False)[0]
        return -torch.stack(out)

    with torch.no_grad():
        base_out = call(ZImageTransformer2DModel.from_pretrained(zimage["transformer"]).eval())
        adapted = ZImageTransformer2DModel.from_pretrained(zimage["transformer"]).eval()
        adapted.load_lora_adapter(str(ckpt), weight_name=LORA_FILE, prefix="transformer")
        theirs = call(adapted)
        assert (theirs - base_out).abs().max() > 1e-3  # the adapter changes the output
        torch.testing.assert_close(ours.model(x, sigma * 1000, text, mask), theirs, atol=1e-4, rtol=0)
        merged = ZImageTransformer2DModel.from_pretrained(export_diffusers(run, tmp_path / "merged")).eval()
        torch.testing.assert_close(call(merged), theirs, atol=1e-4, rtol=0)
