"""Named DiT sizes in one registry: dit-tiny for tests and the CPU demo, DiT-S/B/L/XL as in Peebles & Xie."""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "dit-tiny": dict(hidden_size=128, depth=4, num_heads=4, patch_size=(1, 2, 2)),
    "DiT-S/2": dict(hidden_size=384, depth=12, num_heads=6, patch_size=(1, 2, 2)),
    "DiT-B/2": dict(hidden_size=768, depth=12, num_heads=12, patch_size=(1, 2, 2)),
    "DiT-L/2": dict(hidden_size=1024, depth=24, num_heads=16, patch_size=(1, 2, 2)),
    "DiT-XL/2": dict(hidden_size=1152, depth=28, num_heads=16, patch_size=(1, 2, 2)),
}
