"""The dashboard's static page is public; the cluster and history JSON it shows need a token (any token)."""

from __future__ import annotations

import pytest

from service.core import store
from service.core.counters import Attempts
from service.web import appkeys

from .conftest import NO_AUTH, TOKEN_B, jsonl, line


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
        # No worker runs in unit tests; the app's own web process beats.
        assert [(p["role"], p["live"], p["state"]) for p in body["processes"]] == [("web", True, "serving")]
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


async def test_history_serves_what_recording_counted(api):
    (await api.request("GET", "/v1/sluice/history", token=NO_AUTH)).error(401, code="invalid_api_key")
    (await api.request("GET", "/v1/sluice/history?minutes=0")).error(400, param="minutes", code="invalid_value")
    (await api.request("GET", "/v1/sluice/history?minutes=1441")).error(400, param="minutes", code="invalid_value")
    (await api.request("GET", "/v1/sluice/history?minutes=x")).error(400, param="minutes", code="invalid_type")
    empty = (await api.request("GET", "/v1/sluice/history")).ok()
    assert empty["object"] == "sluice.history" and len(empty["minutes"]) == 60
    assert empty["providers"]["default"]["completed"] == [0] * 60
    assert empty["total"]["latency_p50_s"] == [None] * 60

    b = await api.run_batch(jsonl([line("a"), line("b"), line("c")]))
    assert b["status"] == "in_progress"
    r = api.client.app[appkeys.REDIS]
    fast, slow = Attempts("default"), Attempts("default")
    fast.add("200", 0.04)
    slow.add("429", 0.02)
    slow.add("200", 0.3)
    await store.record_results(
        r,
        b["id"],
        [
            (0, "", "completed", b"{}", *fast.encode("completed")),
            (1, "", "completed", b"{}", *slow.encode("completed")),
            (2, "", "failed", b"{}"),
        ],
    )
    body = (await api.request("GET", "/sluice/history?minutes=2", token=TOKEN_B)).ok()
    assert body["minutes"][1] - body["minutes"][0] == body["minute_s"] == 60
    assert body["minutes"][1] <= body["now"] < body["minutes"][1] + 60
    # Both minutes: the recording may have happened just before the minute turned.
    now = {name: next((v for v in reversed(series) if v), None) for name, series in body["total"].items()}
    assert now["completed"] == 2 and now["failed"] == 1  # the unsent line counts in the totals only
    assert now["requests"] == 3 and now["rate_limited"] == 1
    assert now["latency_mean_s"] == pytest.approx(0.12)
    assert 0.025 < now["latency_p50_s"] <= 0.05
    default = body["providers"]["default"]
    assert (sum(default["completed"]), sum(default["failed"]), sum(default["requests"])) == (2, 0, 3)
