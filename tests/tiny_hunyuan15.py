"""A tiny random HunyuanVideo 1.5 download: transformer/, vae/ (AutoencoderKLHunyuanVideo15), text_encoder/ (a
Qwen2_5_VLTextModel) with tokenizer/ (the packaged MiniLM tokenizer, no hub here, given a small chat template:
the encoder and the pipeline both render whatever template the tokenizer holds), and text_encoder_2/ (a T5 encoder
of ByT5's byte vocabulary) with tokenizer_2/ (ByT5's tokenizer, which needs no files); and the I2V download's
image_encoder/ (a SiglipVisionModel) with feature_extractor/ (its SiglipImageProcessor)."""

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
from tiny_zimage import CHAT_TEMPLATE, TOKENIZER_FILES  # noqa: E402

# the Qwen2.5-VL, ByT5 and SigLIP states' widths (text_embed_dim, text_embed_2_dim, image_embed_dim)
WIDTH, GLYPH_WIDTH, IMAGE_WIDTH = 16, 8, 8


def save_tiny_hunyuan15(root: Path, seed: int = 0, **transformer: object) -> dict[str, Path]:
    """The download under root; returns its folders by name (transformer, vae, qwen, byt5, root)."""
    from transformers import (
        ByT5Tokenizer,
        Qwen2_5_VLTextConfig,
        Qwen2_5_VLTextModel,
        SiglipImageProcessor,
        SiglipVisionConfig,
        SiglipVisionModel,
        T5Config,
        T5EncoderModel,
    )

    tiny_transformer("hunyuan15", seed, **transformer).save_pretrained(root / "transformer")
    save_tiny_vae("hunyuan15", root / "vae", seed=seed + 1)
    torch.manual_seed(seed)
    qwen = Qwen2_5_VLTextConfig(vocab_size=30522, hidden_size=WIDTH, intermediate_size=32, num_hidden_layers=4,
                                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                                bos_token_id=101, eos_token_id=102,
                                rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})
    Qwen2_5_VLTextModel(qwen).eval().save_pretrained(root / "text_encoder")
    (root / "tokenizer").mkdir(exist_ok=True)
    for f in TOKENIZER_FILES:
        shutil.copy(minilm_path() / f, root / "tokenizer")
    config = json.loads((root / "tokenizer" / "tokenizer_config.json").read_text())
    (root / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    byt5 = T5Config(vocab_size=384, d_model=GLYPH_WIDTH, d_kv=4, d_ff=16, num_layers=2, num_heads=2,
                    feed_forward_proj="gated-gelu")
    T5EncoderModel(byt5).eval().save_pretrained(root / "text_encoder_2")
    ByT5Tokenizer().save_pretrained(root / "tokenizer_2")
    # the I2V download's SigLIP: 16 patches of a 32 x 32 image, states as wide as the transformer's image_embed_dim
    siglip = SiglipVisionConfig(hidden_size=IMAGE_WIDTH, intermediate_size=16, num_hidden_layers=1,
                                num_attention_heads=2, image_size=32, patch_size=8)
    SiglipVisionModel(siglip).eval().save_pretrained(root / "image_encoder")
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "feature_extractor")
    return dict(transformer=root / "transformer", vae=root / "vae", qwen=root / "text_encoder",
                byt5=root / "text_encoder_2", siglip=root / "image_encoder", root=root)


def crop_start(tokenizer) -> int:
    """The chat's token count before the prompt with ``tokenizer`` (what 108 is for HunyuanVideo 1.5's): the system
    message and the user turn's opening, rendered as the pipeline renders them."""
    from dit.models.text_hunyuan15 import pipeline_text_settings

    system = pipeline_text_settings()[0]
    marker = "\x00PROMPT\x00"
    chat = tokenizer.apply_chat_template([{"role": "system", "content": system},
                                          {"role": "user", "content": marker}], tokenize=False,
                                         add_generation_prompt=True)
    return len(tokenizer(chat.split(marker)[0], add_special_tokens=False)["input_ids"])
