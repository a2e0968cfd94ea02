"""Webhooks only reach public addresses: refused at batch creation, and again when the sender connects.

The receivers here listen on 127.0.0.1, so a delivery that arrives at all proves a check was missed.
"""

from __future__ import annotations

import base64
import ipaddress

import pytest
from aiohttp import web

from service.core import keys, shards, store, webhooks
from service.core.config import ConfigError, Settings
from service.core.webhooks import (
    HEADER,
    WebhookSender,
    forbidden_reason,
    literal_address,
)
from service.web.appkeys import REDIS

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
PUBLIC = "93.184.215.14"  # a public address (no DNS needed)


async def _create(api, url: str):
    f = await api.upload_ok()
    return await api.request(
        "POST",
        "/v1/batches",
        headers={HEADER: url},
        json={"input_file_id": f["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"},
    )


@pytest.mark.parametrize(
    "url,why",
    [
        ("http://127.0.0.1:6379/", "loopback"),
        ("http://[::1]:8000/", "loopback"),
        ("http://0x7f000001/", "loopback"),
        ("http://2130706433/", "loopback"),
        ("http://127.1/", "loopback"),
        ("http://0177.0.0.1/", "loopback"),
        ("http://127.0.0.1./hook", "loopback"),
        ("http://[::ffff:127.0.0.1]/", "loopback"),
        ("http://localhost:9/", "loopback"),
        ("http://LOCALHOST/hook", "loopback"),
        ("http://10.1.2.3/", "private"),
        ("http://172.16.0.1/", "private"),
        ("http://192.168.1.1/", "private"),
        ("http://169.254.1.1/", "link-local"),
        ("http://[fe80::1]/", "link-local"),
        ("http://[fd12:3456::1]/", "unique-local"),
        ("http://100.64.0.1/", "CGNAT"),
        ("http://0.0.0.0:8000/", "unspecified"),
        ("http://[::]/", "unspecified"),
        ("http://224.0.0.1/", "multicast"),
        ("http://[ff02::1]/", "multicast"),
        ("http://169.254.169.254/latest/meta-data/", "metadata"),
        ("http://[fd00:ec2::254]/", "metadata"),
        ("http://metadata.google.internal/computeMetadata/v1/", "metadata"),
        ("http://1.2.3.4.5/", "not a valid IPv4 address"),
    ],
)
async def test_non_public_webhook_target_refused_at_creation(make_api, url, why):
    api = await make_api(webhook_secret=SECRET)
    res = await _create(api, url)
    err = res.error(400, param=HEADER, code="webhook_target_forbidden")
    assert why in err["message"], err["message"]
    assert (await api.request("GET", "/v1/batches")).ok()["data"] == []


async def test_public_target_accepted_and_private_ones_when_allowed(make_api):
    api = await make_api(webhook_secret=SECRET)
    assert (await _create(api, f"https://{PUBLIC}/hook")).ok()["status"] == "validating"
    dev = await make_api(webhook_secret=SECRET, webhook_allow_private=True)
    assert (await _create(dev, "http://127.0.0.1:9/hook")).ok()["status"] == "validating"


def test_allow_private_setting():
    assert Settings.from_env({}).webhook_allow_private is False
    for raw, value in (("1", True), ("true", True), ("yes", True), ("0", False), ("off", False)):
        assert Settings.from_env({"SLUICE_WEBHOOK_ALLOW_PRIVATE": raw}).webhook_allow_private is value
    with pytest.raises(ConfigError, match="SLUICE_WEBHOOK_ALLOW_PRIVATE"):
        Settings.from_env({"SLUICE_WEBHOOK_ALLOW_PRIVATE": "maybe"})


@pytest.mark.parametrize(
    "host,address",
    [
        ("0x7f000001", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("10.0x10.1", "10.16.0.1"),
        ("127.0.0.1.", "127.0.0.1"),
        ("::ffff:7f00:1", "::ffff:7f00:1"),
        ("fe80::1%eth0", "fe80::1"),
        ("example.com", None),
        ("1example", None),
    ],
)
def test_literal_addresses_in_every_spelling(host, address):
    got = literal_address(host)
    assert (str(got) if got is not None else None) == address


@pytest.mark.parametrize(
    "address,public",
    [
        ("8.8.8.8", True),
        ("2606:4700::1111", True),
        ("127.0.0.2", False),
        ("192.0.0.192", False),
        ("2002:7f00:1::", False),  # 6to4 around 127.0.0.1
        ("64:ff9b::a00:1", False),  # NAT64 around 10.0.0.1
        ("64:ff9b::808:808", True),  # NAT64 around 8.8.8.8
        ("255.255.255.255", False),
        ("198.18.0.1", False),
    ],
)
def test_forbidden_reason(address, public):
    assert (forbidden_reason(ipaddress.ip_address(address)) is None) == public


@pytest.fixture
async def receiver(aiohttp_server):
    got: list[bytes] = []

    async def receive(request: web.Request) -> web.Response:
        got.append(await request.read())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", receive)
    server = await aiohttp_server(app, host="127.0.0.1")
    server.got = got
    return server


async def _finished_batch_with_webhook(api, url: str) -> str:
    created = (await _create(api, url)).ok()
    await api.wait_batch(created["id"])
    r = api.client.app[REDIS]
    applied, _ = await store.transition(
        r,
        created["id"],
        allowed=["in_progress", "failed"],
        fields={"status": "cancelled", "cancelled_at": store.now()},
        expire_s=3600,
    )
    assert applied
    return created["id"]


async def _one_pass(api) -> None:
    sender = WebhookSender(api.client.app[REDIS], api.settings)
    try:
        assert await sender.run_pass() == 1
    finally:
        await sender.aclose()


async def test_name_resolving_to_loopback_when_sent_is_refused(make_api, receiver, monkeypatch):
    # At creation the name resolves to a public address; by the time the webhook is sent it
    # resolves to 127.0.0.1 (DNS rebinding). The creation-time lookup is the one replaced here;
    # the sender resolves "localhost" for real.
    async def public(host, port):
        return [ipaddress.ip_address(PUBLIC)]

    monkeypatch.setattr(webhooks, "resolve", public)
    api = await make_api(webhook_secret=SECRET, webhook_backoff_s=0.01)
    batch_id = await _finished_batch_with_webhook(api, f"http://localhost:{receiver.port}/hook")
    await _one_pass(api)
    assert receiver.got == []
    r = api.client.app[REDIS]
    assert await r.hget(keys.batch(batch_id), "webhook_state") == b"refused"
    assert await shards.count(r, keys.webhooks_due, zset=True) == 0  # not retried
    # The same receiver is reachable when private targets are allowed: the refusal was the check.
    dev = await make_api(webhook_secret=SECRET, webhook_allow_private=True)
    await _finished_batch_with_webhook(dev, f"http://localhost:{receiver.port}/hook")
    await _one_pass(dev)
    assert len(receiver.got) == 1


async def test_stored_loopback_address_is_refused_when_sent(make_api, receiver):
    # A URL recorded before targets were checked (or by any other way round the creation check).
    api = await make_api(webhook_secret=SECRET, webhook_backoff_s=0.01)
    batch_id = await _finished_batch_with_webhook(api, f"https://{PUBLIC}/hook")
    r = api.client.app[REDIS]
    await r.hset(keys.batch(batch_id), "webhook_url", f"http://127.0.0.1:{receiver.port}/hook")
    await _one_pass(api)
    assert receiver.got == []
    assert await r.hget(keys.batch(batch_id), "webhook_state") == b"refused"
