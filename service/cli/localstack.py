"""The connection file of the stack ``sluice up`` runs, and how the other commands find it.

``sluice up`` writes ``$SLUICE_DATA_DIR/stack.json`` (``./var/data/stack.json`` by default) once
its web process answers, and removes it when it stops. ``sluice status`` and ``sluice tokens``
use its Redis when ``REDIS_URL`` is not set; the API client uses its URL and token when
``SLUICE_URL`` / ``SLUICE_TOKEN`` are not set. A file whose ``sluice up`` is gone (killed
outright) is ignored.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import msgspec

from service.core.config import ClientSettings

FILE_NAME = "stack.json"
# The checkout this code runs from: `bin/sluice` run from another directory still finds the
# stack `make run` started at the checkout's root.
CHECKOUT = Path(__file__).resolve().parents[2]


class LocalStack(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What ``sluice up`` tells the other commands about the stack it runs."""

    api_url: str  # the web root, without /v1
    dashboard_url: str
    redis_url: str
    token: str
    data_dir: str
    pid: int  # of `sluice up` itself
    started_at: int
    processes: dict[str, int] = {}  # role -> pid of each child
    upstream_url: str = ""  # the mock provider's URL when `sluice up` started one (for `sluice status`)
    path: str = ""  # where it was read from (not written)

    def describe(self) -> str:
        """How a command names the stack it talks to, in its one line on stderr."""
        return f"the `sluice up` stack (pid {self.pid}, {_shown(Path(self.path))})"


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def alive(pid: int) -> bool:
    """True while a process with this pid exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: it exists
    return True


def write(path: Path, stack: LocalStack) -> None:
    """Write the file atomically, readable by its owner only (it holds the token)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(msgspec.json.format(msgspec.json.encode(msgspec.structs.replace(stack, path=""))) + b"\n")
    os.replace(tmp, path)


def load(path: Path) -> LocalStack | None:
    """The stack described at ``path`` if its ``sluice up`` still runs; None otherwise."""
    try:
        stack = msgspec.json.decode(path.read_bytes(), type=LocalStack)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None
    if not alive(stack.pid):
        return None
    return msgspec.structs.replace(stack, path=str(path))


def remove(path: Path, pid: int) -> None:
    """Remove the file if it still describes the stack of ``pid`` (a newer `sluice up` may own it now)."""
    try:
        stack = msgspec.json.decode(path.read_bytes(), type=LocalStack)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return
    if stack.pid == pid:
        path.unlink(missing_ok=True)


def candidates(client: ClientSettings) -> list[Path]:
    """Where to look: the data dir, and (unless SLUICE_DATA_DIR names one) the checkout's var/data."""
    paths = [client.data_dir / FILE_NAME]
    if not client.data_dir_set and (CHECKOUT / "setup.cfg").exists():
        theirs = CHECKOUT / "var" / "data" / FILE_NAME
        if theirs.resolve() != paths[0].resolve():
            paths.append(theirs)
    return paths


def find(client: ClientSettings) -> LocalStack | None:
    """The running `sluice up` stack the client settings point at, if any."""
    for path in candidates(client):
        stack = load(path)
        if stack is not None:
            return stack
    return None


def announce(message: str) -> None:
    """The one line on stderr saying which stack a command talks to."""
    print(f"sluice: {message}", file=sys.stderr, flush=True)
