"""The shape of a user error from `dit` run as a subprocess, shared by the tests of new users' mistakes."""

from __future__ import annotations

import subprocess


def assert_one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """A user error: a non-zero exit and one ``error: ...`` line on stderr that says each of ``needles``."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]
