"""The HTTP edge of a real web process: exact deletes under a race, and what a hostile client can hold.

Each limit has its own test, and each shows an honest client served while the hostile one is
refused: too many form fields, a declared body too large (413 before any byte of it), half-sent
request heads (closed by the header timeout), a stalled upload (aborted, its partial file removed),
and the leftovers of an upload whose web process was SIGKILLed (removed at start-up).

The edge stack runs with short timeouts (2 s) so that the tests wait little; every wait on them is
bounded far above (30-60 s), and lower bounds are asserted only where the server guarantees them.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import statistics
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from service.core import keys, store

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

TIMEOUT_S = 2.0  # header and body-idle timeouts of the edge stack
BOUNDARY = "edgeBoundary7f3a"


@pytest.fixture(scope="module")
def estack(module_stack_factory):
    return module_stack_factory.start(
        name="edge",
        workers=0,
        finalizer=False,
        env={"SLUICE_HEADER_TIMEOUT_S": str(TIMEOUT_S), "SLUICE_BODY_IDLE_TIMEOUT_S": str(TIMEOUT_S)},
    )


# ----------------------------------------------------------------------------- raw HTTP
def _part(name: str, value: bytes, filename: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    head = f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n"
    if filename:
        head += "Content-Type: application/octet-stream\r\n"
    return head.encode() + b"\r\n" + value + b"\r\n"


def _form(*parts: bytes) -> bytes:
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def _head(
    method: str, path: str, token: str, length: int, *, content_type: str | None = None, extra: str = ""
) -> bytes:
    ctype = content_type or f"multipart/form-data; boundary={BOUNDARY}"
    return (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: {ctype}\r\nContent-Length: {length}\r\n{extra}\r\n"
    ).encode()


def _connect(stack, timeout: float = 30.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", stack.port), timeout=timeout)


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response (skipping interim 1xx ones) from ``sock``; the socket's timeout bounds the wait."""
    buf = b""
    while True:
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed before a complete response: {buf[:200]!r}")
            buf += chunk
        head, _, buf = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        if 100 <= status < 200:
            continue
        length = int(headers.get("content-length", "0"))
        while len(buf) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
        return status, headers, buf[:length]


def _error_code(body: bytes) -> str | None:
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    return err["code"]


def _honest_upload(stack) -> float:
    """Upload a small file with a fresh connection; return how long it took (asserting a 200)."""
    rows = [stack.chat_line(f"honest-{uuid.uuid4().hex[:8]}", "hi")]
    body = _form(_part("purpose", b"batch"), _part("file", stack.to_jsonl(rows), "honest.jsonl"))
    started = time.monotonic()
    res = stack.http(
        "POST",
        "/v1/files",
        data=body,
        timeout=30,
        headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
    )
    assert res.status == 200, res.body[:300]
    return time.monotonic() - started


def _tmp_files(stack) -> list[Path]:
    tmp = stack.data_dir / "tmp"
    return sorted(tmp.iterdir()) if tmp.exists() else []


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------- exact deletes
@pytest.mark.single_redis
def test_racing_deletes_exactly_one_200_and_usage_to_the_byte(estack):
    r = estack.redis.client()
    owner = store.owner_of(estack.token)
    figures = []
    for round_no in range(5):
        rows = [estack.chat_line(f"del-{round_no}-{i}", "x" * (50 + round_no)) for i in range(3)]
        f = estack.upload_jsonl(rows)
        before = int(r.hget(keys.owner_usage(owner), "stored_bytes") or 0)
        start = threading.Barrier(20)

        def delete(_: int, start=start, f=f):
            start.wait(timeout=30)
            return estack.http("DELETE", f"/v1/files/{f.id}", timeout=30)

        with ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(delete, range(20)))
        statuses = sorted(a.status for a in answers)
        figures.append(statuses.count(200))
        assert statuses == [200] + [404] * 19, statuses
        for a in answers:
            if a.status == 200:
                assert a.json() == {"id": f.id, "object": "file", "deleted": True}
            else:
                estack.assert_error(a, 404, param="file_id")
        after = int(r.hget(keys.owner_usage(owner), "stored_bytes") or 0)
        assert before - after == f.bytes, (before, after, f.bytes)
        assert not (estack.data_dir / "files" / f.id).exists()
    print(f"\nracing deletes: 200s per round of 20 = {figures}")


# ----------------------------------------------------------------------------- form fields
def test_too_many_form_fields_refused_before_the_rest_is_read(estack):
    fields = [_part("purpose", b"batch") for _ in range(100_000)]
    body = _form(*fields)
    # Only the first 1,000 fields are sent, and the body is then held back: the answer must come
    # from what arrived, as soon as the cap was passed.
    sent = b"".join(fields[:1000])
    with _connect(estack) as sock:
        sock.sendall(_head("POST", "/v1/files", estack.token, len(body)) + sent)
        status, headers, reply = _read_response(sock)
        honest_s = _honest_upload(estack)  # served while the hostile connection is still open
    assert status == 400, reply[:300]
    assert _error_code(reply) == "too_many_fields"
    assert headers.get("connection", "").lower() == "close"
    print(f"\nhonest upload next to a held-back 100,000-field body: {honest_s:.3f} s")


def test_100k_field_body_refused_fast_while_others_are_served(estack):
    body = _form(*(_part("purpose", b"batch") for _ in range(100_000)))
    web = estack.process("web")
    outcome: dict = {}

    def hostile() -> None:
        with _connect(estack) as sock:
            started = time.monotonic()
            sock.sendall(_head("POST", "/v1/files", estack.token, len(body)) + body)
            status, _, reply = _read_response(sock)
            outcome.update(status=status, code=_error_code(reply), seconds=time.monotonic() - started)

    cpu_before = _cpu_s(web.pid)
    thread = threading.Thread(target=hostile)
    thread.start()
    honest = [_honest_upload(estack)]
    while thread.is_alive() and len(honest) < 50:
        honest.append(_honest_upload(estack))
    thread.join(60)
    cpu_s = _cpu_s(web.pid) - cpu_before
    assert outcome.get("status") == 400 and outcome.get("code") == "too_many_fields", outcome
    # "Well under a second", with a margin of 10x for a busy machine.
    assert outcome["seconds"] < 10, outcome
    print(
        f"\n100,000 fields ({len(body)} bytes): refused in {outcome['seconds']:.3f} s; web CPU {cpu_s:.2f} s "
        f"(hostile + {len(honest)} honest); honest uploads meanwhile: max {max(honest):.3f} s, "
        f"median {statistics.median(honest):.3f} s"
    )


# ----------------------------------------------------------------------------- declared size
def test_declared_10_gib_upload_is_413_before_any_body(estack):
    ten_gib = 10 * 1024**3
    with _connect(estack) as upload, _connect(estack) as expecting, _connect(estack) as create:
        upload.sendall(_head("POST", "/v1/files", estack.token, ten_gib))
        expecting.sendall(_head("POST", "/v1/files", estack.token, ten_gib, extra="Expect: 100-continue\r\n"))
        create.sendall(_head("POST", "/v1/batches", estack.token, 2 * 1024 * 1024, content_type="application/json"))
        # Not a byte of any body is sent.
        status, headers, body = _read_response(upload)
        assert status == 413, body[:300]
        assert _error_code(body) == "file_too_large"
        assert json.loads(body)["error"]["param"] == "file"
        assert headers.get("connection", "").lower() == "close"
        raw = expecting.recv(12)
        assert raw.startswith(b"HTTP/1.1 413"), raw  # no "100 Continue" first: the client need not send
        status, _, body = _read_response(create)
        assert status == 413 and _error_code(body) == "request_too_large", body[:300]
        # The hostile connections are still open, and an honest client is served.
        honest_s = _honest_upload(estack)
    print(f"\nhonest upload next to three over-limit declarations: {honest_s:.3f} s")


# ----------------------------------------------------------------------------- request heads
def test_half_sent_request_heads_are_closed_by_the_header_timeout(estack):
    half = (
        b"POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + estack.token.encode() + b"\r\nConte"
    )
    socks: list[tuple[socket.socket, float]] = []
    try:
        for _ in range(300):
            # Timestamps are taken before the server can have seen the connection (or request).
            connecting = time.monotonic()
            sock = _connect(estack)
            sock.sendall(half)
            socks.append((sock, connecting))
        # A keep-alive connection that sends half of its second request head, and one that sends
        # it pipelined behind a complete one: both get the same deadline, from their last response.
        follow_ups = []
        for second in (b"", b"GET /hea"):
            sock = _connect(estack)
            asked = time.monotonic()
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" + second)
            assert _read_response(sock)[0] == 200
            if not second:
                sock.sendall(b"GET /heal")
            follow_ups.append((sock, asked))
        honest_started = time.monotonic()
        assert estack.http("GET", "/v1/files", timeout=30).status == 200
        honest_s = time.monotonic() - honest_started

        closed_after: list[float] = []
        selector = selectors.DefaultSelector()
        for sock, since in socks + follow_ups:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, since)
        deadline = time.monotonic() + 60
        while len(closed_after) < len(socks) + len(follow_ups) and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=1):
                try:
                    data = key.fileobj.recv(4096)
                except ConnectionResetError:
                    data = b""
                assert data == b"", f"the server answered a half-sent head: {data[:200]!r}"
                closed_after.append(time.monotonic() - key.data)
                selector.unregister(key.fileobj)
        selector.close()
    finally:
        for sock, _ in socks:
            sock.close()
    assert len(closed_after) == len(socks) + 2, f"{len(closed_after)} of {len(socks) + 2} closed within 60 s"
    # The deadline runs from the connection (or the last response): never earlier than that.
    assert min(closed_after) >= TIMEOUT_S - 0.01, min(closed_after)
    print(
        f"\nheader timeout {TIMEOUT_S} s: {len(closed_after)} of {len(socks) + 2} half-head connections closed, "
        f"after {min(closed_after):.2f}-{max(closed_after):.2f} s (median {statistics.median(closed_after):.2f} s);"
        f" honest request meanwhile {honest_s:.3f} s"
    )


# ----------------------------------------------------------------------------- request bodies
def test_stalled_upload_is_aborted_and_its_partial_file_removed(estack, wait_until):
    content = b'{"custom_id": "stall", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n' * 20_000
    body = _form(_part("purpose", b"batch"), _part("file", content, "stalled.jsonl"))
    sent = body[: len(body) // 2]
    assert _tmp_files(estack) == []
    with _connect(estack) as sock:
        stalled_at = time.monotonic()  # no later than the server's last read
        sock.sendall(_head("POST", "/v1/files", estack.token, len(body)) + sent)
        # The first half is being stored: a partial file exists ...
        wait_until(
            lambda: any(p.stat().st_size > 0 for p in _tmp_files(estack)),
            timeout=30,
            message="the partial upload in the tmp folder",
            ignore=(FileNotFoundError,),
        )
        honest_s = _honest_upload(estack)  # ... while an honest client is served
        status, headers, reply = _read_response(sock)
        answered_after = time.monotonic() - stalled_at
    assert status == 408, reply[:300]
    assert _error_code(reply) == "request_timeout"
    assert headers.get("connection", "").lower() == "close"
    assert answered_after >= TIMEOUT_S - 0.01
    # ... and is gone once the upload is aborted; nothing was recorded.
    wait_until(lambda: _tmp_files(estack) == [], timeout=30, message="the partial file to be removed")
    names = [f["filename"] for f in estack.http("GET", "/v1/files", timeout=30).json()["data"]]
    assert "stalled.jsonl" not in names
    # A JSON body that stalls is aborted the same way.
    with _connect(estack) as sock:
        sock.sendall(_head("POST", "/v1/batches", estack.token, 100, content_type="application/json") + b'{"input')
        status, _, reply = _read_response(sock)
    assert status == 408 and _error_code(reply) == "request_timeout", reply[:300]
    print(
        f"\nstalled upload aborted {answered_after:.2f} s after its last byte (body idle timeout {TIMEOUT_S} s); "
        f"honest upload meanwhile {honest_s:.3f} s"
    )


# ----------------------------------------------------------------------------- leftovers
@pytest.mark.single_redis
def test_tmp_orphans_of_a_killed_upload_are_removed_at_start_up(stack_factory, wait_until):
    stack = stack_factory.start(
        name="orphans", workers=0, finalizer=False, env={"SLUICE_BODY_IDLE_TIMEOUT_S": str(TIMEOUT_S)}
    )
    r = stack.redis.client()
    owner = store.owner_of(stack.token)
    chunk = b'{"custom_id": "big", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n' * 12_000
    declared = 100 * 1024 * 1024
    head = _part("purpose", b"batch") + (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'.encode()
    )
    with _connect(stack) as sock:
        sock.sendall(_head("POST", "/v1/files", stack.token, declared) + head + chunk)
        wait_until(
            lambda: any(p.stat().st_size >= len(chunk) // 2 for p in _tmp_files(stack)),
            timeout=30,
            message="the upload to be under way",
            ignore=(FileNotFoundError,),
        )
        web = stack.process("web")
        web.stopping = True
        web.signal(signal.SIGKILL)
        web.popen.wait(timeout=15)
    [killed] = _tmp_files(stack)
    assert int(r.hget(keys.owner_usage(owner), "stored_bytes") or 0) == 0  # never counted
    # As if it had been left for an hour; a peer web process's live upload is fresh.
    hour_ago = time.time() - 3600
    os.utime(killed, (hour_ago, hour_ago))
    planted = stack.data_dir / "tmp" / "file-000000000099abcdefabcdef.0badf00d"
    planted.write_bytes(b"left over")
    os.utime(planted, (hour_ago, hour_ago))
    live = stack.data_dir / "tmp" / "file-000000000098abcdefabcdef.1234abcd"
    live.write_bytes(b"a peer's upload in progress")

    stack.spawn("web")
    stack.wait_healthy()
    wait_until(
        lambda: not killed.exists() and not planted.exists(),
        timeout=30,
        message="the orphaned tmp files to be removed at start-up",
        check=stack.check_alive,
    )
    assert live.exists()
    assert _honest_upload(stack) >= 0
