"""A private Redis Cluster per test: 3 masters with one replica each, all on loopback.

Every node is a ``redis-server --cluster-enabled yes`` on a free port (and a free cluster-bus
port, given explicitly: the default, port + 10000, may be taken or past 65535), in a directory of
its own, started through a :class:`ProcessRunner` (its own process group, the run marker, killed
with its parent), so no node outlives the test even when the cluster never forms. The slots are
assigned by ``redis-cli --cluster create ... --cluster-replicas 1``, and :func:`start_cluster`
returns once every node says ``cluster_state:ok``, sees every other node, and every replica is
in sync with its master.

Helpers: :meth:`RedisClusterServers.kill_master` (SIGKILL a master, wait for its replica to take
over), :meth:`RedisClusterServers.failover` (``CLUSTER FAILOVER`` on a replica, wait for the swap),
:meth:`RedisClusterServers.commandstats` (``INFO commandstats`` of every master).
"""

from __future__ import annotations

import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .env import STARTUP_TIMEOUT_S
from .ports import free_port
from .processes import ManagedProcess, ProcessDied, ProcessRunner, raise_if_exited, run, skip_or_raise
from .redis_server import REDIS_KEEP_ENVIRON
from .waiting import wait_until

# How long a master may be unreachable before its peers mark it failed and its replica takes over.
# Short, so a kill test ends quickly; long enough that a busy 2-core box does not see a node that
# was merely descheduled as dead (redis serves the cluster bus from its main thread).
NODE_TIMEOUT_MS = 3000
# A failure deadline for forming the cluster and for a failover (not a measurement).
CLUSTER_TIMEOUT_S = max(STARTUP_TIMEOUT_S, 60.0)
HOST = "127.0.0.1"


@dataclass
class ClusterNodeProcess:
    """One ``redis-server`` of the cluster: its client port, cluster-bus port, directory and process."""

    port: int
    bus_port: int
    workdir: Path
    process: ManagedProcess

    @property
    def name(self) -> str:
        return f"{HOST}:{self.port}"

    def client(self, **kwargs: Any):
        """A plain (non-cluster) client of this node alone."""
        import redis

        kwargs.setdefault("socket_timeout", 5)
        kwargs.setdefault("socket_connect_timeout", 5)
        return redis.Redis(host=HOST, port=self.port, **kwargs)

    def info(self, section: str) -> dict[str, Any]:
        client = self.client()
        try:
            return client.info(section)
        finally:
            client.close()

    def command(self, *args: Any) -> Any:
        """One raw command on this node alone (``"CLUSTER", "INFO"``, ...)."""
        client = self.client()
        try:
            return client.execute_command(*args)
        finally:
            client.close()


@dataclass
class RedisClusterServers:
    """A running local cluster (see the module docstring); :attr:`url` names one node of it."""

    nodes: list[ClusterNodeProcess]
    runner: ProcessRunner
    killed: list[ClusterNodeProcess] = field(default_factory=list)

    @property
    def url(self) -> str:
        """``redis://`` URL of the first node still running: any node is enough to discover the rest."""
        return f"redis://{self.alive()[0].name}/0"

    def alive(self) -> list[ClusterNodeProcess]:
        return [n for n in self.nodes if n not in self.killed]

    def node(self, port: int) -> ClusterNodeProcess:
        return next(n for n in self.nodes if n.port == port)

    def client(self, **kwargs: Any):
        """A synchronous ``redis.cluster.RedisCluster`` on this cluster."""
        from redis.cluster import RedisCluster

        kwargs.setdefault("socket_timeout", 5)
        kwargs.setdefault("socket_connect_timeout", 5)
        first = self.alive()[0]
        return RedisCluster(host=HOST, port=first.port, **kwargs)

    def roles(self) -> dict[int, str]:
        """Port -> ``master``/``slave``, as each live node says of itself (INFO replication)."""
        return {n.port: n.info("replication")["role"] for n in self.alive()}

    def masters(self) -> list[ClusterNodeProcess]:
        return [self.node(port) for port, role in self.roles().items() if role == "master"]

    def replicas(self) -> list[ClusterNodeProcess]:
        return [self.node(port) for port, role in self.roles().items() if role != "master"]

    def replica_of(self, master: ClusterNodeProcess) -> ClusterNodeProcess:
        """The live replica following ``master``."""
        for node in self.replicas():
            info = node.info("replication")
            if int(info.get("master_port", 0)) == master.port:
                return node
        raise AssertionError(f"no live replica follows {master.name}")

    def master_of_key(self, key: str | bytes) -> ClusterNodeProcess:
        """The master serving the slot of ``key`` now (CLUSTER SLOTS as a live node sees it)."""
        from redis.crc import key_slot

        slot = key_slot(key.encode() if isinstance(key, str) else key)
        client = self.alive()[0].client()
        try:
            for start, end, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    return self.node(int(master[1]))
        finally:
            client.close()
        raise AssertionError(f"slot {slot} is not served")

    def wait_ok(self, timeout: float = CLUSTER_TIMEOUT_S) -> None:
        """Wait until every live node reports ``cluster_state:ok``, knows every live node as
        connected and not failing, and every replica's link to its master is up."""
        wait_until(
            self._settled,
            timeout=timeout,
            interval=0.1,
            message=self._describe,
            ignore=(OSError, ConnectionError, _redis_errors()),
            check=self._check_processes,
        )

    def _settled(self) -> bool:
        alive = {n.port for n in self.alive()}
        for node in self.alive():
            client = node.client()
            try:
                info = client.execute_command("CLUSTER", "INFO")
                state = info.decode() if isinstance(info, bytes) else str(info)
                if "cluster_state:ok" not in state:
                    return False
                seen = _cluster_nodes(client)
                for port in alive:
                    flags = seen.get(port)
                    if flags is None or flags & {"fail", "fail?", "handshake", "noaddr"}:
                        return False
                if client.info("replication")["role"] != "master":
                    if client.info("replication").get("master_link_status") != "up":
                        return False
            finally:
                client.close()
        return True

    def _describe(self) -> str:
        parts = []
        for node in self.alive():
            try:
                client = node.client()
                try:
                    info = client.execute_command("CLUSTER", "INFO")
                    state = (info.decode() if isinstance(info, bytes) else str(info)).split("\r\n")[0]
                    parts.append(f"{node.name} {state} role={client.info('replication')['role']}")
                finally:
                    client.close()
            except Exception as exc:  # a description must not hide the timeout
                parts.append(f"{node.name} unreachable: {exc!r}")
        return "the cluster to settle (" + "; ".join(parts) + ")"

    def _check_processes(self) -> None:
        for node in self.alive():
            raise_if_exited(node.process)

    def kill_master(
        self, master: ClusterNodeProcess | None = None, *, timeout: float = CLUSTER_TIMEOUT_S
    ) -> tuple[ClusterNodeProcess, ClusterNodeProcess]:
        """SIGKILL ``master`` (default: the first master) and wait until its replica has taken its slots
        and the cluster is ok again; return (the killed master, the promoted replica)."""
        master = master or self.masters()[0]
        replica = self.replica_of(master)
        master.process.stopping = True
        master.process.signal(signal.SIGKILL)
        master.process.wait(15)
        self.killed.append(master)
        wait_until(
            lambda: replica.info("replication")["role"] == "master",
            timeout=timeout,
            interval=0.1,
            message=f"replica {replica.name} to be promoted after {master.name} was killed",
            ignore=(OSError, _redis_errors()),
            check=self._check_processes,
        )
        self.wait_ok(timeout)
        return master, replica

    def failover(self, replica: ClusterNodeProcess, *, timeout: float = CLUSTER_TIMEOUT_S) -> ClusterNodeProcess:
        """``CLUSTER FAILOVER`` on ``replica`` (a coordinated swap with its live master); wait until it is
        the master and the old master follows it; return the old master."""
        old = self.node(int(replica.info("replication")["master_port"]))
        client = replica.client()
        try:
            client.execute_command("CLUSTER", "FAILOVER")
        finally:
            client.close()

        def swapped() -> bool:
            if replica.info("replication")["role"] != "master":
                return False
            info = old.info("replication")
            return info["role"] != "master" and int(info.get("master_port", 0)) == replica.port

        wait_until(
            swapped,
            timeout=timeout,
            interval=0.1,
            message=f"{replica.name} to take over from {old.name}",
            ignore=(OSError, _redis_errors()),
            check=self._check_processes,
        )
        self.wait_ok(timeout)
        return old

    def commandstats(self) -> dict[str, dict[str, dict[str, float]]]:
        """``INFO commandstats`` of every live master: node name -> command -> {calls, usec, ...}.

        Keys are redis-py's (``cmdstat_evalsha`` -> ``evalsha``, subcommands as ``cluster|info``).
        """
        out: dict[str, dict[str, dict[str, float]]] = {}
        for node in self.masters():
            stats = node.info("commandstats")
            out[node.name] = {name.removeprefix("cmdstat_"): value for name, value in stats.items()}
        return out

    def reset_stats(self) -> None:
        """``CONFIG RESETSTAT`` on every live node (commandstats start from zero)."""
        for node in self.alive():
            client = node.client()
            try:
                client.config_resetstat()
            finally:
                client.close()


def _redis_errors() -> type[BaseException]:
    import redis

    return redis.RedisError


def _cluster_nodes(client: Any) -> dict[int, set[str]]:
    """Port -> flags of every node this node knows (CLUSTER NODES, raw)."""
    raw = client.execute_command("CLUSTER", "NODES")
    text = raw.decode() if isinstance(raw, bytes) else raw
    if isinstance(text, dict):  # redis-py parsed it: {"host:port@bus": {"flags": "...", ...}}
        return {int(addr.split("@")[0].rsplit(":", 1)[1]): set(v["flags"].split(",")) for addr, v in text.items()}
    out: dict[int, set[str]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3:
            out[int(parts[1].split("@")[0].rsplit(":", 1)[1])] = set(parts[2].split(","))
    return out


def start_cluster(
    runner: ProcessRunner,
    workdir: Path,
    *,
    masters: int = 3,
    replicas: int = 1,
    node_timeout_ms: int = NODE_TIMEOUT_MS,
    attempts: int = 3,
) -> RedisClusterServers:
    """Start ``masters`` x (1 + ``replicas``) cluster nodes under ``workdir`` and form a cluster of them.

    Every process goes through ``runner``: the caller closes it (even when this raises).
    """
    exe = shutil.which("redis-server")
    cli = shutil.which("redis-cli")
    if exe is None or cli is None:
        skip_or_raise("redis-server and redis-cli are not on PATH (`make test` installs them)")
    workdir.mkdir(parents=True, exist_ok=True)
    nodes: list[ClusterNodeProcess] = []
    for i in range(masters * (1 + replicas)):
        nodes.append(_start_node(runner, exe, workdir / f"node{i + 1}", node_timeout_ms, attempts))
    result = run(
        [cli, "--cluster", "create", *(n.name for n in nodes), "--cluster-replicas", str(replicas), "--cluster-yes"],
        timeout=CLUSTER_TIMEOUT_S,
    )
    if result.returncode != 0:
        raise AssertionError(
            f"redis-cli --cluster create failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    cluster = RedisClusterServers(nodes, runner)
    cluster.wait_ok()
    return cluster


def _start_node(
    runner: ProcessRunner, exe: str, workdir: Path, node_timeout_ms: int, attempts: int
) -> ClusterNodeProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    last_error: BaseException | None = None
    for _ in range(attempts):
        port, bus_port = free_port(), free_port()
        if port == bus_port:
            continue
        proc = runner.start(
            f"redis-{workdir.name}",
            [
                exe,
                "--port",
                str(port),
                "--bind",
                HOST,
                "--cluster-enabled",
                "yes",
                "--cluster-port",
                str(bus_port),
                "--cluster-config-file",
                str(workdir / "nodes.conf"),
                "--cluster-node-timeout",
                str(node_timeout_ms),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(workdir),
            ]
            + REDIS_KEEP_ENVIRON,
            stop_stage=0,
        )
        node = ClusterNodeProcess(port, bus_port, workdir, proc)
        try:
            _wait_for_ping(node)
            return node
        except ProcessDied as exc:  # most likely a port was taken in the meantime: retry
            last_error = exc
            proc.stopping = True
            (workdir / "nodes.conf").unlink(missing_ok=True)
    raise AssertionError(f"could not start a cluster node in {workdir}: {last_error}")


def _wait_for_ping(node: ClusterNodeProcess) -> None:
    client = node.client(socket_timeout=1, socket_connect_timeout=1)
    try:
        wait_until(
            client.ping,
            timeout=STARTUP_TIMEOUT_S,
            message=f"cluster node {node.name} to answer PING",
            ignore=(OSError, _redis_errors()),
            check=lambda: raise_if_exited(node.process),
        )
    finally:
        client.close()
