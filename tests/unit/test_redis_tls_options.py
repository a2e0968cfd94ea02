"""How ``connect()`` treats ``rediss://`` URLs: encrypted without verification unless the URL asks."""

from __future__ import annotations

import ssl

import pytest

from service.core.config import Settings
from service.core.connections import connect, tls_options


@pytest.mark.parametrize(
    "url, expected",
    [
        ("redis://localhost:6379/0", {}),
        ("unix:///tmp/redis.sock", {}),
        ("rediss://:pw@redis.example:6380/0", {"ssl_cert_reqs": "none"}),
        ("REDISS://redis.example:6380", {"ssl_cert_reqs": "none"}),
        ("rediss://redis.example:6380/0?ssl_cert_reqs=required&ssl_ca_certs=/etc/ca.pem", {}),
        ("rediss://redis.example:6380/0?ssl_check_hostname=false", {"ssl_cert_reqs": "none"}),
    ],
)
def test_tls_options(url, expected):
    assert tls_options(url) == expected


async def test_connect_builds_tls_clients():
    plain = connect(Settings(redis_url="redis://127.0.0.1:1/0"))
    default = connect(Settings(redis_url="rediss://:pw@127.0.0.1:1/0"))
    verified = connect(Settings(redis_url="rediss://127.0.0.1:1/0?ssl_cert_reqs=required&ssl_ca_certs=/etc/ca.pem"))
    try:
        assert "ssl_context" not in plain.connection_pool.connection_kwargs
        kwargs = default.connection_pool.connection_kwargs
        assert kwargs["ssl_cert_reqs"] == "none" and kwargs["password"] == "pw"
        conn = default.connection_pool.connection_class(**kwargs)
        assert conn.ssl_context.cert_reqs == ssl.CERT_NONE and conn.ssl_context.check_hostname is False
        kwargs = verified.connection_pool.connection_kwargs
        conn = verified.connection_pool.connection_class(**kwargs)
        assert conn.ssl_context.cert_reqs == ssl.CERT_REQUIRED and conn.ssl_context.ca_certs == "/etc/ca.pem"
        assert conn.ssl_context.check_hostname is True
    finally:
        for r in (plain, default, verified):
            await r.aclose()
