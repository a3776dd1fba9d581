"""The OpenAI error envelope for every non-2xx answer.

Every error body is ``{"error": {"message", "type", "param", "code"}}``: our own ``ApiError``s, the engine's
``EngineError``s, FastAPI's validation errors, Starlette's 404/405 for unknown routes and methods, an
oversized body, and (as a last resort) an unexpected exception, which is a 500 that reveals nothing.

Rejections the API makes itself are counted in ``loraserve_requests_rejected_total{reason}``; the engine
counts the ones it raises from ``submit`` (queue full, too long, not ready, ...).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.engine.types import EngineError, QueueFullError
from server.metrics import Metrics

log = logging.getLogger("loraserve.api")

# The reason label of ``loraserve_requests_rejected_total`` for each status the API refuses with itself.
_REASON_BY_STATUS = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
    422: "bad_request",
}
# OpenAI's ``type`` for each status (the official client maps statuses, not types, to exceptions).
_TYPE_BY_STATUS = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}


class ApiError(StarletteHTTPException):
    """An HTTP error the API raises on purpose; rendered as the OpenAI envelope.

    It is a Starlette ``HTTPException`` so that it passes through FastAPI's body reading unchanged
    (an oversized body is detected inside ``receive``).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(status_code=status, detail=message, headers=dict(headers) if headers else None)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


class BodyTooLargeError(ApiError):
    def __init__(self, limit: int) -> None:
        super().__init__(
            413,
            f"the request body is larger than {limit} bytes",
            code="body_too_large",
        )


def error_body(
    message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def engine_error_body(exc: EngineError) -> dict[str, Any]:
    return error_body(exc.message, type=exc.error_type, param=exc.param, code=exc.code)


def engine_error_headers(exc: EngineError) -> dict[str, str] | None:
    if isinstance(exc, QueueFullError):
        return {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}
    return None


def validation_param(loc: Sequence[int | str]) -> str | None:
    """``("body", "messages", 0, "content")`` -> ``"messages[0].content"`` (None for the body itself)."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header", "cookie"):
        parts = parts[1:]
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or None


def count_rejection(metrics: Metrics | None, status: int) -> None:
    reason = _REASON_BY_STATUS.get(status)
    if metrics is not None and reason is not None:
        metrics.requests_rejected_total.labels(reason=reason).inc()


def _metrics_of(request: Request) -> Metrics | None:
    metrics: Metrics | None = getattr(request.app.state, "metrics", None)
    return metrics


async def _on_api_error(request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, ApiError):
        count_rejection(_metrics_of(request), exc.status)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)
    assert isinstance(exc, StarletteHTTPException)
    # Starlette's own: unknown route (404), wrong method (405), FastAPI's body-parse failure (400), ...
    count_rejection(_metrics_of(request), exc.status_code)
    message = str(exc.detail) if exc.detail else "error"
    if exc.status_code == 404 and message == "Not Found":
        message = f"no route {request.url.path}"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    body = error_body(message, type=_TYPE_BY_STATUS.get(exc.status_code, "invalid_request_error"))
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    count_rejection(_metrics_of(request), 400)
    errors = exc.errors()
    first = errors[0] if errors else {}
    param = validation_param(first.get("loc", ()))
    message = str(first.get("msg", "invalid request"))
    if param:
        message = f"{param}: {message}"
    return JSONResponse(error_body(message, param=param, code="invalid_value"), status_code=400)


async def _on_engine_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, EngineError)
    # The engine counts the rejections it raises from submit(); nothing to count here.
    return JSONResponse(engine_error_body(exc), status_code=exc.status, headers=engine_error_headers(exc))


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    body = error_body("internal server error", type="server_error", code="internal_error")
    return JSONResponse(body, status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    """Route every error the app can raise through the envelope (see the module docstring)."""
    app.add_exception_handler(StarletteHTTPException, _on_api_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(EngineError, _on_engine_error)
    app.add_exception_handler(Exception, _on_unexpected)


class BodyLimitMiddleware:
    """Refuses request bodies over ``max_bytes`` with a 413 envelope: at once when Content-Length says so,
    and while the body streams in otherwise (Content-Length may be absent or lie).

    The streaming check raises ``BodyTooLargeError`` from ``receive``, inside the route, where the
    exception handlers above turn it into the envelope.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, metrics: Metrics | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.max_bytes:
            count_rejection(self.metrics, 413)
            exc = BodyTooLargeError(self.max_bytes)
            response = JSONResponse(exc.body(), status_code=413, headers={"Connection": "close"})
            await response(scope, receive, send)
            return

        received = 0

        async def receive_within_limit() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLargeError(self.max_bytes)
            return message

        await self.app(scope, receive_within_limit, send)
