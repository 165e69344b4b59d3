"""``data.decode_cache_mb``: whole decoded videos kept in memory, so a small dataset read for many epochs (a fine-tune
on a few dozen clips, the demo's VAE) is decoded once instead of in every epoch.

Per reader (the main process, or each loader worker), up to the budget, first come first kept:
- the first read of a video decodes only its picked frames, as without the cache, and notes its size;
- a later read of a video whose whole decode fits the room left decodes it whole once and keeps it;
- from then on its frames are indexed from memory: the same frames, by the same ``FramePicker`` draw, as a decode
  of those frames (decord's ``get_batch`` reads frames exactly), so batches do not change with the cache.
A video too big for the room left is decoded as without the cache, every time; nothing is ever decoded whole
that is not kept.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from data_pipelines.decode import decode_video, resolve_indices


class DecodedCache:
    """Decoded videos by (shard url, sample key), at most ``budget_mb`` MiB of uint8 frames."""

    def __init__(self, budget_mb: float) -> None:
        self.budget, self.used = int(budget_mb * 2**20), 0
        self.videos: dict[tuple[str, str], tuple[np.ndarray, float]] = {}  # whole clip [N, H, W, 3], fps
        self.sizes: dict[tuple[str, str], int] = {}  # bytes of a whole decode, noted at the first read
        self.hits = self.misses = 0

    def video(self, url: str, key: str, data: bytes, pick: Any) -> np.ndarray:
        """The frames ``pick`` chooses (``decode_video``'s indices) of the video ``data``: uint8 ``[T, H, W, 3]``."""
        where = (url, key)
        kept = self.videos.get(where)
        if kept is None and self.sizes.get(where, self.budget + 1) <= self.budget - self.used:
            whole, info = decode_video(data)
            self.videos[where] = kept = (whole, info.fps)
            self.used += whole.nbytes
        if kept is not None:
            self.hits += 1
            whole, fps = kept
            return whole[resolve_indices(pick, len(whole), fps)]
        self.misses += 1
        frames, info = decode_video(data, pick)
        self.sizes[where] = info.num_frames * info.height * info.width * 3
        return frames

    def stats(self) -> dict[str, Any]:
        return {"videos": len(self.videos), "mib": self.used / 2**20, "hits": self.hits, "misses": self.misses}
