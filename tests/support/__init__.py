"""Test and benchmark infrastructure, shared by ``tests/`` (through the fixtures in
``tests/conftest.py``) and ``bench/``.

- :mod:`.processes`: :class:`ProcessRunner` / :class:`ManagedProcess` (own process group, run marker,
  parent-death signal), ``run`` (a command whose whole group dies on timeout), the leak scan.
- :mod:`.redis_server`: a private ``redis-server``; :mod:`.mocks` and :mod:`.mock_server`: mock
  providers (recording, gated); :mod:`.moto`: an S3-compatible server and buckets.
- :mod:`.stack`: :class:`Stack` / :class:`StackFactory`, a whole Sluice stack of real processes.
- :mod:`.waiting`: ``wait_until`` / ``async_wait_until``; :mod:`.http`: raw HTTP and the error
  envelope check; :mod:`.lines`: batch input lines; :mod:`.ports`: ``free_port``; :mod:`.env`: the
  processes' environment and command lines.

Nothing here imports pytest at module level.
"""
