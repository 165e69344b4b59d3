"""text.cache_dir (dit/models/text_cache.py): the stored states are the encoder's, bit for bit; a warm store never
builds the encoder; what decides the states names the folder; a bad store fails by name or is written over."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from dit.config import TextConfig
from dit.models.text import build_text_encoder, minilm_path
from dit.models.text_cache import CachedTextEncoder, prompt_file

PROMPTS = ["a red circle moving left", "", "a blue square", "a red circle moving left"]


@pytest.mark.parametrize("settings", [{"encoder": "minilm"},
                                      {"encoder": "hf", "path": str(minilm_path()), "padding": "unmasked"}],
                         ids=["minilm-mask", "hf-unmasked"])
def test_stored_states_are_the_encoders_and_a_warm_store_never_builds_it(tmp_path: Path, settings: dict,
                                                                         monkeypatch) -> None:
    live = build_text_encoder(TextConfig(**settings, max_length=16))
    want, want_mask = live.encode(PROMPTS)  # [4, 16, 384], [4, 16]

    cold = build_text_encoder(TextConfig(**settings, max_length=16, cache_dir=str(tmp_path)))
    assert isinstance(cold, CachedTextEncoder) and cold.loads == 1  # an empty store: built for its width and name
    states, mask = cold.encode(PROMPTS)
    assert torch.equal(states, want) and torch.equal(mask, want_mask)
    assert len(list(cold.folder.glob("*.safetensors"))) == 3  # one file per distinct prompt
    assert (cold.dim, cold.name) == (live.dim, live.name)

    monkeypatch.setattr(CachedTextEncoder, "_load", lambda self: pytest.fail("the encoder was built"))
    warm = build_text_encoder(TextConfig(**settings, max_length=16, cache_dir=str(tmp_path)))
    assert warm.folder == cold.folder and (warm.dim, warm.name) == (live.dim, live.name)
    states, mask = warm.encode(list(reversed(PROMPTS)))
    assert torch.equal(states, want.flip(0)) and torch.equal(mask, want_mask.flip(0))
    assert states.dtype == torch.float32 and mask.dtype == torch.bool


def test_a_new_prompt_builds_the_encoder_once_and_is_stored(tmp_path: Path) -> None:
    cfg = TextConfig(encoder="minilm", max_length=16, cache_dir=str(tmp_path))
    build_text_encoder(cfg).encode(["a red circle"])
    enc = build_text_encoder(cfg)
    assert enc.loads == 0 and enc.encoder is None
    enc.encode(["a red circle", "a green triangle"])
    enc.encode(["a green triangle", "a yellow star"])
    assert enc.loads == 1  # built at the first unknown prompt, kept for the next
    assert prompt_file(enc.folder, "a yellow star").is_file()
    want, _ = build_text_encoder(TextConfig(encoder="minilm", max_length=16)).encode(["a yellow star"])
    assert torch.equal(build_text_encoder(cfg).encode(["a yellow star"])[0], want)


def test_what_decides_the_states_names_the_folder(tmp_path: Path) -> None:
    """Another max_length, padding or dtype, or an encoder file changed in place (its size or mtime), is another
    folder; the device and the cache's own path are not part of it."""
    folder = tmp_path / "encoder"
    shutil.copytree(minilm_path(), folder)

    def where(**settings: object) -> Path:
        return build_text_encoder(TextConfig(**{"encoder": "hf", "path": str(folder), "max_length": 16,
                                                "cache_dir": str(tmp_path / "cache"), **settings})).folder

    first = where()
    assert where() == first and where(device="cpu") == first
    assert len({first, where(max_length=17), where(padding="unmasked"), where(dtype="bf16")}) == 4
    config = folder / "config.json"
    os.utime(config, ns=(config.stat().st_atime_ns, config.stat().st_mtime_ns + 1_000_000_000))
    assert where() != first


def test_an_unreadable_prompt_file_is_encoded_again_and_written_over(tmp_path: Path) -> None:
    cfg = TextConfig(encoder="minilm", max_length=16, cache_dir=str(tmp_path))
    want, _ = build_text_encoder(cfg).encode(["a red circle"])
    enc = build_text_encoder(cfg)
    prompt_file(enc.folder, "a red circle").write_bytes(b"not a safetensors file")
    assert torch.equal(enc.encode(["a red circle"])[0], want) and enc.loads == 1
    assert torch.equal(build_text_encoder(cfg).encode(["a red circle"])[0], want)  # the file was written over


def test_a_cache_dir_that_cannot_be_made_is_named(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"text.cache_dir .*file.*: cannot create"):
        build_text_encoder(TextConfig(encoder="minilm", cache_dir=str(tmp_path / "file")))
