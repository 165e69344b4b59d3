"""A tiny random FLUX.1-dev download: transformer/, vae/, text_encoder/ (a CLIPTextModel) with tokenizer/,
text_encoder_2/ (a T5EncoderModel) with tokenizer_2/. The tokenizers are the packaged MiniLM one (no hub here); the
CLIP one says 77 tokens, as FLUX.1's (FluxPipeline pads CLIP prompts to its tokenizer's model_max_length)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

from dit.models.text import minilm_path

sys.path.insert(0, str(Path(__file__).parent / "models" / "families"))
from tiny_families import tiny_transformer  # noqa: E402
from tiny_vaes import save_tiny_vae  # noqa: E402

WIDTH = 16  # the T5 states' width (joint_attention_dim)
POOLED = 8  # CLIP's pooled width (pooled_projection_dim)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def save_tiny_flux(root: Path, seed: int = 0, **transformer: object) -> dict[str, Path]:
    """The download under root; returns its folders by name (transformer, vae, t5, clip, root)."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tiny_transformer("flux", seed, **transformer).save_pretrained(root / "transformer")
    save_tiny_vae("flux", root / "vae", seed=seed + 1)
    torch.manual_seed(seed)
    clip = CLIPTextConfig(vocab_size=30522, hidden_size=POOLED, intermediate_size=16, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=77, bos_token_id=101, eos_token_id=102,
                          pad_token_id=0)  # (MiniLM's [CLS], [SEP]: CLIP pools at the first end token)
    CLIPTextModel(clip).eval().save_pretrained(root / "text_encoder")
    t5 = T5Config(vocab_size=30522, d_model=WIDTH, d_kv=8, d_ff=32, num_layers=2, num_heads=2, pad_token_id=0)
    T5EncoderModel(t5).eval().save_pretrained(root / "text_encoder_2")
    for name, length in (("tokenizer", 77), ("tokenizer_2", 512)):
        (root / name).mkdir(exist_ok=True)
        for f in TOKENIZER_FILES:
            shutil.copy(minilm_path() / f, root / name)
        config = json.loads((root / name / "tokenizer_config.json").read_text())
        (root / name / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": length}))
    return dict(transformer=root / "transformer", vae=root / "vae", t5=root / "text_encoder_2",
                clip=root / "text_encoder", root=root)
