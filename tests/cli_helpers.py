"""Running the ``mpsd`` command line from tests: in this process or in a child process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mpsd.cli import main


def cli(*args: str) -> int:
    """Run ``mpsd ARGS`` in this process (as the console script does); its exit status."""
    with pytest.raises(SystemExit) as exc:
        main(list(args))
        raise SystemExit(0)
    return int(exc.value.code or 0)


def printed(capsys: pytest.CaptureFixture[str]) -> str:
    """Everything printed so far, stdout and stderr, with the console's line wrapping undone."""
    got = capsys.readouterr()
    return " ".join((got.out + got.err).split())


def mpsd_subprocess(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m mpsd ARGS`` in a child process (for crashes that end the process)."""
    return subprocess.run(
        [sys.executable, "-m", "mpsd", *args], capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=120
    )
