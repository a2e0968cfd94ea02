"""Auth, routing errors and health endpoints."""

from __future__ import annotations

import pytest

from .conftest import NO_AUTH, TOKEN_B


@pytest.mark.parametrize("path", ["/v1/files", "/v1/batches", "/files", "/batches"])
async def test_missing_authorization_header_is_401(api, path):
    resp = await api.request("GET", path, token=NO_AUTH)
    resp.error(401, code="invalid_api_key", param=None)


@pytest.mark.parametrize("header", ["Basic tok-a", "Token tok-a", "tok-a", "Bearer", "Bearer ", "Bearer    "])
async def test_wrong_scheme_or_empty_token_is_401(api, header):
    resp = await api.request("GET", "/v1/files", token=None, headers={"Authorization": header})
    resp.error(401, code="invalid_api_key", param=None)


@pytest.mark.parametrize("token", ["nope", "tok-a2", "tok-", "TOK-A"])
async def test_unknown_token_is_401(api, token):
    resp = await api.request("GET", "/v1/batches", token=token)
    resp.error(401, code="invalid_api_key", param=None)


async def test_second_token_is_accepted(api):
    body = (await api.list_files(token=TOKEN_B)).ok()
    assert body == {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}


async def test_auth_is_checked_before_body_parsing(api):
    resp = await api.request(
        "POST", "/v1/batches", token=NO_AUTH, data=b"{not json", headers={"Content-Type": "application/json"}
    )
    resp.error(401, code="invalid_api_key")


async def test_healthz_needs_no_auth(api):
    resp = await api.request("GET", "/healthz", token=NO_AUTH)
    assert resp.ok() == {"status": "ok"}


async def test_readyz_needs_no_auth(api):
    resp = await api.request("GET", "/readyz", token=NO_AUTH)
    assert resp.ok() == {"status": "ok"}


@pytest.mark.parametrize("path", ["/v1/nothing", "/v1/files/file-x/nothing", "/v2/files", "/", "/v1/batches/x/y/z"])
async def test_unknown_route_is_404_envelope(api, path):
    resp = await api.request("GET", path)
    resp.error(404)
    assert "html" not in resp.content_type


@pytest.mark.parametrize(
    "method,path",
    [
        ("PUT", "/v1/files"),
        ("DELETE", "/v1/batches"),
        ("PATCH", "/v1/batches"),
        ("POST", "/v1/files/file-000000000001aaaaaaaaaaaa"),
        ("GET", "/v1/batches/batch_000000000001aaaaaaaaaaaa/cancel"),
        ("DELETE", "/v1/batches/batch_000000000001aaaaaaaaaaaa"),
        ("PUT", "/files"),
    ],
)
async def test_wrong_method_is_405_envelope(api, method, path):
    resp = await api.request(method, path)
    resp.error(405)
    assert "html" not in resp.content_type
