"""The web dashboard, end to end in a real headless Chromium (Debian's, driven by Playwright).

Sign in with a token, watch a batch submitted through the API reach 100 %, download its output
from the page, cancel a slow batch with the page's button, and look at the cluster view.

Needs /usr/bin/chromium (``make test`` installs Debian's ``chromium`` when it runs as root) and the
``playwright`` Python package (the ``test`` extra); Playwright's own browser download is never used.
Set ``SLUICE_SCREENSHOTS=docs/screenshots`` to write the screenshots of docs/operating.md.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

CHROMIUM = "/usr/bin/chromium"
# What the machine's probe launched Chromium with: no sandbox (root), and no background traffic
# towards hosts a closed network refuses.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = os.environ.get("SLUICE_SCREENSHOTS", "")

if not (os.path.exists(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
    pytest.skip(
        f"{CHROMIUM} is missing: `make test` installs Debian's chromium when run as root "
        "(or: sudo apt-get install chromium)",
        allow_module_level=True,
    )
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package (test extra) is not installed")
expect = sync_api.expect


# Failure deadlines for the page (a headless Chromium on a busy 2-core box is slow), never speeds:
# what must still be running is held at the mock's gate until the test releases it.
PAGE_TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def dstack(module_stack_factory):
    return module_stack_factory.start(name="dashboard", workers=2, worker_concurrency=4, mock={"gates": True})


@pytest.fixture(scope="module")
def browser():
    pw = sync_api.sync_playwright().start()
    try:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()
    finally:
        pw.stop()


@pytest.fixture(autouse=True)
def open_gates(dstack):
    yield
    dstack.mock().reset()  # a test that failed half-way must not leave lines held for the next one


@pytest.fixture
def page(browser, tmp_path):
    context = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 900})
    p = context.new_page()
    p.set_default_timeout(PAGE_TIMEOUT_MS)
    expect.set_options(timeout=PAGE_TIMEOUT_MS)
    errors: list[str] = []
    p.on("pageerror", lambda e: errors.append(str(e)))
    yield p
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def shot(page, name: str) -> None:
    if SCREENSHOTS:
        out = Path(SCREENSHOTS)
        out.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out / f"{name}.png"), full_page=True)


def sign_in(page, dstack, token: str) -> None:
    page.goto(f"{dstack.base_url}/dashboard")
    assert page.url == f"{dstack.base_url}/dashboard/"
    page.fill("#token", token)
    page.click("#login-button")


def row(page, batch_id: str):
    return page.locator(f'#batches tbody tr[data-batch-id="{batch_id}"]')


def test_bad_token_stays_on_the_login_form(dstack, page):
    sign_in(page, dstack, "not-a-token")
    expect(page.locator("#login-error")).to_be_visible()
    expect(page.locator("#login-error")).to_contain_text("rejected")
    expect(page.locator("#batches-view")).to_be_hidden()


def test_progress_download_cancel_and_cluster(dstack, page, wait_until):
    client = dstack.client()
    run = uuid.uuid4().hex[:6]
    sign_in(page, dstack, dstack.token)
    expect(page.locator("#batches-view")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('sluice.token')") == dstack.token

    # A quick batch, with two lines the provider refuses (errors by code: HTTP 404).
    rows = [dstack.chat_line(f"q-{run}-{i:02d}", f"hello {i}") for i in range(38)]
    rows += [dstack.chat_line(f"q-{run}-x{i}", "refused", mock_status=404) for i in range(2)]
    _, quick = dstack.submit(rows, client=client)
    quick_row = row(page, quick.id)
    expect(quick_row).to_be_visible()
    expect(quick_row.locator(".progress")).to_have_attribute("aria-valuenow", "100")
    expect(quick_row.locator(".status")).to_have_text("completed")
    expect(quick_row.locator(".completed")).to_have_text("38")
    expect(quick_row.locator(".failed")).to_have_text("2")
    expect(quick_row.locator(".total")).to_have_text("40")

    # A batch that stays running until the test says so: its lines wait at the mock's gate (the
    # dashboard at work, and a batch to cancel from the page later). It comes second because its
    # held lines take every worker slot.
    gate = f"slow-{run}"
    slow_rows = [dstack.chat_line(f"slow-{run}-{i:02d}", f"slow {i}", mock_hold=gate) for i in range(60)]
    _, slow = dstack.submit(slow_rows, client=client)
    slow_row = row(page, slow.id)
    expect(slow_row).to_be_visible()
    expect(slow_row.locator(".status")).to_have_text("in_progress")
    dstack.mock().wait_held(gate)

    # The page followed the running batches through the event stream where the server has one,
    # else by polling each batch (feature detection).
    has_events = dstack.http("GET", f"/v1/batches/{quick.id}/events").status == 200
    assert page.evaluate("state.events") is has_events

    # Details: errors by code, read from the error file.
    quick_row.locator("button.open").click()
    expect(page.locator("#detail")).to_be_visible()
    expect(page.locator('#detail-errors tr[data-code^="HTTP 404"] td.num')).to_have_text("2")
    # The slow batch is still running (held): the screenshot of a dashboard at work.
    expect(slow_row.locator(".status")).to_have_text("in_progress")
    shot(page, "dashboard-batches")

    # Download the output file from the page; it is what the API serves.
    with page.expect_download() as dl_info:
        quick_row.locator(".download-output").click()
    download = dl_info.value
    assert download.suggested_filename.endswith(".jsonl"), download.suggested_filename
    lines = [json.loads(line) for line in Path(download.path()).read_text().splitlines() if line.strip()]
    assert sorted(line["custom_id"] for line in lines) == sorted(f"q-{run}-{i:02d}" for i in range(38))
    assert all(line["response"]["status_code"] == 200 for line in lines)
    assert (
        Path(download.path()).read_bytes()
        == client.files.content(client.batches.retrieve(quick.id).output_file_id).content
    )

    # Cancel the slow batch with its button (two clicks: arm, confirm).
    cancel = slow_row.locator(".cancel")
    cancel.click()
    expect(cancel).to_have_text("Confirm cancel")
    cancel.click()
    wait_until(
        lambda: client.batches.retrieve(slow.id).status in ("cancelling", "cancelled"),
        timeout=60,
        message="the page's cancel to reach the server",
    )
    # Only now may the held lines finish: they drain into the output, the rest end batch_cancelled.
    dstack.mock().release(gate)
    expect(slow_row.locator(".status")).to_have_text("cancelled")
    expect(slow_row.locator(".cancel")).to_be_hidden()
    final = client.batches.retrieve(slow.id)
    assert final.status == "cancelled", final
    assert final.request_counts.failed > 0, final
    expect(slow_row.locator(".download-errors")).to_be_visible()

    # The cluster view: both workers and the finalizer, live; the default provider.
    page.click("#tab-cluster")
    expect(page.locator("#cluster-view")).to_be_visible()
    expect(page.locator('#processes tbody tr[data-role="worker"]')).to_have_count(2)
    expect(page.locator('#processes tbody tr[data-role="finalizer"]')).to_have_count(1)
    for cell in page.locator("#processes tbody tr td .health").all():
        expect(cell).to_have_text("live")
    expect(page.locator('#providers tbody tr[data-provider="default"]')).to_be_visible()
    # Its concurrency limit now and what bounds it (the workers' slots: no max_concurrency here).
    expect(page.locator('#providers tbody tr[data-provider="default"] .concurrency')).to_contain_text("(adaptive)")
    shot(page, "dashboard-cluster")

    # A token that stops being accepted sends the page back to the login form.
    page.evaluate("sessionStorage.setItem('sluice.token', 'revoked-token')")
    page.reload()
    expect(page.locator("#login-view")).to_be_visible()
    expect(page.locator("#login-error")).to_contain_text("rejected")
    assert page.evaluate("sessionStorage.getItem('sluice.token')") is None


def test_falls_back_to_polling_without_an_event_stream(dstack, page):
    # A server without GET /v1/batches/{id}/events answers it with a JSON 404 unknown_url.
    page.route(
        "**/events",
        lambda route: route.fulfill(
            status=404,
            content_type="application/json",
            body=json.dumps(
                {
                    "error": {
                        "message": "Invalid URL",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": "unknown_url",
                    }
                }
            ),
        ),
    )
    sign_in(page, dstack, dstack.token)
    expect(page.locator("#batches-view")).to_be_visible()
    run = uuid.uuid4().hex[:6]
    gate = f"poll-{run}"
    rows = [dstack.chat_line(f"p-{run}-{i}", "poll me", mock_hold=gate) for i in range(24)]
    _, created = dstack.submit(rows)
    r = row(page, created.id)
    # Held at the gate, the batch is certainly still running when the page looks.
    expect(r.locator(".status")).to_have_text("in_progress")
    page.wait_for_function("state.events === false")
    dstack.mock().release(gate)
    expect(r.locator(".progress")).to_have_attribute("aria-valuenow", "100")
    expect(r.locator(".status")).to_have_text("completed")


def test_charts_start_from_the_history_after_every_process_restarted(stack_factory, page):
    from tests.integration.test_history import restart_every_sluice_process

    stack = stack_factory.start(name="dashboard-history", workers=1)
    rows = [stack.chat_line(f"h-{uuid.uuid4().hex[:6]}-{i}", "remember me") for i in range(17)]
    _, created = stack.submit(rows)
    assert stack.wait_for_batch(created.id, timeout=60).status == "completed"
    restart_every_sluice_process(stack)

    # A page opened now starts its charts from the history in Redis, not from nothing.
    sign_in(page, stack, stack.token)
    expect(page.locator("#batches-view")).to_be_visible()
    chart = page.locator("#throughput-chart")
    expect(chart).to_have_attribute("data-history-lines", "17")
    assert int(chart.get_attribute("data-points")) >= 1
    expect(chart.locator("path.line")).to_have_count(1)
    page.click("#tab-cluster")
    expect(page.locator("#history-lines")).to_have_attribute("data-total", "17")
    expect(page.locator("#history-p50 path.line")).to_have_count(1)
    # The killed web process turns stale within seconds (no beat for 6 s); its replacement is live.
    expect(page.locator('#processes tbody tr[data-role="web"] .health.stale')).to_have_count(1, timeout=60_000)
    expect(page.locator('#processes tbody tr[data-role="web"] .health.live')).to_have_count(1)
    shot(page, "dashboard-cluster-history")
