"""A tiny random Stable Diffusion 3.5 download: transformer/, vae/, text_encoder/ (CLIP-L) with tokenizer/,
text_encoder_2/ (CLIP-G) with tokenizer_2/, text_encoder_3/ (T5) with tokenizer_3/: CLIPTextModelWithProjection and
T5EncoderModel, tokenizers the packaged MiniLM one (no hub here), the CLIP ones saying 77 tokens as SD3's."""

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
CLIP = 8  # each CLIP's hidden and projection width: side by side 16 (pooled_projection_dim)
POOLED = 2 * CLIP
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def save_tiny_sd3(root: Path, seed: int = 0, **transformer: object) -> dict[str, Path]:
    """The download under root; returns its folders by name (transformer, vae, t5, clip_l, clip_g, root)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    tiny_transformer("sd3", seed, **transformer).save_pretrained(root / "transformer")
    save_tiny_vae("sd3", root / "vae", seed=seed + 1)
    torch.manual_seed(seed)
    for name, layers in (("text_encoder", 2), ("text_encoder_2", 3)):
        clip = CLIPTextConfig(vocab_size=30522, hidden_size=CLIP, intermediate_size=16, num_hidden_layers=layers,
                              num_attention_heads=2, max_position_embeddings=77, projection_dim=CLIP,
                              bos_token_id=101, eos_token_id=102, pad_token_id=0)  # (MiniLM's [CLS], [SEP])
        CLIPTextModelWithProjection(clip).eval().save_pretrained(root / name)
    t5 = T5Config(vocab_size=30522, d_model=WIDTH, d_kv=8, d_ff=32, num_layers=2, num_heads=2, pad_token_id=0)
    T5EncoderModel(t5).eval().save_pretrained(root / "text_encoder_3")
    for name, length in (("tokenizer", 77), ("tokenizer_2", 77), ("tokenizer_3", 512)):
        (root / name).mkdir(exist_ok=True)
        for f in TOKENIZER_FILES:
            shutil.copy(minilm_path() / f, root / name)
        config = json.loads((root / name / "tokenizer_config.json").read_text())
        (root / name / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": length}))
    return dict(transformer=root / "transformer", vae=root / "vae", t5=root / "text_encoder_3",
                clip_l=root / "text_encoder", clip_g=root / "text_encoder_2", root=root)
