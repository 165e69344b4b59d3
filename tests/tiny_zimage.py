"""A tiny random Z-Image download: transformer/, vae/ (FLUX.1's kind of image VAE), text_encoder/ (a Qwen3Model)
with tokenizer/: the packaged MiniLM tokenizer (no hub here) given a small chat template in Qwen3's form (its real
one is long; the encoder and the pipeline both render whatever template the tokenizer holds)."""

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

WIDTH = 16  # the Qwen3 states' width (cap_feat_dim)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and not "
                 "enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


def save_tiny_zimage(root: Path, seed: int = 0, **transformer: object) -> dict[str, Path]:
    """The download under root; returns its folders by name (transformer, vae, qwen, root)."""
    from transformers import Qwen3Config, Qwen3Model

    tiny_transformer("zimage", seed, **transformer).save_pretrained(root / "transformer")
    save_tiny_vae("flux", root / "vae", seed=seed + 1)
    torch.manual_seed(seed)
    qwen = Qwen3Config(vocab_size=30522, hidden_size=WIDTH, intermediate_size=32, num_hidden_layers=3,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
                       pad_token_id=0)
    Qwen3Model(qwen).eval().save_pretrained(root / "text_encoder")
    (root / "tokenizer").mkdir(exist_ok=True)
    for f in TOKENIZER_FILES:
        shutil.copy(minilm_path() / f, root / "tokenizer")
    config = json.loads((root / "tokenizer" / "tokenizer_config.json").read_text())
    (root / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    return dict(transformer=root / "transformer", vae=root / "vae", qwen=root / "text_encoder", root=root)
