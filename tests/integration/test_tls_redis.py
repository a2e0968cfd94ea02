"""``rediss://`` with a self-signed certificate, as Heroku-like managed Redis presents.

A private ``redis-server`` listens on TLS only (plain TCP disabled, a password required, a
certificate signed by nobody), and a whole Sluice stack (web, two workers, finalizer, and the
``sluice tokens`` command) runs against ``rediss://:PASSWORD@127.0.0.1:PORT/0``. By default the
certificate is not verified; a URL asking for ``ssl_cert_reqs=required`` verifies it.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import shutil
import uuid
from pathlib import Path

import pytest
import redis

from tests.support.env import base_env, sluice_cmd
from tests.support.mocks import MockSpec, start_mock
from tests.support.ports import free_port
from tests.support.processes import ProcessDied, ProcessRunner
from tests.support.redis_server import REDIS_KEEP_ENVIRON, RedisServer
from tests.support.stack import Stack
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

PASSWORD = f"tls-redis-pw-{uuid.uuid4().hex[:12]}"
TOKENS = (f"tok-tls-{uuid.uuid4().hex[:10]}", f"tok-tls-{uuid.uuid4().hex[:10]}")
UPSTREAM_KEY = f"upstream-tls-{uuid.uuid4().hex[:10]}"


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1/localhost and its key, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sluice-test-redis")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "redis.crt", directory / "redis.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def _tls_client(port: int, **kwargs) -> redis.Redis:
    return redis.Redis(
        host="127.0.0.1",
        port=port,
        password=PASSWORD,
        ssl=True,
        ssl_cert_reqs="none",
        socket_timeout=2,
        socket_connect_timeout=2,
        **kwargs,
    )


def _start_tls_redis(runner: ProcessRunner, workdir: Path, cert: Path, key: Path) -> RedisServer:
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not on PATH (make test installs it)")
    workdir.mkdir(parents=True, exist_ok=True)
    last: BaseException | None = None
    for _ in range(3):
        port = free_port()
        proc = runner.start(
            "redis",
            [
                exe,
                "--port",
                "0",
                "--tls-port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--tls-cert-file",
                str(cert),
                "--tls-key-file",
                str(key),
                "--tls-ca-cert-file",
                str(cert),
                "--tls-auth-clients",
                "no",
                "--requirepass",
                PASSWORD,
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(workdir),
                *REDIS_KEEP_ENVIRON,
            ],
            stop_stage=0,
        )
        client = _tls_client(port)
        try:
            wait_until(
                client.ping,
                timeout=20,
                message=f"redis-server (TLS) on port {port} to answer PING",
                ignore=(redis.ConnectionError, redis.TimeoutError, OSError),
                check=runner.check_alive,
            )
            return RedisServer(port, f"rediss://:{PASSWORD}@127.0.0.1:{port}/0", proc, runner)
        except ProcessDied as exc:
            proc.stopping = True
            if "tls" in proc.tail().lower() and "not supported" in proc.tail().lower():
                pytest.skip("this redis-server was built without TLS")
            last = exc  # most likely the port was taken in the meantime: retry
        finally:
            client.close()
    raise AssertionError(f"could not start a TLS redis-server: {last}")


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    root = tmp_path_factory.mktemp("tls")
    cert, key = _self_signed(root / "certs")
    runner = ProcessRunner(root / "logs")
    try:
        server = _start_tls_redis(runner, root / "redis", cert, key)
        env0 = base_env()
        mock = start_mock(runner, "default", MockSpec(), env=env0)
        data_dir = root / "data"
        data_dir.mkdir()
        env = {
            **env0,
            "REDIS_URL": server.url,
            "SLUICE_DATA_DIR": str(data_dir),
            "SLUICE_API_TOKENS": ",".join(TOKENS),
            "SLUICE_UPSTREAM_URL": mock.url,
            "SLUICE_UPSTREAM_API_KEY": UPSTREAM_KEY,
            "SLUICE_LOG_LEVEL": "debug",
            "SLUICE_SHUTDOWN_GRACE_S": "2",
        }
        web_port = free_port()
        runner.start("web", sluice_cmd("web"), env={**env, "PORT": str(web_port)})
        for i in range(2):
            runner.start(f"worker-{i + 1}", sluice_cmd("worker"), env=env)
        runner.start("finalizer", sluice_cmd("finalizer"), env=env)
        stack = Stack(
            name="tls",
            runner=runner,
            redis_server=server,
            port=web_port,
            mock_port=mock.port,
            data_dir=data_dir,
            env=env,
            tokens=TOKENS,
            mocks={"default": mock},
        )
        mock.wait_ready(runner)
        stack.wait_healthy()
        yield stack, cert
    finally:
        died = runner.close()
    assert not died, "process(es) exited before teardown:\n" + runner.tails(died)


def test_plain_tcp_is_refused(tls):
    """The server really speaks TLS only: a plain client gets nowhere."""
    stack, _ = tls
    plain = redis.Redis(
        host="127.0.0.1", port=stack.redis.port, password=PASSWORD, socket_timeout=2, socket_connect_timeout=2
    )
    try:
        with pytest.raises((redis.ConnectionError, redis.TimeoutError)):
            plain.ping()
    finally:
        plain.close()


def test_batch_completes_over_rediss(tls):
    stack, _ = tls
    assert stack.http("GET", "/readyz", token=None).status == 200
    client = stack.client()
    run = uuid.uuid4().hex[:8]
    rows = [stack.chat_line(f"tls-{run}-{i:02d}", f"over tls {i}") for i in range(20)]
    rows.append(stack.chat_line(f"tls-{run}-404", "not found", mock_status=404))
    _, created = stack.submit(rows, client=client)
    batch = stack.wait_for_batch(created.id, client=client, timeout=60)
    assert batch.status == "completed", batch
    assert batch.request_counts.total == 21
    assert batch.request_counts.completed == 20 and batch.request_counts.failed == 1, batch.request_counts
    out, err = stack.results(batch, client=client)
    assert sorted(line["custom_id"] for line in out) == sorted(f"tls-{run}-{i:02d}" for i in range(20))
    assert [line["custom_id"] for line in err] == [f"tls-{run}-404"]
    assert all(line["response"]["status_code"] == 200 for line in out)

    # The data really went through the TLS server.
    client_tls = _tls_client(stack.redis.port)
    try:
        assert client_tls.dbsize() > 0
    finally:
        client_tls.close()
    stack.check_alive()


def test_tokens_command_over_rediss(tls):
    """``sluice tokens`` builds its client like the services do, so rediss:// works there too."""
    stack, _ = tls
    name = f"tls-team-{uuid.uuid4().hex[:6]}"
    created = stack.sluice("tokens", "create", "--name", name, check=True)
    token = created.stdout.strip()
    assert token.startswith("sk-sluice-"), created.stdout
    listed = stack.sluice("tokens", "list", "--json", check=True)
    assert name in listed.stdout
    assert token not in listed.stdout

    client = stack.client(token=token)
    run = uuid.uuid4().hex[:8]
    _, created_batch = stack.submit([stack.chat_line(f"tok-{run}", "hello")], client=client)
    assert stack.wait_for_batch(created_batch.id, client=client, timeout=30).status == "completed"
    stack.sluice("tokens", "revoke", name, check=True)


def _ping(url: str) -> bool:
    from service.core.config import Settings
    from service.core.connections import connect

    async def go() -> bool:
        r = connect(Settings(redis_url=url), max_connections=1)
        try:
            return bool(await asyncio.wait_for(r.ping(), timeout=10))
        finally:
            await r.aclose()

    return asyncio.run(go())


def test_certificate_verification_is_opt_in(tls):
    """Default: encrypted, certificate not checked. ``ssl_cert_reqs=required`` in the URL checks it."""
    stack, cert = tls
    port = stack.redis.port
    base = f"rediss://:{PASSWORD}@127.0.0.1:{port}/0"
    assert _ping(base)
    # Verified against the right CA (the certificate names 127.0.0.1, so the host name checks out).
    assert _ping(f"{base}?ssl_cert_reqs=required&ssl_ca_certs={cert}")
    # Verified against the system CAs: a self-signed certificate is refused.
    with pytest.raises(redis.exceptions.ConnectionError, match="(?i)certificate"):
        _ping(f"{base}?ssl_cert_reqs=required")


def test_no_secret_in_the_logs_of_the_tls_stack(tls):
    """Runs last in this module: stops the Sluice processes, then reads every log."""
    stack, _ = tls
    # A rejected token and a failed request go through the logged paths as well.
    assert stack.http("GET", "/v1/batches", token=f"sk-wrong-{uuid.uuid4().hex}").status == 401
    stack.runner.stop([p for p in stack.processes if p.name != "redis"])
    for secret in (PASSWORD, UPSTREAM_KEY, *TOKENS):
        assert stack.logs_containing(secret) == [], f"{secret!r} appears in a process log"
    # The processes did log (as JSON, with the batch and the provider on each line about a line).
    worker_log = stack.process("worker-1").log_path.read_text() + stack.process("worker-2").log_path.read_text()
    assert '"event": "worker_started"' in worker_log
    assert '"event": "line_done"' in worker_log and '"provider": "default"' in worker_log
