"""Checkpoint exports: what inference loads, with no training state (read by `dit sample`, written by training).

    RUN_DIR/checkpoints/step-00000200/
        model.safetensors      the EMA weights
        config.json            {"dit": the DiT constructor arguments, "experiment": the experiment config}
        vae/                   the frozen VAE (vae.safetensors + vae.json), so a checkpoint is self-contained; for a
                               pretrained family only vae.json {family, pretrained (absolute), tiling}: the diffusers
                               folder is read from there (dit/models/vae.py: export_vae, load_vae)

A checkpoint directory counts only once it is complete (renamed into place with weights and config); the
training state beside it (dit/training/checkpoint.py) is not needed to sample.

Integrity: every checkpoint directory carries manifest.json ({"format": 1, "files": {relative path: {"size",
"sha256"}}}), written last (after every rank's files, atomically) by rank 0 before the directory is renamed into
place. A checkpoint is *intact* when each file its manifest lists is there with that size and sha256; anything else
is *torn* (a file truncated, deleted or changed after the save: a shared filesystem, a partial copy, a disk).

- What is verified, and the cost: sizes are a stat per file; digests read every byte once (sha256, streamed in 1 MB
  chunks, files hashed in parallel threads). Saving hashes the whole checkpoint once on rank 0. Resuming
  (dit/training/checkpoint.py) checks sizes and digests of every file, the ranks sharing the hashing. `dit sample`
  (resolve_checkpoint) checks sizes and digests of the files it loads (model.safetensors, config.json, vae/), not
  of the training state. `dit check` checks everything. Pruning old checkpoints checks sizes only.
- A run directory resolves to its newest intact checkpoint; each newer one skipped is logged with the reason.
- No manifest (a checkpoint written before manifests existed, or not by dit) means *unverified*: skipped when a run
  directory is resolved, loaded (with a warning) only when its directory is passed itself.
- Loading also refuses what a manifest cannot vouch for: unreadable safetensors and non-finite weights raise
  CheckpointError ("corrupt checkpoint PATH: ...") before any sampling.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from data_pipelines.config import ConfigError
from dit.fileio import atomic_file, sha256_file

if TYPE_CHECKING:
    from dit.config import VAEConfig

CKPT_PREFIX = "step-"
MANIFEST = "manifest.json"
NO_MANIFEST = "no manifest.json: unverified (written before checkpoints had manifests, or not by dit)"
EXPORT_FILES = ("model.safetensors", "config.json")  # + vae/: what sampling loads
HASH_THREADS = 8

log = logging.getLogger("dit.checkpoint")


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used (torn, corrupt, another run's): the message names the path and what to do.
    A ConfigError, so the command prints it as one ``error:`` line."""


def write_export(ckpt: Path, *, weights: dict[str, torch.Tensor], config: dict[str, Any],
                 vae_dir: str | Path | None = None, vae: VAEConfig | None = None, manifest: bool = True) -> None:
    """The inference export: model.safetensors + config.json (+ the VAE: ``vae``, the experiment's VAE config,
    recorded by export_vae; or ``vae_dir``, our CausalVAE's folder, copied), what `dit sample` loads; and its
    manifest, unless ``manifest=False`` (training writes one for the whole checkpoint once every rank is done)."""
    bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise RuntimeError(f"refusing to write a checkpoint with non-finite weights in {bad[:5]}")
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, ckpt / "model.safetensors")
    (ckpt / "config.json").write_text(json.dumps(config, indent=2))
    if vae is not None:
        from dit.models.vae import export_vae

        export_vae(vae, ckpt / "vae")
    elif vae_dir is not None:
        shutil.copytree(vae_dir, ckpt / "vae")
    if manifest:
        write_manifest(ckpt)


def checkpoint_step(ckpt: str | Path) -> int:
    return int(Path(ckpt).name[len(CKPT_PREFIX):])


def dir_bytes(path: Path) -> int:
    """The bytes of the files under ``path`` (0 when it is not a directory)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Every checkpoint directory renamed into place (RUN/checkpoints/step-N, intact or not), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CKPT_PREFIX)
             and p.name[len(CKPT_PREFIX):].isdigit()]
    return sorted(found, key=checkpoint_step)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints (renamed into place, with weights and config), oldest first."""
    return [p for p in checkpoint_dirs(run_dir)
            if (p / "model.safetensors").is_file() and (p / "config.json").is_file()]


def write_manifest(ckpt: str | Path, *, expected: Iterable[str] = ()) -> dict[str, Any]:
    """Hash every file under ``ckpt`` and write ckpt/manifest.json atomically (call it last, once every file is
    written). ``expected``: relative paths that must be among them (every rank's file), else nothing is written."""
    ckpt = Path(ckpt)
    names = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST}
    missing = [n for n in expected if n not in names and not (ckpt / n).is_file()]
    if missing:
        raise RuntimeError(f"checkpoint {ckpt} is missing {missing} after every rank finished writing; not writing "
                           "its manifest (the checkpoint will not be used)")
    names |= set(expected)
    ordered = sorted(names)
    with ThreadPoolExecutor(HASH_THREADS) as pool:
        digests = list(pool.map(lambda n: sha256_file(ckpt / n), ordered))
    manifest = {"format": 1, "files": {n: {"size": (ckpt / n).stat().st_size, "sha256": d}
                                       for n, d in zip(ordered, digests)}}
    with atomic_file(ckpt / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def is_export(name: str) -> bool:
    """A file of the inference export (what `dit sample` loads), by its path relative to the checkpoint."""
    return name in EXPORT_FILES or name.startswith("vae/")


def checkpoint_problem(ckpt: str | Path, *, digests: bool = True, only: Callable[[str], bool] | None = None,
                       required: Iterable[str] = EXPORT_FILES, share: tuple[int, int] = (0, 1)) -> str | None:
    """None when checkpoint ``ckpt`` is intact, else why not, naming the file (NO_MANIFEST when it has none).

    ``only``: check just the manifest's files it accepts (e.g. ``is_export``); ``required``: files the manifest must
    list; ``digests``: also compare sha256 (else sizes only); ``share=(rank, world)``: hash only every world-th file
    from rank (the ranks of a job split the reading; sizes are checked for all)."""
    ckpt = Path(ckpt)
    try:
        files = json.loads((ckpt / MANIFEST).read_text())["files"]
        entries = {str(n): (int(e["size"]), str(e["sha256"])) for n, e in files.items()}
    except FileNotFoundError:
        return NO_MANIFEST
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{MANIFEST} is unreadable ({type(e).__name__}: {e})"
    for name in required:
        if name not in entries:
            return f"{name} is not in its manifest"
    names = sorted(n for n in entries if only is None or only(n))
    for name in names:
        try:
            size = (ckpt / name).stat().st_size
        except FileNotFoundError:
            return f"{name} is missing"
        except OSError as e:
            return f"{name} cannot be read ({e})"
        if size != entries[name][0]:
            return f"{name} is {size} bytes, its manifest says {entries[name][0]} (truncated or rewritten)"
    if not digests:
        return None
    rank, world = share

    def mismatch(name: str) -> str | None:
        try:
            ok = sha256_file(ckpt / name) == entries[name][1]
        except OSError as e:
            return f"{name} cannot be read ({e})"
        return None if ok else f"{name} does not match the sha256 in its manifest (changed after it was written)"

    with ThreadPoolExecutor(HASH_THREADS) as pool:
        return next((m for m in pool.map(mismatch, names[rank::world]) if m), None)


def first_intact(candidates: Iterable[Path], problem_of: Callable[[Path], str | None],
                 where: str | Path, quiet: bool = False) -> Path:
    """The first of ``candidates`` (newest first) with no problem, logging each one skipped and why (unless
    ``quiet``); a CheckpointError naming every problem when none is intact."""
    skipped = []
    for ckpt in candidates:
        problem = problem_of(ckpt)
        if problem is None:
            return ckpt
        if not quiet:
            log.warning("skipping checkpoint %s: %s", ckpt, problem)
        skipped.append(f"{ckpt.name}: {problem}")
    raise CheckpointError(
        f"no intact checkpoint in {str(where)!r} ({'; '.join(skipped)}). `dit check {where}` lists them; a "
        "checkpoint without manifest (written before manifests) is used only when its directory itself is passed")


_VERIFIED: set[tuple] = set()  # export stamps this process has verified (`dit sample` resolves a checkpoint twice)


def _export_stamp(ckpt: Path) -> tuple | None:
    """(path, size and mtime of the manifest and of each export file): equal stamps mean unchanged files."""
    try:
        files = [ckpt / MANIFEST, *sorted(f for f in ckpt.rglob("*") if f.is_file()
                                          and is_export(f.relative_to(ckpt).as_posix()))]
        return (str(ckpt.resolve()), *((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    except OSError:
        return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory itself (verified: a torn one is a CheckpointError, one without manifest is used with
    a warning), or the newest intact checkpoint of a training output directory (newer torn ones skipped, logged).
    Verifies what inference loads (the export's sizes and digests), not the training state."""
    p = Path(path)

    def problem_of(ckpt: Path) -> str | None:
        key = _export_stamp(ckpt)
        if key is not None and key in _VERIFIED:  # hashed already by this process, unchanged since (sizes, mtimes)
            return None
        problem = checkpoint_problem(ckpt, only=is_export)
        if problem is None and key is not None:
            _VERIFIED.add(key)
        return problem

    if (p / "model.safetensors").is_file() or (p / MANIFEST).is_file():
        problem = problem_of(p)
        if problem == NO_MANIFEST:
            log.warning("checkpoint %s: %s; loading it as given", p, problem)
        elif problem is not None:
            raise CheckpointError(f"corrupt checkpoint {p}: {problem}. Use an older checkpoint of its run (`dit "
                                  f"check {p.parent.parent}` lists the intact ones)")
        return p
    found = checkpoint_dirs(p)
    if not found:
        raise FileNotFoundError(f"no complete checkpoint in {str(p)!r}: pass a training output directory "
                                "(train.output_dir) or a checkpoint directory holding model.safetensors + config.json")
    return first_intact(reversed(found), problem_of, p)


def load_weights(ckpt: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The exported weights and config.json of a checkpoint directory; a CheckpointError ("corrupt checkpoint
    PATH") when either cannot be read or a weight is not finite (training never writes one: the file was damaged)."""
    ckpt = Path(ckpt)
    try:
        weights = load_file(ckpt / "model.safetensors")
    except SafetensorError as e:
        raise CheckpointError(f"corrupt checkpoint {ckpt}: model.safetensors cannot be read ({e})") from None
    try:
        config = json.loads((ckpt / "config.json").read_text())
    except ValueError as e:
        raise CheckpointError(f"corrupt checkpoint {ckpt}: config.json cannot be read ({e})") from None
    bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"corrupt checkpoint {ckpt}: non-finite weights (NaN or inf) in {len(bad)} tensor(s), "
                              f"e.g. {bad[:3]}; training never writes such a checkpoint, so the file was damaged "
                              "after it was written: use an older checkpoint")
    return weights, config
