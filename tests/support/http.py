"""Raw HTTP, for what the SDK cannot send (no token, malformed bodies, header checks), and the
check of an OpenAI error envelope."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from email.message import Message
from typing import Any, Callable, Mapping

from .waiting import wait_until


@dataclass
class HttpResult:
    status: int
    headers: Message
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "")


def http_request(
    method: str,
    url: str,
    *,
    token: str | None = None,
    json_body: Any = None,
    data: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 15.0,
) -> HttpResult:
    """Send one HTTP request and return status, headers and body, whatever the status."""
    hdrs = dict(headers or {})
    if token is not None:
        hdrs.setdefault("Authorization", f"Bearer {token}")
    if json_body is not None:
        data = json.dumps(json_body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    if data is None and method in ("POST", "PUT", "PATCH"):
        data = b""
    req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return HttpResult(resp.status, resp.headers, resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return HttpResult(exc.code, exc.headers, exc.read())


def assert_error_envelope(
    result: Any,
    status: int | None = None,
    *,
    param: Any = ...,
    param_prefix: str | None = None,
    code: Any = ...,
) -> dict:
    """Check an OpenAI error response and return its ``error`` object.

    ``result`` is an :class:`HttpResult` or an ``openai.APIStatusError``. The envelope must be
    ``{"error": {"message": str, "type": str, "param": str|null, "code": str|null}}`` served as JSON.
    ``param``/``code`` (when given) must match exactly; ``param_prefix`` checks ``param`` starts with it.
    """
    import openai

    if isinstance(result, openai.APIStatusError):
        got_status = result.status_code
        content_type = result.response.headers.get("content-type", "")
        raw = result.response.content
    else:
        got_status, content_type, raw = result.status, result.content_type, result.body
    if status is not None:
        assert got_status == status, f"expected HTTP {status}, got {got_status}: {raw[:500]!r}"
    assert "json" in content_type.split(";")[0], f"error content-type {content_type!r} is not JSON: {raw[:300]!r}"
    body = json.loads(raw)
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), f"no error envelope: {body!r}"
    err = body["error"]
    for key in ("message", "type", "param", "code"):
        assert key in err, f"error object lacks {key!r}: {err!r}"
    assert isinstance(err["message"], str) and err["message"], f"empty error message: {err!r}"
    assert isinstance(err["type"], str) and err["type"], f"bad error type: {err!r}"
    assert err["param"] is None or isinstance(err["param"], str), f"bad error param: {err!r}"
    assert err["code"] is None or isinstance(err["code"], str), f"bad error code: {err!r}"
    if param is not ...:
        assert err["param"] == param, f"expected param {param!r}, got {err!r}"
    if param_prefix is not None:
        assert isinstance(err["param"], str) and err["param"].startswith(param_prefix), (
            f"expected param starting with {param_prefix!r}, got {err!r}"
        )
    if code is not ...:
        assert err["code"] == code, f"expected code {code!r}, got {err!r}"
    return err


def wait_for_200(
    url: str, *, what: str, timeout: float, check: Callable[[], None], request_timeout: float = 2.0
) -> None:
    """Poll ``GET url`` until it answers 200 (a process coming up); ``what`` names it in a timeout,
    ``check`` aborts the wait when the process died. Refused connections count as "not yet"."""
    wait_until(
        lambda: http_request("GET", url, timeout=request_timeout).status == 200,
        timeout=timeout,
        interval=0.1,
        message=f"{what} to answer GET {url} with 200",
        ignore=(OSError,),
        check=check,
    )
