import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

from runs import small_shards, small_vae  # noqa: E402, F401  (the same fixtures as tests/training)
