"""Imported by the loader's forkserver when the ``worker_fault`` hook is on (tests/training/hooked_cli.py), so the
DataLoader workers forked from it inherit the fault: a worker decoding sample ``key`` kills itself with
``signal``, as a decoder segfault or the OOM killer would."""

from __future__ import annotations

import json
import os
import signal

from data_pipelines import loader

_arg = json.loads(os.environ.get("DIT_TEST_HOOKS", "{}")).get("worker_fault")
if _arg:
    _media = loader.DecodeClips.media

    def media(self, sample, rng):  # noqa: ANN001, ANN202
        if sample.get("__key__") == _arg["key"]:
            os.kill(os.getpid(), getattr(signal, _arg.get("signal", "SIGSEGV")))
        return _media(self, sample, rng)

    loader.DecodeClips.media = media
