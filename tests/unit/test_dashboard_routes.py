"""The dashboard's static page is public; the cluster JSON it shows needs a token (any token)."""

from __future__ import annotations

from .conftest import NO_AUTH, TOKEN_B


async def test_page_and_assets_need_no_token(api):
    r = await api.request("GET", "/dashboard", token=NO_AUTH, allow_redirects=False)
    assert r.status == 302 and r.headers["Location"] == "/dashboard/"
    page = await api.request("GET", "/dashboard/", token=NO_AUTH)
    assert page.status == 200 and page.content_type.startswith("text/html")
    assert b'src="app.js"' in page.body and b'href="style.css"' in page.body
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        asset = await api.request("GET", f"/dashboard/{name}", token=NO_AUTH)
        assert asset.status == 200 and asset.content_type.startswith(kind) and asset.body


async def test_unknown_dashboard_paths_are_not_public(api):
    # Only the known assets are public: anything else under /dashboard/ wants a token, then is a 404.
    (await api.request("GET", "/dashboard/../service/web/api.py", token=NO_AUTH)).error(401, code="invalid_api_key")
    (await api.request("GET", "/dashboard/secret.txt", token=NO_AUTH)).error(401, code="invalid_api_key")
    (await api.request("GET", "/dashboard/secret.txt")).error(404, code="unknown_url")


async def test_cluster_needs_a_valid_token(api):
    (await api.request("GET", "/v1/sluice/cluster", token=NO_AUTH)).error(401, code="invalid_api_key")
    (await api.request("GET", "/v1/sluice/cluster", token="nope")).error(401, code="invalid_api_key")
    for token in (None, TOKEN_B):
        kwargs = {} if token is None else {"token": token}
        body = (await api.request("GET", "/v1/sluice/cluster", **kwargs)).ok()
        assert body["object"] == "sluice.cluster"
        assert body["processes"] == []  # no worker runs in unit tests
        assert [p["name"] for p in body["providers"]] == ["default"]
        assert body["providers"][0]["state"] == "ok"
        # Adaptive concurrency: the limit now (the window's start, no worker has run) and no bound yet.
        assert body["providers"][0]["adaptive"] is True and body["providers"][0]["concurrency_limit"] == 16
        assert set(body["lines"]) == {"completed", "failed"}
        assert set(body["running_batches"]) == {"total", "yours"}
    assert (await api.request("GET", "/sluice/cluster")).ok()["object"] == "sluice.cluster"


async def test_cluster_counts_only_the_callers_batches_as_yours(api):
    f = await api.upload_ok()
    b = (await api.create_batch(f["id"])).ok()
    assert (await api.wait_batch(b["id"]))["status"] == "in_progress"
    mine = (await api.request("GET", "/v1/sluice/cluster")).ok()["running_batches"]
    theirs = (await api.request("GET", "/v1/sluice/cluster", token=TOKEN_B)).ok()["running_batches"]
    assert mine == {"total": 1, "yours": 1}
    assert theirs == {"total": 1, "yours": 0}
