"""Free loopback ports, for the processes ``sluice up``, the tests and the benchmark start.

The one implementation of ``free_port``: product code (``sluice up``) cannot import the test
suite, so the suite (``tests/support``) and ``bench/`` import it from here.
"""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago.

    The port is released before returning, so another process may take it first: a caller whose
    server then fails to bind should pick another port and retry.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
