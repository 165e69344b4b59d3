"""Text of two encoders in one tensor: a CLIP text encoder's pooled embedding as one more row, in front of the main
encoder's states. HunyuanVideo (Llama + CLIP, dit/models/text_hunyuan.py) and FLUX.1 (T5 + CLIP, ``FluxTextEncoder``)
take both; packed as

    states [B, 1 + max_length, D], mask [B, 1 + max_length]   (row 0: the pooled embedding, zero-padded to D; mask 1)

the prompt cache, latent shards (which keep the real tokens and pad after them), prompt dropout, the unconditional
"" and sequence-parallel broadcasts carry it with the text, unchanged: in front, it stays in place wherever padding
is cut or added after the real tokens. The family adapters split it off again (``split_pooled``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from dit.models.diffusers_folder import frozen_dtype
from dit.models.text import HFTextEncoder, tokenizer_folder

CLIP_LENGTH = 77  # the pipelines' CLIP max_sequence_length (tokenizer_max_length)


def split_pooled(text: torch.Tensor, mask: torch.Tensor,
                 pooled_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The main states [B, L, D], their mask [B, L] and CLIP's pooled embedding [B, pooled_dim] of a packed
    [B, 1 + L, D]."""
    return text[:, 1:], mask[:, 1:], text[:, 0, :pooled_dim]


def with_pooled_row(states: torch.Tensor, mask: torch.Tensor,
                    pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """states [B, L, D], mask [B, L] and pooled [B, P <= D] packed as [B, 1 + L, D], [B, 1 + L]."""
    row = states.new_zeros(states.shape[0], 1, states.shape[-1])
    row[:, 0, :pooled.shape[-1]] = pooled
    return torch.cat([row, states], 1), torch.cat([mask.new_ones(mask.shape[0], 1), mask], 1)


class ClipPooled(torch.nn.Module):
    """The frozen CLIP text encoder of ``path`` (a diffusers download's text_encoder/ or text_encoder_2/, its
    tokenizer beside), giving the pooled embedding of prompts padded to 77 tokens, as the pipelines'
    ``_get_clip_prompt_embeds``. ``key`` names the config key in errors."""

    def __init__(self, path: str | Path, dtype: str, width: int, key: str = "text.path_2") -> None:
        super().__init__()
        from transformers import AutoTokenizer, CLIPTextModel

        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{key} {str(folder)!r} has no config.json; set it to the CLIP text encoder folder "
                                    "of the same diffusers download")
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder(folder), local_files_only=True)
        self.model = CLIPTextModel.from_pretrained(folder, local_files_only=True, dtype=frozen_dtype(dtype))
        self.model.eval().requires_grad_(False)
        self.dim, self.name = int(self.model.config.hidden_size), str(folder)
        if self.dim > width:
            raise ValueError(f"the CLIP text encoder {folder} is {self.dim} wide, more than the main encoder's "
                             f"{width}: its pooled embedding cannot ride in a text row")

    @torch.no_grad()
    def pooled(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        ids = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=CLIP_LENGTH,
                             return_tensors="pt")["input_ids"].to(device)
        return self.model(ids, output_hidden_states=False).pooler_output.float()  # [B, P]


class FluxTextEncoder(HFTextEncoder):
    """FLUX.1's pair (text.encoder=flux): the T5 encoder of ``path`` (the download's text_encoder_2/, tokenizer_2/
    beside) run over the padding, as FluxPipeline's ``_get_t5_prompt_embeds`` (no attention mask: its transformer
    takes none), and the CLIP text encoder of ``path_2`` (text_encoder/, tokenizer/ beside) for the pooled row."""

    def __init__(self, path: str | Path, path_2: str | Path, max_length: int = 512, cache_size: int = 4096,
                 dtype: str = "fp32") -> None:
        super().__init__(path, max_length=max_length, cache_size=cache_size, padding="unmasked", dtype=dtype)
        self.clip = ClipPooled(path_2, dtype, self.dim)
        self.pooled_dim = self.clip.dim
        self.name = f"{path} + {path_2}"

    @torch.no_grad()
    def _encode_uncached(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        states, mask = super()._encode_uncached(prompts)
        pooled = self.clip.pooled(prompts, states.device)
        if not torch.isfinite(pooled).all():
            raise ValueError(f"the CLIP text encoder {self.clip.name} gave non-finite states in text.dtype="
                             f"{self.text_dtype} for {prompts[:3]}...: use text.dtype=bf16 or fp32")
        return with_pooled_row(states, mask, pooled)
