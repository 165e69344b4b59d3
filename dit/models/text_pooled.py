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

from dit.models.text import HFTextEncoder, frozen_encoder

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
        from transformers import CLIPTextModel

        folder = Path(path)
        self.tokenizer, self.model = frozen_encoder(folder, CLIPTextModel, dtype, key,
                                                    "the CLIP text encoder folder of the same diffusers download")
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


class SD3TextEncoder(HFTextEncoder):
    """Stable Diffusion 3 / 3.5's three (text.encoder=sd3), as StableDiffusion3Pipeline.encode_prompt: the T5 of
    ``path`` (the download's text_encoder_3/, tokenizer_3/ beside) run over the padding, and the two CLIP text
    encoders with projection of ``path_2`` (CLIP-L: text_encoder/) and ``path_3`` (CLIP-G: text_encoder_2/). Their
    penultimate hidden states (77 tokens each) side by side, zero-padded to the T5 width, go in front of the T5
    states; their projected pooled embeddings side by side make the pooled row:

        states [B, 1 + 77 + max_length, D_t5]   (row 0: pooled, rows 1-77: CLIP-L | CLIP-G, then T5)
    """

    def __init__(self, path: str | Path, path_2: str | Path, path_3: str | Path, max_length: int = 256,
                 cache_size: int = 4096, dtype: str = "fp32") -> None:
        super().__init__(path, max_length=max_length, cache_size=cache_size, padding="unmasked", dtype=dtype)
        from transformers import CLIPTextModelWithProjection

        self.clips = torch.nn.ModuleList()
        self.clip_tokenizers = []
        for key, folder in (("text.path_2", path_2), ("text.path_3", path_3)):
            tokenizer, model = frozen_encoder(folder, CLIPTextModelWithProjection, dtype, key,
                                              f"the CLIP text encoder folder ({SD3_CLIP[key]})")
            self.clip_tokenizers.append(tokenizer)
            self.clips.append(model)
        self.clip_dim = sum(int(m.config.hidden_size) for m in self.clips)
        self.pooled_dim = sum(int(m.config.projection_dim) for m in self.clips)
        if max(self.clip_dim, self.pooled_dim) > self.dim:
            raise ValueError(f"the CLIP encoders' states ({self.clip_dim} wide side by side, pooled {self.pooled_dim}) "
                             f"are wider than the T5's {self.dim}: not an SD3 set of text encoders")
        self.name = f"{path} + {path_2} + {path_3}"

    @torch.no_grad()
    def _encode_uncached(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        states, mask = super()._encode_uncached(prompts)  # T5 [B, L, D]
        hidden, pooled, masks = [], [], []
        for tokenizer, model in zip(self.clip_tokenizers, self.clips):
            tok = tokenizer(prompts, padding="max_length", truncation=True, max_length=CLIP_LENGTH,
                            return_tensors="pt")
            out = model(tok["input_ids"].to(states.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2].float())  # the pipeline's clip_skip None: the penultimate layer
            pooled.append(out.text_embeds.float())
            masks.append(tok["attention_mask"].to(mask.device).bool())
        clip = torch.nn.functional.pad(torch.cat(hidden, -1), (0, self.dim - self.clip_dim))  # [B, 77, D]
        pooled_states = torch.cat(pooled, -1)
        if not (torch.isfinite(clip).all() and torch.isfinite(pooled_states).all()):
            raise ValueError(f"the CLIP text encoders of {self.name} gave non-finite states in text.dtype="
                             f"{self.text_dtype} for {prompts[:3]}...: use text.dtype=bf16 or fp32")
        clip_mask = masks[0] | masks[1]  # (which CLIP positions are real tokens: the states are kept either way)
        return with_pooled_row(torch.cat([clip, states], 1), torch.cat([clip_mask, mask], 1), pooled_states)


# where SD3's CLIP encoders are in its diffusers download
SD3_CLIP = {"text.path_2": "CLIP-L: a Stable Diffusion 3 Diffusers download's text_encoder/",
            "text.path_3": "CLIP-G: a Stable Diffusion 3 Diffusers download's text_encoder_2/"}
