"""OpenAI-style API errors: one exception type that the web middleware renders."""

from __future__ import annotations

from .wire import ErrorDetail, ErrorResponse, json_encoder


class APIError(Exception):
    """An error answered to the client as ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        close: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        # The request body was left unread (refused early, or stalled): the connection cannot be
        # reused for another request and is closed after the answer.
        self.close = close
        self.detail = ErrorDetail(message=message, type=type, param=param, code=code)
        self.headers = dict(headers or {})
        # The SDK retries 408/409/429/5xx; a deterministic answer must tell it not to.
        if status < 500 and status != 429:
            self.headers.setdefault("x-should-retry", "false")

    def body(self) -> bytes:
        """The JSON body of the error response."""
        return json_encoder.encode(ErrorResponse(error=self.detail))


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 invalid_request_error."""
    return APIError(400, message, param=param, code=code)


def not_found(kind: str, object_id: str, *, param: str | None = None) -> APIError:
    """A 404 for an id this token cannot see (unknown and foreign ids look the same)."""
    return APIError(404, f"No such {kind}: '{object_id}'", param=param, code=None)
