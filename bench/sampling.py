"""Process and Redis sampling: CPU and memory from /proc, Redis memory from INFO.

Samplers run in the background while a batch runs (:func:`sampling`). They stop on a flag and the
harness waits for them with a bound: a cancellation swallowed inside a redis-py call once left a
run waiting forever for a sampler that never ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
import time
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping

import redis.asyncio as aioredis

MIB = 1024 * 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")
SETTLE_TIMEOUT_S = 20.0
# How long leaving a sampling block waits for the sampler to notice the flag (one sample plus one
# interval, normally); then it cancels it and waits as long again, then leaves it behind.
SAMPLER_STOP_WAIT_S = 15.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid``, reaped children included, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    # The command name may hold spaces and parentheses; the fields start after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime, cutime, cstime = (int(v) for v in fields[11:15])
    return (utime + stime + cutime + cstime) / CLK_TCK


def memory_mb(pid: int) -> dict[str, float]:
    """``VmRSS`` and ``VmHWM`` (peak RSS) of ``pid`` in MB."""
    found = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0]) / 1024  # the kernel reports kB
    return found


def cpu_snapshot(procs: Mapping[str, Any]) -> dict[str, float]:
    """CPU seconds of every process (anything with a ``pid``), by name."""
    return {name: cpu_seconds(p.pid) for name, p in procs.items()}


async def wait_settled(procs: Mapping[str, Any], check_alive: Callable[[], None]) -> bool:
    """Wait until every process is idle, i.e. done importing and connecting, before timing.

    Nothing in the public API says a worker is up; a process that burns (almost) no CPU over
    half a second has finished starting. Returns False if that never happens (timing still goes on).
    """
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    before = cpu_snapshot(procs)
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        check_alive()
        now = cpu_snapshot(procs)
        if all(now[n] - before[n] <= 0.03 for n in now):
            return True
        before = now
    return False


@contextlib.asynccontextmanager
async def sampling(
    interval: float, sample: Callable[[], Awaitable[None]], *, stop_wait: float = SAMPLER_STOP_WAIT_S
) -> AsyncIterator[None]:
    """Call ``sample`` every ``interval`` seconds in the background while the block runs.

    Leaving the block sets a stop flag that the sampler checks between samples, and waits at most
    ``stop_wait`` seconds for it to end; only a sampler that overstays that is cancelled, and one
    that ignores the cancellation too (a library that swallows it) is left behind with a warning
    instead of hanging the run. A sample that raises stops the sampling, and the error is raised
    when the block ends.
    """
    stop = asyncio.Event()

    async def loop() -> None:
        while not stop.is_set():
            await sample()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)

    task = asyncio.create_task(loop(), name=f"sampler {getattr(sample, '__qualname__', sample)}")
    try:
        yield
    except BaseException:
        await _stop_sampler(task, stop, stop_wait)  # the block's own error is the one to report
        raise
    error = await _stop_sampler(task, stop, stop_wait)
    if error is not None:
        raise error


async def _stop_sampler(task: asyncio.Task, stop: asyncio.Event, wait: float) -> BaseException | None:
    """Stop a sampler (flag, then cancel, each waited for at most ``wait`` s); return its error."""
    stop.set()
    done, _ = await asyncio.wait({task}, timeout=wait)
    if not done:
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=wait)
    if not done:
        print(
            f"warning: {task.get_name()} did not stop within {2 * wait:.0f}s; left behind", file=sys.stderr, flush=True
        )
        return None
    return None if task.cancelled() else task.exception()


class RssSampler:
    """Largest ``VmRSS`` seen per process: a cross-check of the kernel's ``VmHWM``."""

    def __init__(self, procs: Mapping[str, Any]) -> None:
        self.procs = procs
        self.max_rss: dict[str, float] = {}

    async def sample(self) -> None:
        """Read every process's current RSS once."""
        for name, proc in self.procs.items():
            with contextlib.suppress(OSError, KeyError):  # exiting processes are caught elsewhere
                rss = memory_mb(proc.pid)["VmRSS"]
                self.max_rss[name] = max(rss, self.max_rss.get(name, 0.0))

    def report(self) -> dict[str, dict[str, float | None]]:
        """``{name: {"hwm", "max_sampled"}}`` in MB, reading ``VmHWM`` now."""
        out: dict[str, dict[str, float | None]] = {}
        for name, proc in self.procs.items():
            try:
                hwm: float | None = memory_mb(proc.pid)["VmHWM"]
            except (OSError, KeyError):
                hwm = None
            out[name] = {"hwm": _round(hwm, 1), "max_sampled": _round(self.max_rss.get(name), 1)}
        return out


class RedisMemorySampler:
    """Largest ``used_memory`` seen in Redis's ``INFO memory``."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self.peak = 0
        self.samples = 0

    async def used_memory(self) -> int:
        """``used_memory`` now, in bytes."""
        return int((await self.client.info("memory"))["used_memory"])

    async def sample(self) -> None:
        """Take one sample."""
        self.peak = max(self.peak, await self.used_memory())
        self.samples += 1

    async def breakdown(self) -> dict[str, int]:
        """Where ``used_memory`` goes: data, client buffers, cached scripts; and how many keys and clients."""
        info = await self.client.info("memory")
        fields = ("used_memory", "used_memory_dataset", "mem_clients_normal", "used_memory_scripts_eval")
        out = {f: int(info.get(f, 0)) for f in fields}
        out["keys"] = int(await self.client.dbsize())
        out["connected_clients"] = int((await self.client.info("clients"))["connected_clients"])
        return out

    async def key_groups(self, limit: int = 15) -> list[dict[str, Any]]:
        """Keys left in Redis grouped by name with ids masked, largest first (what outlives a batch)."""
        groups: dict[str, list[int]] = {}
        async for key in self.client.scan_iter(count=1000):
            name = re.sub(r"(?<=[_:-])[0-9A-Za-z]{8,}|\d+", "*", key.decode(errors="replace"))
            size = await self.client.memory_usage(key) or 0
            entry = groups.setdefault(name, [0, 0])
            entry[0] += 1
            entry[1] += size
        ranked = sorted(groups.items(), key=lambda kv: -kv[1][1])[:limit]
        return [{"pattern": k, "keys": n, "bytes": b} for k, (n, b) in ranked]


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)
