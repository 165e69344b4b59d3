"""HunyuanVideo 1.5 trains through the same loop: a tiny HunyuanVideo15Transformer3DModel folder on its tiny VAE
with its two text encoders (text.encoder=hunyuan15), from raw shards and from `dit encode` latent shards alike (the
header row stored with the text's real tokens); its checkpoint samples with `dit
sample`; a LoRA run's adapter loads into diffusers' own transformer with our outputs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from family_runs import first_latent_sample, raw_then_latent, run_config, write_config
from runs import MEDIA_FREE

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_hunyuan15 import GLYPH_WIDTH, WIDTH, crop_start, save_tiny_hunyuan15  # noqa: E402

from dit.export import list_checkpoints  # noqa: E402
from dit.models.lora import LORA_FILE  # noqa: E402
from dit.training import train  # noqa: E402

LENGTH = 24  # Qwen2.5-VL tokens after the chat's opening: more than the captions fill
SIZE = {"data.frames": 5, "data.height": 32, "data.width": 32}  # 2 x 2 x 2 latents (16x in space), patch 1
pytestmark = pytest.mark.skipif(MEDIA_FREE, reason="needs PyAV and the MiniLM package (not media-free mode)")


@pytest.fixture(scope="module")
def hv15(tmp_path_factory) -> dict[str, Path]:
    from transformers import AutoTokenizer

    f = save_tiny_hunyuan15(tmp_path_factory.mktemp("hunyuan15"))
    f["config"] = write_config(
        f["root"] / "hunyuan15.yaml", model={"family": "hunyuan15", "pretrained": str(f["transformer"])},
        vae={"family": "hunyuan15", "pretrained": str(f["vae"])},
        text={"encoder": "hunyuan15", "path": str(f["qwen"]), "path_2": str(f["byt5"]), "max_length": LENGTH,
              "crop_start": crop_start(AutoTokenizer.from_pretrained(f["root"] / "tokenizer"))},
        diffusion={"objective": "flow", "shift": 5.0, "flow_grid": "steps", "prompt_dropout": 0.5},
        sample={"sampler": "flow_euler", "steps": 2, "cfg": 6.0})
    return f


def config(f: dict[str, Path], run: Path, shards: str, **extra: object):
    return run_config(f["config"], run, shards, **SIZE, **extra)


def test_trains_from_raw_and_latent_shards_alike_and_samples(hv15: dict[str, Path], small_shards: str,
                                                             tmp_path: Path) -> None:
    def header_then_real_tokens(latents: Path) -> None:
        text = first_latent_sample(latents)["text"]
        assert 2 < text.shape[0] < 1 + LENGTH and text.shape[1] == WIDTH and text[0, 1] == GLYPH_WIDTH

    raw_then_latent(hv15["config"], small_shards, tmp_path, check_shards=header_then_real_tokens, **SIZE)
    raw = tmp_path / "raw"

    from PIL import Image

    from dit.cli import main as dit

    dit(["sample", "--checkpoint", str(raw), "--prompt", 'a sign that reads "OPEN"', "--steps", "2", "--out",
         str(tmp_path / "clip.gif")])
    gif = Image.open(tmp_path / "clip.gif")
    assert (gif.n_frames, gif.size) == (5, (32, 32))


def test_an_image_to_video_model_trains_and_samples_from_an_image(hv15: dict[str, Path], small_shards: str,
                                                                  tmp_path: Path) -> None:
    """model.condition=first_frame with its SigLIP (model.image_encoder): each clip's first frame's latent and mask
    beside the noisy latents and its SigLIP states beside the text, from raw shards and from latent shards (which
    store the SigLIP states) alike; latent shards without them are refused; `dit sample --image` continues a given
    frame (another image, other frames)."""
    import json

    from PIL import Image

    from dit.cli import main as dit
    from dit.config import ConfigError

    i2v = {"model.condition": "first_frame", "model.condition_prob": 1.0, "model.image_encoder": str(hv15["siglip"])}
    siglip = json.loads((hv15["siglip"] / "config.json").read_text())

    def siglip_states_stored(latents: Path) -> None:
        sample = first_latent_sample(latents)
        assert "image_code" not in sample  # (the condition is the clip's own latent frame 0)
        n = (siglip["image_size"] // siglip["patch_size"]) ** 2
        assert sample["image_states"].shape == (n, siglip["hidden_size"])

    ckpt, _ = raw_then_latent(hv15["config"], small_shards, tmp_path, check_shards=siglip_states_stored, **SIZE,
                              **i2v)
    run = tmp_path / "raw"
    assert json.loads((ckpt / "config.json").read_text())["dit"]["condition_channels"] == 5
    from dit.encode import encode_shards

    t2v_latents = tmp_path / "t2v_latents"  # (shards encoded for the text-to-video model)
    encode_shards(small_shards, t2v_latents, config(hv15, tmp_path / "enc_t2v", small_shards), batch_size=8)
    with pytest.raises(ConfigError, match=r"holds no image-to-video inputs \(KEY.image_states.npy\)"):
        train.main(config(hv15, tmp_path / "refused", str(t2v_latents), **i2v, **{"data.latents": "true"}))
    gen = torch.Generator().manual_seed(2)
    for name in ("a", "b"):
        pixels = torch.randint(0, 256, (32, 32, 3), generator=gen, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(tmp_path / f"{name}.png")
        dit(["sample", "--checkpoint", str(run), "--prompt", "a red circle", "--steps", "2", "--image",
             str(tmp_path / f"{name}.png"), "--out", str(tmp_path / f"{name}.gif")])
    a, b = (Image.open(tmp_path / f"{n}.gif") for n in ("a", "b"))
    assert a.n_frames == 5 and a.tobytes() != b.tobytes()


@torch.no_grad()
def test_a_lora_adapter_loads_into_diffusers(hv15: dict[str, Path], small_shards: str, tmp_path: Path) -> None:
    from diffusers import HunyuanVideo15Transformer3DModel

    from dit.pipeline import load_pipeline

    run = tmp_path / "lora"
    with torch.enable_grad():
        train.main(config(hv15, run, small_shards, **{"train.steps": 3, "train.checkpoint_every": 3,
                                                      "train.lr": 3e-2, "train.ema_decay": 0.0,
                                                      "train.lora.rank": 4, "train.lora.alpha": 8}))
    ours = load_pipeline(run)  # base + adapter, as `dit sample --checkpoint RUN` samples
    frozen = [n for n, p in ours.model.named_parameters() if "transformer_blocks.1.ff_context" in n]
    assert frozen and not any("lora" in n for n in frozen)  # the last block's unused text MLP: no LoRA target
    text, mask = ours.text.encode(['a neon "Bar" sign', "a red circle"])
    g = torch.Generator().manual_seed(0)
    x, sigma = torch.randn(2, 4, 2, 2, 2, generator=g), torch.tensor([0.8, 0.25])
    from dit.models.text_hunyuan15 import split_glyph

    qwen, qwen_mask, glyph, glyph_mask = split_glyph(text, mask, GLYPH_WIDTH)

    def call(model):
        return model(hidden_states=torch.cat([x, torch.zeros_like(x), torch.zeros_like(x[:, :1])], 1),
                     timestep=sigma * 1000, encoder_hidden_states=qwen, encoder_attention_mask=qwen_mask.float(),
                     encoder_hidden_states_2=glyph, encoder_attention_mask_2=glyph_mask.float(),
                     image_embeds=torch.zeros(2, 729, 8), return_dict=False)[0]

    base_out = call(HunyuanVideo15Transformer3DModel.from_pretrained(hv15["transformer"]).eval())
    adapted = HunyuanVideo15Transformer3DModel.from_pretrained(hv15["transformer"]).eval()
    adapted.load_lora_adapter(str(list_checkpoints(run)[-1]), weight_name=LORA_FILE, prefix="transformer")
    theirs = call(adapted)
    assert (theirs - base_out).abs().max() > 1e-3  # the adapter changes the output
    torch.testing.assert_close(ours.model(x, sigma * 1000, text, mask), theirs, atol=1e-4, rtol=0)
