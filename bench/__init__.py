"""Benchmark harness for Sluice: ``python -m bench.run`` (see :mod:`bench.run`)."""
