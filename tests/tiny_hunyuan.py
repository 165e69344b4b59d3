"""A tiny random HunyuanVideo text side saved as its Diffusers download holds it: text_encoder/ (a LlamaModel) with
tokenizer/, text_encoder_2/ (a CLIPTextModel) with tokenizer_2/. The tokenizers are the packaged MiniLM one (no hub
here), so the template's token count (text.crop_start) is that tokenizer's, not the released 95."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from dit.models.text import minilm_path

WIDTH = 16  # the Llama states' width (a transformer's text_embed_dim)
POOLED = 8  # CLIP's pooled width (pooled_projection_dim)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def save_tiny_text(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """root/text_encoder + tokenizer, root/text_encoder_2 + tokenizer_2; returns the two encoder folders."""
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    llama = LlamaConfig(vocab_size=30522, hidden_size=WIDTH, intermediate_size=32, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0)
    LlamaModel(llama).eval().save_pretrained(root / "text_encoder")
    clip = CLIPTextConfig(vocab_size=30522, hidden_size=POOLED, intermediate_size=16, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=77, bos_token_id=101, eos_token_id=102,
                          pad_token_id=0)  # (MiniLM's [CLS], [SEP]: CLIP pools at the first end token)
    CLIPTextModel(clip).eval().save_pretrained(root / "text_encoder_2")
    for name in ("tokenizer", "tokenizer_2"):
        (root / name).mkdir(exist_ok=True)
        for f in TOKENIZER_FILES:
            shutil.copy(minilm_path() / f, root / name)
    return root / "text_encoder", root / "text_encoder_2"


def crop_start(tokenizer) -> int:
    """The template's token count before the prompt with ``tokenizer`` (what 95 is for the released Llama one):
    the template around an empty prompt, less its closing tokens ("<|eot_id|>" and the tokenizer's end token)."""
    from dit.models.text_hunyuan import prompt_template

    template = prompt_template()
    full = tokenizer(template.format(""))["input_ids"]
    tail = tokenizer(template.split("{}")[1], add_special_tokens=False)["input_ids"]
    return len(full) - len(tail) - 1
