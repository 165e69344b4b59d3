"""Progress for a terminal and for a batch job: a tqdm bar when stderr is a terminal; otherwise (SLURM, stdout/stderr
to files) one log line every ``every`` steps with the step, loss, rate and ETA, instead of a redrawn bar."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from tqdm.auto import tqdm

log = logging.getLogger("dit.progress")


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


class Progress:
    """``update(loss=...)`` once per step; ``close()`` at the end. Silent when ``enabled`` is False (ranks > 0)."""

    def __init__(self, total: int, *, initial: int = 0, desc: str = "train", every: int = 10,
                 enabled: bool = True, terminal: bool | None = None) -> None:
        self.total, self.step, self.desc, self.every, self.enabled = total, initial, desc, max(1, every), enabled
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.bar = tqdm(total=total, initial=initial, desc=desc) if enabled and self.terminal else None
        self.start_step, self.start = initial, time.perf_counter()

    def update(self, **values: Any) -> None:
        self.step += 1
        if self.bar is not None:
            self.bar.update(1)
            if values:
                self.bar.set_postfix({k: f"{v:.4f}" if isinstance(v, float) else v for k, v in values.items()})
        elif self.enabled and (self.step % self.every == 0 or self.step == self.total):
            rate = (self.step - self.start_step) / max(time.perf_counter() - self.start, 1e-9)
            shown = " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
            log.info("%s step %d/%d %s | %.2f steps/s | ETA %s", self.desc, self.step, self.total, shown, rate,
                     _duration((self.total - self.step) / rate))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
