"""Qwen-Image's text encoder (text.encoder=qwenimage): Qwen2.5-VL (a Qwen-Image Diffusers download's text_encoder/,
tokenizer/ beside) read as QwenImagePipeline._get_qwen_prompt_embeds does: each prompt written into the pipeline's
template (read from diffusers), the last hidden states, the template's first ``crop_start`` tokens (34 with its
tokenizer) cut off, and each prompt's real tokens marked by the mask (the padding's states zeroed; latent shards keep
just the real ones)."""

from __future__ import annotations

from pathlib import Path

import torch

from dit.models.text import HFTextEncoder

CROP_START = 34  # the pipeline's prompt_template_encode_start_idx


def prompt_template() -> tuple[str, int, int]:
    """QwenImagePipeline's prompt template, its token count before the prompt and the tokens a prompt is read up
    to before the cut to max_sequence_length (set in its __init__)."""
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline(None, None, None, None, None)
    return pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx, pipe.tokenizer_max_length


class QwenImageTextEncoder(HFTextEncoder):
    def __init__(self, path: str | Path, max_length: int = 1024, crop_start: int = CROP_START, cache_size: int = 4096,
                 dtype: str = "fp32") -> None:
        super().__init__(path, max_length=max_length, cache_size=cache_size, padding="mask", dtype=dtype)
        self.template, _, self.read_length = prompt_template()
        self.crop_start = crop_start
        n = len(self.tokenizer(self.template.format(""))["input_ids"])  # the template around an empty prompt
        if crop_start >= n:
            raise ValueError(f"text.crop_start={crop_start} cuts the whole template ({n} tokens with the tokenizer "
                             f"of {path}): it is the template's token count before the prompt, 34 with Qwen-Image's")

    @torch.no_grad()
    def _encode_uncached(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        # as the pipeline: tokens up to its tokenizer_max_length, encoded, then cut to max_sequence_length (a long
        # prompt's last kept token is a word, not the end token); padded after to text.max_length
        device = next(self.model.parameters()).device
        tok = self.tokenizer([self.template.format(p) for p in prompts], padding="longest", truncation=True,
                             max_length=self.read_length + self.crop_start, return_tensors="pt").to(device)
        hidden = self.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                            output_hidden_states=True).hidden_states[-1]
        keep = slice(self.crop_start, self.crop_start + self.max_length)
        mask = tok["attention_mask"][:, keep].bool()  # [B, <= L]
        states = hidden[:, keep].float() * mask[..., None]
        pad = self.max_length - mask.shape[1]
        states, mask = torch.nn.functional.pad(states, (0, 0, 0, pad)), torch.nn.functional.pad(mask, (0, pad))
        if not torch.isfinite(states).all():
            raise ValueError(f"the text encoder {self.name} gave non-finite states in text.dtype={self.text_dtype} "
                             f"for {prompts[:3]}...: use text.dtype=bf16 or fp32")
        return states, mask
