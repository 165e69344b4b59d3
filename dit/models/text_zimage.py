"""Z-Image's text encoder (text.encoder=zimage): a Qwen3 model (a Z-Image Diffusers download's text_encoder/,
tokenizer/ beside) read as ZImagePipeline._encode_prompt does: each prompt written into the tokenizer's chat template
as one user message (the generation prompt added, thinking enabled), padded to ``max_length``, and the hidden states
one layer before the last. The mask marks the real tokens, the only ones the transformer takes (latent shards keep
just those)."""

from __future__ import annotations

from pathlib import Path

import torch

from dit.models.text import HFTextEncoder

HIDDEN_LAYER = -2  # the pipeline's hidden_states[-2]


class ZImageTextEncoder(HFTextEncoder):
    def __init__(self, path: str | Path, max_length: int = 512, cache_size: int = 4096, dtype: str = "fp32") -> None:
        super().__init__(path, max_length=max_length, cache_size=cache_size, padding="mask", dtype=dtype)
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"the tokenizer of {path} has no chat template; Z-Image writes each prompt into Qwen3's: "
                             "use the text_encoder/ of a Z-Image Diffusers download (tokenizer/ beside it)")

    @torch.no_grad()
    def _encode_uncached(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.model.parameters()).device
        chats = [self.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                    add_generation_prompt=True, enable_thinking=True) for p in prompts]
        tok = self.tokenizer(chats, padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="pt").to(device)
        mask = tok["attention_mask"].bool()
        states = self.model(input_ids=tok["input_ids"], attention_mask=mask,
                            output_hidden_states=True).hidden_states[HIDDEN_LAYER].float()
        if not torch.isfinite(states[mask]).all():
            raise ValueError(f"the text encoder {self.name} gave non-finite states in text.dtype={self.text_dtype} "
                             f"for {prompts[:3]}...: use text.dtype=bf16 or fp32")
        return states * mask[..., None], mask  # (the padding's states are zeros: the transformer never reads them)
