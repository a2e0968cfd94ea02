"""Garbage ids: ids with path characters, and overlong ids, in every by-id route.

See ``harness.py`` for the guarantee under test and how an example runs.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from hypothesis import example, given, note, settings
from hypothesis import strategies as st
from yarl import URL

from .harness import (
    COMMON_SETTINGS,
    TEXT,
    assert_client_error,
)

# --------------------------------------------------------------------------------------------
# 5. Ids with path characters in every by-id route


nasty_ids = st.sampled_from(
    [
        "..",
        "../",
        "../../etc/passwd",
        "%2e%2e%2f",
        "%2e%2e%2fbatches",
        "..%2f..%2f",
        "%2E%2E/%2E%2E/",
        "\x00",
        "file-\x00",
        "a\x00b",
        "file-" + "0" * 24 + "\x00",
        "%00",
        "file-../../x",
        "batch_../x",
        ".",
        "./",
        "~",
        "\u202efile",
        "😀" * 50,
        "a" * 4000,
        " ",
        "\t",
        "\r\n",
        "%",
        "%%",
        "%zz",
        "?",
        "#",
        "?after=x",
        "#frag",
        ";",
        "\\..\\..\\",
        "C:\\Windows",
        "file-٠١٢٣٤٥٦٧٨٩٠١٢٣٤٥٦٧٨٩٠١٢٣",
        "FILE-" + "0" * 24,
        "file-" + "0" * 25,
        "batch_" + "0" * 24 + "/..",
        "data/files",
        "..%00",
        "%c0%ae%c0%ae/",
        "cancel",
        "content",
    ]
)
any_ids = st.one_of(
    nasty_ids,
    st.text(TEXT, min_size=1, max_size=200),
    st.integers(256, 4000).map(lambda n: "z" * n),
    st.from_regex(r"\A(file-|batch_)[0-9a-f]{24}\Z"),
    st.lists(
        st.sampled_from(["..", ".", "%2e%2e", "x", "%2f", "/", "files", "batches", "v1"]), min_size=1, max_size=6
    ).map("/".join),
)


@settings(max_examples=60, **COMMON_SETTINGS)
@given(object_id=any_ids, raw=st.booleans())
@example(object_id="../../etc/passwd", raw=True)
@example(object_id="%2e%2e%2f%2e%2e%2f", raw=True)
@example(object_id="%2e%2e%2f%2e%2e%2f", raw=False)
@example(object_id="a\x00b", raw=False)
@example(object_id="ünïcødé-✓-файл", raw=False)
@example(object_id="z" * 4000, raw=False)
def test_ids_with_path_characters(h, object_id, raw):
    """By-id routes with hostile ids: 404/400/405 envelopes, never another object or a changed one."""
    if raw:  # dots, slashes and percent escapes reach the server as typed
        encoded = quote(object_id, safe="/.%~;")
    else:
        encoded = quote(object_id, safe="")
    note(f"path segment {encoded[:200]!r}")
    routes = [
        ("GET", f"/v1/files/{encoded}", True),
        ("GET", f"/v1/files/{encoded}/content", False),
        ("DELETE", f"/v1/files/{encoded}", False),
        ("GET", f"/v1/batches/{encoded}", True),
        ("POST", f"/v1/batches/{encoded}/cancel", False),
    ]

    async def body():
        for method, path, may_list in routes:
            kwargs: dict[str, Any] = {}
            if method == "POST":  # what the SDK sends on cancel
                kwargs = {"data": b"", "headers": {"Content-Type": "application/json"}}
            resp = await h.api.request(method, URL(path, encoded=True), **kwargs)
            if resp.status == 200:
                # Dot segments may legitimately resolve to a list route; nothing else may succeed.
                assert may_list and raw, f"{method} {path[:100]} succeeded: {resp.body[:300]!r}"
                assert resp.json()["object"] == "list", resp.body[:300]
                continue
            assert_client_error(resp, {400, 404, 405})

    h.example(body)


def test_overlong_id_gets_error_envelope(h):
    """A 10,000-character id (a request line over aiohttp's 8190-byte limit) still gets the OpenAI envelope."""
    routes = [
        ("GET", "/v1/files/{}"),
        ("GET", "/v1/files/{}/content"),
        ("DELETE", "/v1/files/{}"),
        ("GET", "/v1/batches/{}"),
        ("POST", "/v1/batches/{}/cancel"),
    ]

    async def body():
        answers = [
            await h.api.request(method, URL(template.format("z" * 10_000), encoded=True)) for method, template in routes
        ]
        problems = []
        for (method, template), resp in zip(routes, answers):
            try:
                assert_client_error(resp, {400, 404, 414, 431})
            except AssertionError as e:
                problems.append(f"{method} {template}: {str(e).splitlines()[0][:300]}")
        assert not problems, "\n".join(problems)

    h.example(body)
