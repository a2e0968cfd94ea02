"""Free loopback ports for the processes the suite and the benchmark start, safe under pytest-xdist.

``service.devtools.ports.free_port`` (what ``sluice up`` uses) asks the kernel for an ephemeral port
and releases it: the server binds it seconds later, after a Python process has imported Sluice. With
several xdist workers starting stacks at once, that gap lets another worker's server, or any outgoing
connection (ephemeral ports come from the same range), take the port first. Here each worker draws from
a band of its own below the ephemeral range (``ip_local_port_range``, 32768-60999 on Linux), so no other
worker, and no outgoing connection, is ever handed the same port; a port something still holds (another
suite on the same machine, a socket in TIME_WAIT) is skipped by trying to bind it first.
"""

from __future__ import annotations

import os
import random
import socket
import threading

# Ports 10000-32767: below the ephemeral range, above the well-known services a box may run.
_LOW, _HIGH = 10000, 32768
# Set by pytest-xdist in each worker (and inherited by what it starts: a nested run stays in its
# worker's band, where its parent's servers are already bound and so skipped).
_WORKER_VAR, _COUNT_VAR = "PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT"

_lock = threading.Lock()
_order: list[int] = []  # this process's band, from a random start
_next = 0


def _band() -> range:
    """This process's ports: the whole range, or the xdist worker's share of it."""
    worker, count = os.environ.get(_WORKER_VAR, ""), os.environ.get(_COUNT_VAR, "")
    if worker.startswith("gw") and worker[2:].isdigit() and count.isdigit() and int(count) > 0:
        index, n = int(worker[2:]), int(count)
        span = (_HIGH - _LOW) // n
        start = _LOW + (index % n) * span
        return range(start, start + span)
    return range(_LOW, _HIGH)


def _bindable(port: int) -> bool:
    # No SO_REUSEADDR: a port with a socket in TIME_WAIT counts as taken too.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that no other xdist worker of this run is handed, and that is free now.

    Ports are handed out in turn, so one is handed out again only after the whole band has been: a
    port a test keeps as "nothing listens there" stays so for the rest of the test.
    """
    global _next
    with _lock:
        if not _order:
            band = _band()
            # A random start: two suites on one machine (or a nested run) rarely walk the same ports.
            first = random.randrange(len(band))
            _order.extend([*band[first:], *band[:first]])
        for _ in range(len(_order)):
            port = _order[_next % len(_order)]
            _next += 1
            if _bindable(port):
                return port
    raise OSError("no free loopback port left in this process's band")


__all__ = ["free_port"]
