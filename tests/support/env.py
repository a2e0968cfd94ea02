"""The environment and command lines of the Sluice processes tests and the benchmark start."""

from __future__ import annotations

import os
import sys

from .processes import ROOT

# How long a process may take to answer after its start: a failure deadline, not a measurement
# (a Python process importing Sluice on a busy 2-core box can take several seconds).
STARTUP_TIMEOUT_S = 60.0


def sluice_cmd(*args: str) -> list[str]:
    """``python -m service.cli ARGS`` with this interpreter."""
    return [sys.executable, "-m", "service.cli", *args]


def base_env() -> dict[str, str]:
    """Our environment without Sluice settings (nothing points at the shared Redis), unbuffered."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLUICE_", "OPENAI_")) and k not in ("REDIS_URL", "PORT")
    }
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env
