"""Free loopback ports: the one implementation, shared with ``sluice up`` and ``bench/``."""

from service.devtools.ports import free_port

__all__ = ["free_port"]
