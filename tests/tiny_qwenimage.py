"""A tiny random Qwen-Image download: transformer/, vae/ (AutoencoderKLQwenImage), text_encoder/ (a
Qwen2_5_VLForConditionalGeneration) with tokenizer/: the packaged MiniLM tokenizer (no hub here), so the template's
token count before the prompt (text.crop_start) is that tokenizer's, not the released 34."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

from dit.models.text import minilm_path

sys.path.insert(0, str(Path(__file__).parent / "models" / "families"))
from tiny_families import tiny_transformer  # noqa: E402
from tiny_vaes import save_tiny_vae  # noqa: E402

WIDTH = 16  # the Qwen2.5-VL states' width (joint_attention_dim)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def save_tiny_qwenimage(root: Path, seed: int = 0, **transformer: object) -> dict[str, Path]:
    """The download under root; returns its folders by name (transformer, vae, qwen, root)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tiny_transformer("qwenimage", seed, **transformer).save_pretrained(root / "transformer")
    save_tiny_vae("qwenimage", root / "vae", seed=seed + 1)
    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=30522, hidden_size=WIDTH, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=WIDTH,
                           fullatt_block_indexes=[0]))
    Qwen2_5_VLForConditionalGeneration(config).eval().save_pretrained(root / "text_encoder")
    (root / "tokenizer").mkdir(exist_ok=True)
    for f in TOKENIZER_FILES:
        shutil.copy(minilm_path() / f, root / "tokenizer")
    return dict(transformer=root / "transformer", vae=root / "vae", qwen=root / "text_encoder", root=root)


def crop_start(tokenizer) -> int:
    """The template's token count before the prompt with ``tokenizer`` (what 34 is for Qwen-Image's): the template
    around an empty prompt, less its closing part (after "{}") and the tokenizer's end token."""
    from dit.models.text_qwenimage import prompt_template

    template = prompt_template()[0]
    full = tokenizer(template.format(""))["input_ids"]
    tail = tokenizer(template.split("{}")[1], add_special_tokens=False)["input_ids"]
    return len(full) - len(tail) - 1
