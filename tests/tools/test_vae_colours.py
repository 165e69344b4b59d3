"""tools/vae_colours.py: every colour x shape x direction coded by a VAE and read back by the demo's scorer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from runs import MEDIA_FREE
from vae_colours import colour_check

from data_pipelines.synthetic import COLORS, DIRECTIONS, SHAPES

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(MEDIA_FREE, reason="the small VAE trains on pixels")
def test_counts_every_clip_once_and_the_cli_writes_the_same(small_vae: Path, tmp_path: Path) -> None:
    result = colour_check(small_vae)
    assert list(result) == list(COLORS)
    for r in result.values():
        assert r["clips"] == len(SHAPES) * len(DIRECTIONS) and 0 <= r["right"] <= r["clips"]
    out = tmp_path / "colours.json"
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "vae_colours.py"), str(small_vae), "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(out.read_text()) == result  # deterministic: the same clips, the same VAE
    right = sum(r["right"] for r in result.values())
    assert f"total {right}/{len(COLORS) * len(SHAPES) * len(DIRECTIONS)} in the right colour" in done.stdout
