"""A watchdog for hangs: when the training loop stays in one phase longer than ``train.watchdog_timeout``
seconds, log which rank is stuck, in which phase, and where: the Python stack of the training thread, whose
innermost frames name the collective (all_reduce, all_gather, barrier, ...) it waits in.

The loop marks phases as it goes (``watchdog.mark("forward/backward")``); a daemon thread checks the time
since the last mark. It only reports (again every timeout while still stuck); the process group's own timeout
still ends a hang for good. With one line per stuck rank, the rank that is *not* in the collective (still in
"data", or in "sampling" while the others wait in a barrier) is the one to look at.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import traceback

log = logging.getLogger("dit.watchdog")


class Watchdog:
    def __init__(self, timeout_s: float, rank: int = 0, poll_s: float | None = None) -> None:
        self.timeout_s, self.rank = timeout_s, rank
        self.poll_s = poll_s if poll_s is not None else max(0.05, min(10.0, timeout_s / 4))
        self.phase, self.since = "start", time.monotonic()
        self._reported_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._target = threading.main_thread().ident

    def mark(self, phase: str) -> None:
        """The training thread enters ``phase`` now."""
        self.phase, self.since, self._reported_at = phase, time.monotonic(), 0.0

    def __enter__(self) -> Watchdog:
        if self.timeout_s > 0:
            self._target = threading.get_ident()
            self._thread = threading.Thread(target=self._run, name="dit-watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def stack(self) -> str:
        frame = sys._current_frames().get(self._target)
        return "".join(traceback.format_stack(frame)[-8:]) if frame is not None else "(no stack)"

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            phase, since, now = self.phase, self.since, time.monotonic()
            stuck = now - since
            if stuck > self.timeout_s and now - max(self._reported_at, since) > self.timeout_s:
                self._reported_at = now
                log.error("watchdog: rank %d stuck for %.0f s in phase %r (train.watchdog_timeout=%g); it is in:\n%s",
                          self.rank, stuck, phase, self.timeout_s, self.stack())
