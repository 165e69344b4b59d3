"""text.cache_dir: the frozen text encoder's states kept on disk, one file per prompt, so that a run whose prompts
are all stored never loads the encoder. With latent shards (which hold the captions' states) a run needs only ""
(prompt dropout, the unconditional half of guidance) and its sample prompts: once they are stored, a Wan run holds
no umT5 at all, and `dit sample` of a stored prompt starts without it.

The states are stored as the encoder gives them (fp32, all ``text.max_length`` rows: the padded ones too, since
text.padding=mask keeps what the encoder computed there), under a folder named by what decides them: the encoder
kind and text.* settings, the size and mtime of every file of the encoder's (and tokenizer's) folders, the versions
of torch and transformers, and the source of the text encoders' code. Any change there starts an empty folder.
A prompt is 4 x max_length x width bytes (48 KB for MiniLM, 8 MB for a T5-XXL at 512 tokens): the cache is for the
prompts a run encodes again and again; a large caption set belongs in latent shards (`dit encode`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dit.models.text import TextEncoder, minilm_path, tokenizer_folder

log = logging.getLogger(__name__)
CACHE_VERSION = 1
SETTINGS = ("encoder", "max_length", "padding", "clean", "dtype", "crop_start")  # text.* that change the states


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def _files(folder: Path) -> list[list[object]]:
    """[name, size, mtime_ns] of the files of an encoder's folder and of its tokenizer's (a diffusers download keeps
    it beside: tokenizer/, tokenizer_2/)."""
    folders = [folder]
    try:
        folders.append(tokenizer_folder(folder))
    except FileNotFoundError:  # the encoder's own loading says so
        pass
    out = []
    for f in dict.fromkeys(folders):
        for p in sorted(f.rglob("*")):
            if p.is_file() and not p.name.startswith("."):
                st = p.stat()
                out.append([str(p.relative_to(folder.parent)), st.st_size, st.st_mtime_ns])
    return out


def cache_identity(text_cfg: object) -> dict[str, object]:
    """What decides a prompt's states, for the cache folder's name (see the module's docstring)."""
    paths = [minilm_path()] if text_cfg.encoder == "minilm" else [
        Path(p) for p in (text_cfg.path, text_cfg.path_2, text_cfg.path_3) if p]
    code = hashlib.sha256()
    for source in sorted(Path(__file__).parent.glob("text*.py")):
        if source.name != Path(__file__).name:
            code.update(source.name.encode() + source.read_bytes())
    return {"version": CACHE_VERSION, "settings": {k: getattr(text_cfg, k) for k in SETTINGS},
            "folders": {str(p.resolve()): _files(p.resolve()) for p in paths}, "torch": torch.__version__,
            "transformers": _version("transformers"), "code": code.hexdigest()}


def prompt_file(folder: Path, prompt: str) -> Path:
    return folder / f"{hashlib.sha256(prompt.encode()).hexdigest()[:40]}.safetensors"


class CachedTextEncoder(TextEncoder):
    """``build()``'s encoder behind a per-prompt store in ``root``: stored prompts are read, the others encoded
    (the encoder is built at the first of them, on the device this module was moved to) and written."""

    def __init__(self, text_cfg: object, build: Callable[[], TextEncoder], root: str | Path,
                 cache_size: int = 4096) -> None:
        super().__init__()
        identity = cache_identity(text_cfg)
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        self.folder = Path(root).expanduser() / f"{text_cfg.encoder}-{digest}"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise FileNotFoundError(f"text.cache_dir {str(root)!r}: cannot create {self.folder} ({e.strerror}); set "
                                    "text.cache_dir to a writable folder, or null to encode without a cache") from e
        self._build, self.encoder, self.cache_size, self.loads = build, None, cache_size, 0
        self.register_buffer("_device_probe", torch.zeros(()), persistent=False)  # where .to() put this module
        self._memory: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        meta = self.folder / "encoder.json"
        if meta.is_file():
            stored = json.loads(meta.read_text())
            self.dim, self.name = int(stored["dim"]), str(stored["name"])
        else:  # an empty folder: the encoder is needed now, for its width and name
            self._load()
            _atomic_write(meta, lambda tmp: tmp.write_text(json.dumps(
                {"dim": self.dim, "name": self.name, "identity": identity}, indent=1)))
        count = sum(1 for _ in self.folder.glob("*.safetensors"))
        log.info("text.cache_dir: %s (%d prompts stored)", self.folder, count)

    def _load(self) -> TextEncoder:
        if self.encoder is None:
            self.encoder = self._build().to(self._device_probe.device)
            self.dim, self.name, self.loads = self.encoder.dim, self.encoder.name, self.loads + 1
        return self.encoder

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        device = self._device_probe.device
        unknown = [p for p in dict.fromkeys(prompts) if p not in self._memory]
        for p in unknown:
            path = prompt_file(self.folder, p)
            if path.is_file():
                try:
                    stored = load_file(path)
                except Exception:  # unreadable (a foreign file): encoded again and overwritten below
                    continue
                self._memory[p] = (stored["states"].to(device), stored["mask"].to(device))
        missing = [p for p in unknown if p not in self._memory]
        if missing:
            if self.encoder is None:
                log.info("text.cache_dir: loading the text encoder for %d prompt(s) not stored yet", len(missing))
            states, masks = self._load().encode(missing)
            for p, s, m in zip(missing, states, masks):
                self._memory[p] = (s.to(device), m.to(device))
                _atomic_write(prompt_file(self.folder, p), lambda tmp, s=s, m=m: save_file(
                    {"states": s.detach().contiguous().cpu(), "mask": m.contiguous().cpu()}, str(tmp)))
        for p in prompts:
            self._memory.move_to_end(p)
        while len(self._memory) > self.cache_size:
            self._memory.popitem(last=False)
        return (torch.stack([self._memory[p][0].to(device) for p in prompts]),  # [B, L, D]
                torch.stack([self._memory[p][1].to(device) for p in prompts]))  # [B, L]

    def train(self, mode: bool = True) -> CachedTextEncoder:  # always frozen in eval mode
        return super().train(False)


def _atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` then a rename onto ``path``: a reader (another rank) never sees half a file. A full or
    read-only disk costs only the caching: the states were computed, so the run goes on (warned)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        log.warning("text.cache_dir: could not write %s (%s): the states are used, not stored", path, e)
