"""Qwen-Image trains through the same loop, on images: a tiny QwenImageTransformer2DModel folder on its tiny VAE with
its Qwen2.5-VL text encoder (text.encoder=qwenimage), from raw shards and from `dit encode` latent shards alike; its
checkpoint samples with `dit sample` (true CFG); a LoRA run's adapter loads into diffusers' own transformer with our
outputs and trains under DDP on 2 processes as on 1 (the last block's unused text outputs are frozen and no LoRA
target: DDP would wait for their gradients)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from family_runs import losses, raw_then_latent, run_config, write_config
from runs import MEDIA_FREE, dit_torchrun, dit_train

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_qwenimage import WIDTH, crop_start, save_tiny_qwenimage  # noqa: E402

from dit.export import list_checkpoints  # noqa: E402
from dit.models.lora import LORA_FILE  # noqa: E402

LENGTH = 16  # Qwen2.5-VL tokens after the template: more than most captions fill
SIZE = {"data.frames": 1, "data.height": 32, "data.width": 32}  # 4 x 4 latents, 2 x 2 packed tokens
LORA = {"train.lora.rank": 4, "train.lora.alpha": 8, "train.lr": 3e-2, "train.ema_decay": 0.0}
pytestmark = pytest.mark.skipif(MEDIA_FREE, reason="needs PyAV and the MiniLM package (not media-free mode)")


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> dict[str, Path]:
    from transformers import AutoTokenizer

    f = save_tiny_qwenimage(tmp_path_factory.mktemp("qwenimage"))
    f["config"] = write_config(
        f["root"] / "qwenimage.yaml", model={"family": "qwenimage", "pretrained": str(f["transformer"])},
        vae={"family": "qwenimage", "pretrained": str(f["vae"])},
        text={"encoder": "qwenimage", "path": str(f["qwen"]), "max_length": LENGTH,
              "crop_start": crop_start(AutoTokenizer.from_pretrained(f["root"] / "tokenizer"))},
        diffusion={"objective": "flow", "dynamic_shift": True, "flow_grid": "steps", "prompt_dropout": 0.5,
                   "timestep_sampling": "logit_normal"},
        sample={"sampler": "flow_euler", "steps": 2, "cfg": 4.0})
    return f


def config(f: dict[str, Path], run: Path, shards: str, **extra: object):
    return run_config(f["config"], run, shards, **SIZE, **extra)


def test_trains_from_raw_and_latent_shards_alike_and_samples(qwen: dict[str, Path], small_shards: str,
                                                             tmp_path: Path) -> None:
    raw_then_latent(qwen["config"], small_shards, tmp_path, **SIZE)
    raw = tmp_path / "raw"

    from PIL import Image

    from dit.cli import main as dit

    dit(["sample", "--checkpoint", str(raw), "--prompt", "a red circle", "--steps", "2", "--out",
         str(tmp_path / "image.png")])
    assert Image.open(tmp_path / "image.png").size == (32, 32)


def test_a_lora_adapter_loads_into_diffusers_and_trains_under_ddp(qwen: dict[str, Path], small_shards: str,
                                                                 tmp_path: Path) -> None:
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

    from dit.pipeline import load_pipeline

    config_file = qwen["config"]
    steps = {"train.steps": 3, "train.checkpoint_every": 3, "train.lr_schedule": "constant", **SIZE, **LORA}
    one = dit_train(tmp_path / "one", small_shards, None, config=config_file, **{**steps, "train.batch_size": 4})
    assert one.returncode == 0, one.stderr[-3000:]
    two = dit_torchrun(2, tmp_path / "two", small_shards, None, config=config_file,
                       **{**steps, "train.batch_size": 2, "train.parity_batch": True, "train.strategy": "ddp"})
    assert two.returncode == 0, two.stderr[-3000:]
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)

    run = tmp_path / "one"
    ckpt = list_checkpoints(run)[-1]
    ours = load_pipeline(run)  # base + adapter, as `dit sample --checkpoint RUN` samples
    g = torch.Generator().manual_seed(0)
    x, sigma = torch.randn(2, 4, 1, 4, 6, generator=g), torch.tensor([0.8, 0.25])
    text = torch.randn(2, 7, WIDTH, generator=g)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False

    def call(model):
        out = model(hidden_states=QwenImagePipeline._pack_latents(x[:, :, 0], 2, 4, 4, 6), timestep=sigma,
                    encoder_hidden_states=text, encoder_hidden_states_mask=mask.long(),
                    img_shapes=[[(1, 2, 3)]] * 2, return_dict=False)[0]
        return QwenImagePipeline._unpack_latents(out, 32, 48, 8)

    with torch.no_grad():
        base_out = call(QwenImageTransformer2DModel.from_pretrained(qwen["transformer"]).eval())
        adapted = QwenImageTransformer2DModel.from_pretrained(qwen["transformer"]).eval()
        adapted.load_lora_adapter(str(ckpt), weight_name=LORA_FILE, prefix="transformer")
        theirs = call(adapted)
        assert (theirs - base_out).abs().max() > 1e-3  # the adapter changes the output
        torch.testing.assert_close(ours.model(x, sigma * 1000, text, mask), theirs, atol=1e-4, rtol=0)
