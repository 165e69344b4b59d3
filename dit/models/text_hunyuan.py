"""HunyuanVideo's two frozen text encoders behind our one-encoder interface (text.encoder=hunyuan).

HunyuanVideoPipeline.encode_prompt gives three things per prompt: the Llama states of the prompt written into its
template (the hidden states ``skip`` layers before the last, the template's first ``crop_start`` tokens cut off),
their mask, and CLIP's pooled text embedding. ``encode`` returns the first two after one more row, in front, that
holds the pooled embedding, zero-padded to the Llama width, with mask 1:

    states [B, 1 + max_length, D_llama], mask [B, 1 + max_length]

so the prompt cache, latent shards (which keep the real tokens and pad after them), prompt dropout, the
unconditional "" and sequence-parallel broadcasts carry it with the text, unchanged: in front, it stays in place
wherever padding is cut or added after the real tokens (dit/models/text_pooled.py). The HunyuanVideo adapter
(dit/models/families/hunyuan.py) splits it off again.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dit.models.text import HFTextEncoder
from dit.models.text_pooled import ClipPooled, split_pooled, with_pooled_row

__all__ = ["HunyuanTextEncoder", "prompt_template", "split_pooled"]

CROP_START = 95  # HunyuanVideoPipeline's DEFAULT_PROMPT_TEMPLATE: the template's tokens with its Llama tokenizer
SKIP_LAYERS = 2  # the pipeline's num_hidden_layers_to_skip: Llama's hidden_states[-3]


def prompt_template() -> str:
    """The template the pipeline writes each prompt into (its DEFAULT_PROMPT_TEMPLATE, read from diffusers)."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    return DEFAULT_PROMPT_TEMPLATE["template"]


class HunyuanTextEncoder(HFTextEncoder):
    """The Llama encoder of ``path`` (a HunyuanVideo Diffusers folder's text_encoder/, tokenizer/ beside) and the CLIP
    text encoder of ``path_2`` (text_encoder_2/, tokenizer_2/ beside), both frozen in ``dtype``."""

    def __init__(self, path: str | Path, path_2: str | Path, max_length: int = 256, crop_start: int = CROP_START,
                 cache_size: int = 4096, dtype: str = "fp32") -> None:
        super().__init__(path, max_length=max_length, cache_size=cache_size, padding="mask", dtype=dtype)
        self.clip = ClipPooled(path_2, dtype, self.dim)
        self.pooled_dim = self.clip.dim
        self.template, self.crop_start = prompt_template(), crop_start
        n = len(self.tokenizer(self.template.format(""))["input_ids"])  # the template around an empty prompt
        if crop_start >= n:
            raise ValueError(f"text.crop_start={crop_start} cuts the whole template ({n} tokens with the tokenizer "
                             f"of {path}): it is the template's token count before the prompt, 95 with "
                             "HunyuanVideo's Llama tokenizer")
        self.name = f"{path} + {path_2}"

    @torch.no_grad()
    def _encode_uncached(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.model.parameters()).device
        tok = self.tokenizer([self.template.format(p) for p in prompts], padding="max_length", truncation=True,
                             max_length=self.max_length + self.crop_start, return_tensors="pt").to(device)
        hidden = self.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                            output_hidden_states=True).hidden_states[-(SKIP_LAYERS + 1)]
        states = hidden[:, self.crop_start:].float()  # [B, L, D]
        mask = tok["attention_mask"][:, self.crop_start:].bool()  # [B, L]
        pooled = self.clip.pooled(prompts, device)  # [B, P]
        if not (torch.isfinite(states).all() and torch.isfinite(pooled).all()):
            raise ValueError(f"the text encoders {self.name} gave non-finite states in text.dtype={self.text_dtype} "
                             f"for {prompts[:3]}...: use text.dtype=bf16 or fp32")
        return with_pooled_row(states, mask, pooled)
