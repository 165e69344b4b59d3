"""Shard lists: turn a user's shard spec into a checked list of tar URLs.

A spec is one of

- a brace pattern: ``data/{00000..00003}.tar``
- a directory: every ``*.tar`` inside it, sorted
- a comma-separated list of any of these: ``a.tar,b/{0..1}.tar,more_shards/`` (commas inside braces
  belong to the pattern: ``{train,val}-{0..3}.tar``)
- a ``.txt`` file listing one path (or pattern) per line; ``#`` starts a comment
- ``pipe:`` URLs (``pipe:aws s3 cp s3://bucket/{0..9}.tar -``), brace-expanded but not checked

Local paths are checked when the loader is built, so a typo fails at start, not hours into a run.
"""

from __future__ import annotations

import os
from pathlib import Path

import braceexpand

from data_pipelines.config import ConfigError


def _is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url


def _expand_one(item: str, depth: int = 0) -> list[str]:
    item = item.strip()
    if not item:
        return []
    if _is_remote(item):
        return list(braceexpand.braceexpand(item))
    item = os.path.expanduser(item)
    if depth < 2 and item.endswith(".txt") and Path(item).is_file():
        lines = Path(item).read_text().splitlines()
        base = Path(item).parent
        out: list[str] = []
        for line in lines:
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            if not _is_remote(line) and not os.path.isabs(os.path.expanduser(line)):
                line = str(base / line)  # relative entries are relative to the list file
            out.extend(_expand_one(line, depth + 1))
        return out
    if Path(item).is_dir():
        return sorted(str(p) for p in Path(item).glob("*.tar"))
    return list(braceexpand.braceexpand(item))


def _split_top_level(spec: str) -> list[str]:
    """Split on commas that are not inside braces, so ``{train,val}-{0..3}.tar`` stays one pattern."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(spec):
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth == 0:
            parts.append(spec[start:i])
            start = i + 1
    parts.append(spec[start:])
    return parts


def expand_shards(spec: str, name: str = "data.shards") -> list[str]:
    """Expand a shard spec (pattern, directory, comma list, or ``.txt`` list file) into URLs.

    Raises ``FileNotFoundError`` naming every missing local path, and ``ConfigError`` (a ``ValueError``) when the
    spec names no shards at all. ``name`` is what the messages call the spec (the config key or the argument).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"{name} is empty; set it to a brace pattern (data/{{00000..00003}}.tar), "
                          "a directory of .tar files, a comma-separated list, or a .txt list file")
    urls: list[str] = []
    for item in _split_top_level(spec):
        urls.extend(_expand_one(item))
    if not urls:
        raise ConfigError(f"{name}={spec!r} names no shards: no .tar file in that directory or list file (make "
                          "shards with `dit make-shards` or `dit make-synthetic`, or point at the folder holding them)")
    missing = [u for u in urls if not _is_remote(u) and not Path(u).is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise FileNotFoundError(f"{len(missing)} of {len(urls)} shards in {name}={spec!r} do not exist: {shown}")
    return urls
