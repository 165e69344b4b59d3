"""HunyuanVideo 1.5's two frozen text encoders behind our one-encoder interface (text.encoder=hunyuan15).

HunyuanVideo15Pipeline.encode_prompt gives two sets of states per prompt:
- Qwen2.5-VL's (``text.path``: the download's text_encoder/, tokenizer/ beside): the prompt as the user message of
  the pipeline's chat (its system message, read from diffusers), hidden states 2 layers before the last, the first
  ``crop_start`` tokens (108 with its tokenizer) cut off;
- ByT5's (``text.path_2``: text_encoder_2/, tokenizer_2/ beside) over the prompt's quoted texts (diffusers'
  ``extract_glyph_texts``); none for a prompt without quotes.

``encode`` packs both, each prompt's real tokens first, into

    states [B, 1 + 256 + max_length, D_qwen], mask [B, 1 + 256 + max_length]
    row 0: the prompt's ByT5 token count n and the ByT5 width in its first two columns (mask 1);
    rows 1..n: its ByT5 states, zero-padded to D_qwen (mask 1); then its Qwen2.5-VL states with their mask.

The real tokens are the first ones of a row, so latent shards (which keep the real tokens and pad after them), the
prompt cache, prompt dropout and the unconditional "" carry it unchanged; the adapter (dit/models/families/
hunyuan15.py) splits it with ``split_glyph``.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from dit.models.text import HFTextEncoder, frozen_encoder

GLYPH_LENGTH = 256  # the pipeline's tokenizer_2_max_length: ByT5 tokens per prompt


def pipeline_text_settings() -> tuple[str, int, int, int]:
    """HunyuanVideo15Pipeline's system message, crop_start (108), hidden layers skipped (2) and Qwen tokens (1000):
    the defaults of its _get_mllm_prompt_embeds."""
    from diffusers import HunyuanVideo15Pipeline

    p = inspect.signature(HunyuanVideo15Pipeline._get_mllm_prompt_embeds).parameters
    return (p["system_message"].default, p["crop_start"].default, p["num_hidden_layers_to_skip"].default,
            p["tokenizer_max_length"].default)


CROP_START = 108  # (pipeline_text_settings()[1], kept here for dit.config's torch-free reading)


def glyph_text(prompt: str) -> str | None:
    """The prompt's quoted texts as ByT5 reads them ('Text "OPEN". '), or None: diffusers' own extraction."""
    from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import extract_glyph_texts

    return extract_glyph_texts(prompt)


def split_glyph(text: torch.Tensor, mask: torch.Tensor, glyph_dim: int) -> tuple[torch.Tensor, ...]:
    """The packed text [B, 1 + G + L, D] as the transformer takes it: the Qwen states [B, L', D] with their mask and
    the ByT5 states [B, G', glyph_dim] with theirs, each row's real tokens first and the padding after the longest
    row's cut (each at least 1 token: a row without quoted text gets one masked zero token). ValueError when the
    ByT5 width is not ``glyph_dim``."""
    body, body_mask = text[:, 1:], mask[:, 1:].bool()
    counts, widths = text[:, 0, 0].round().long(), text[:, 0, 1].round().long()
    pos = torch.arange(body.shape[1], device=text.device)
    real = (body_mask & (pos >= counts[:, None])).sum(1)  # each row's Qwen tokens
    stats = torch.stack([counts, widths, real]).cpu()  # the one host sync: the output sizes depend on the data
    if set(stats[1].tolist()) != {glyph_dim}:
        raise ValueError(f"the ByT5 states of the text are {sorted(set(stats[1].tolist()))} wide but this HunyuanVideo "
                         f"1.5 transformer takes {glyph_dim} (text_embed_2_dim): use the text_encoder_2/ of its "
                         "download as text.path_2")
    g, q = max(1, int(stats[0].max())), max(1, int(stats[2].max()))
    if g > body.shape[1] or int(stats[0].min()) < 0:
        raise ValueError(f"the packed text's header counts {stats[0].tolist()} ByT5 tokens but a row holds "
                         f"{body.shape[1]} tokens: not text.encoder=hunyuan15's states (re-encode the shards)")
    glyph_mask = pos[:g] < counts[:, None]
    glyph = body[:, :g, :glyph_dim] * glyph_mask[..., None]
    index = (counts[:, None] + pos[:q]).clamp(max=body.shape[1] - 1)  # row i's Qwen tokens start after its ByT5 ones
    qwen_mask = pos[:q] < real[:, None]
    qwen = torch.gather(body, 1, index[..., None].expand(-1, -1, body.shape[-1])) * qwen_mask[..., None]
    return qwen, qwen_mask.to(mask.dtype), glyph, glyph_mask.to(mask.dtype)


class HunyuanVideo15TextEncoder(HFTextEncoder):
    """Qwen2.5-VL of ``path`` and ByT5 of ``path_2``, both frozen in ``dtype``."""

    def __init__(self, path: str | Path, path_2: str | Path, max_length: int = 1000, crop_start: int = CROP_START,
                 cache_size: int = 4096, dtype: str = "fp32") -> None:
        super().__init__(path, max_length=max_length, cache_size=cache_size, padding="mask", dtype=dtype)
        from transformers import T5EncoderModel

        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"the tokenizer of {path} has no chat template; HunyuanVideo 1.5 writes each prompt into "
                             "Qwen2.5-VL's: use the text_encoder/ of a HunyuanVideo 1.5 Diffusers download "
                             "(tokenizer/ beside it)")
        folder = Path(path_2)
        self.glyph_tokenizer, self.glyph_model = frozen_encoder(
            folder, T5EncoderModel, dtype, "text.path_2",
            "the ByT5 text encoder folder (a HunyuanVideo 1.5 Diffusers download's text_encoder_2/)")
        self.glyph_dim = int(self.glyph_model.config.d_model)
        if self.glyph_dim > self.dim:
            raise ValueError(f"the ByT5 encoder {folder} is {self.glyph_dim} wide, more than Qwen2.5-VL's {self.dim}: "
                             "not a HunyuanVideo 1.5 pair of text encoders")
        self.system, _, self.skip, _ = pipeline_text_settings()
        self.crop_start = crop_start
        n = len(self._chat_ids([""])[0])
        if crop_start >= n:
            raise ValueError(f"text.crop_start={crop_start} cuts the whole chat ({n} tokens with the tokenizer of "
                             f"{path}): it is the chat's token count before the prompt, 108 with HunyuanVideo 1.5's")
        self.name = f"{path} + {path_2}"

    def _chats(self, prompts: list[str]) -> list[str]:
        """The pipeline's chat of each prompt (format_text_input: "" becomes " "), rendered by the tokenizer."""
        return [self.tokenizer.apply_chat_template([{"role": "system", "content": self.system},
                                                    {"role": "user", "content": p if p else " "}],
                                                   tokenize=False, add_generation_prompt=True) for p in prompts]

    def _chat_ids(self, prompts: list[str]) -> list[list[int]]:
        return self.tokenizer(self._chats(prompts), add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def _encode_uncached(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.model.parameters()).device
        # the pipeline pads to crop_start + max_length; padding after the prompt changes no real token's state (a
        # causal model), so each batch pads to its longest
        tok = self.tokenizer(self._chats(prompts), padding="longest", truncation=True, add_special_tokens=False,
                             max_length=self.max_length + self.crop_start, return_tensors="pt").to(device)
        hidden = self.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                            output_hidden_states=True).hidden_states[-(self.skip + 1)]
        states = hidden[:, self.crop_start:].float()  # [B, <= L, D]
        mask = tok["attention_mask"][:, self.crop_start:].bool()
        glyph, glyph_mask = self._glyph(prompts, device)  # [B, G, D2], [B, G]
        if not (torch.isfinite(states[mask]).all() and torch.isfinite(glyph).all()):
            raise ValueError(f"the text encoders {self.name} gave non-finite states in text.dtype={self.text_dtype} "
                             f"for {prompts[:3]}...: use text.dtype=bf16 or fp32")
        b, d = len(prompts), self.dim
        out = states.new_zeros(b, 1 + GLYPH_LENGTH + self.max_length, d)
        out_mask = mask.new_zeros(b, out.shape[1])
        for i in range(b):
            n = int(glyph_mask[i].sum())
            out[i, 0, 0], out[i, 0, 1], out_mask[i, 0] = n, self.glyph_dim, True
            out[i, 1:1 + n, :self.glyph_dim], out_mask[i, 1:1 + n] = glyph[i, :n], True
            m = states.shape[1]
            out[i, 1 + n:1 + n + m] = states[i] * mask[i, :, None]
            out_mask[i, 1 + n:1 + n + m] = mask[i]
        return out, out_mask

    def _glyph(self, prompts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """ByT5's states of each prompt's quoted texts (the pipeline's _get_byt5_prompt_embeds: up to 256 tokens,
        none without quotes), each row's real tokens first."""
        texts = [glyph_text(p) for p in prompts]
        states = torch.zeros(len(prompts), GLYPH_LENGTH, self.glyph_dim, device=device)
        mask = torch.zeros(len(prompts), GLYPH_LENGTH, dtype=torch.bool, device=device)
        for i, text in enumerate(texts):
            if text is None:
                continue
            tok = self.glyph_tokenizer(text, truncation=True, max_length=GLYPH_LENGTH,
                                       return_tensors="pt").to(device)  # (padding after it changes no real state)
            n = tok["input_ids"].shape[1]
            states[i, :n] = self.glyph_model(input_ids=tok["input_ids"],
                                             attention_mask=tok["attention_mask"].float())[0][0].float()
            mask[i, :n] = True
        return states, mask
