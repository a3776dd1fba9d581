"""The OpenAI error envelope: ApiError, engine errors, validation errors, unknown routes, body limit."""

from __future__ import annotations

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from server.api.errors import ApiError, BodyLimitMiddleware, install_error_handlers, validation_param
from server.engine.types import EngineNotReadyError, InvalidSamplingParamsError, QueueFullError
from server.metrics import Metrics

LIMIT = 2048


class Item(BaseModel):
    n: int


@pytest.fixture(scope="module")
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


@pytest.fixture(scope="module")
def client(metrics: Metrics) -> TestClient:
    app = FastAPI()
    app.state.metrics = metrics
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=LIMIT, metrics=metrics)

    @app.get("/api-error")
    def api_error() -> None:
        raise ApiError(400, "bad temperature", param="temperature", code="invalid_value")

    @app.get("/queue-full")
    def queue_full() -> None:
        raise QueueFullError("busy", retry_after_s=2.5)

    @app.get("/not-ready")
    def not_ready() -> None:
        raise EngineNotReadyError("draining")

    @app.get("/sampling")
    def sampling() -> None:
        raise InvalidSamplingParamsError("top_p must be in (0, 1]", param="top_p")

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret detail")

    @app.post("/items")
    def items(item: Item) -> dict[str, int]:
        return {"n": item.n}

    @app.post("/raw")
    async def raw(request: Request) -> dict[str, int]:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
        return {"size": size}

    return TestClient(app, raise_server_exceptions=False)


def envelope(response: object) -> dict[str, object]:
    body = response.json()  # type: ignore[attr-defined]
    assert list(body) == ["error"]
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]  # type: ignore[no-any-return]


def rejected(metrics: Metrics, reason: str) -> float:
    value = metrics.registry.get_sample_value("loraserve_requests_rejected_total", {"reason": reason})
    return value or 0.0


def test_api_error(client: TestClient, metrics: Metrics) -> None:
    before = rejected(metrics, "bad_request")
    response = client.get("/api-error")
    assert response.status_code == 400
    assert envelope(response) == {
        "message": "bad temperature",
        "type": "invalid_request_error",
        "param": "temperature",
        "code": "invalid_value",
    }
    assert rejected(metrics, "bad_request") == before + 1


def test_queue_full_has_retry_after(client: TestClient) -> None:
    response = client.get("/queue-full")
    assert response.status_code == 429
    assert response.headers["retry-after"] == "3"
    assert envelope(response)["type"] == "rate_limit_error"


def test_engine_errors_keep_status_and_param(client: TestClient) -> None:
    assert client.get("/not-ready").status_code == 503
    response = client.get("/sampling")
    assert response.status_code == 400
    assert envelope(response)["param"] == "top_p"


def test_unexpected_error_is_a_bare_500(client: TestClient) -> None:
    response = client.get("/boom")
    assert response.status_code == 500
    assert "secret" not in envelope(response)["message"]  # type: ignore[operator]


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/nowhere", 404), ("DELETE", "/api-error", 405), ("GET", "/items", 405)],
)
def test_unknown_routes_and_methods(client: TestClient, method: str, path: str, status: int) -> None:
    response = client.request(method, path)
    assert response.status_code == status
    envelope(response)


@pytest.mark.parametrize(
    ("body", "param"),
    [('{"n": "x"}', "n"), ("{}", "n"), ("[1]", None), ('{"n": ', None)],
)
def test_fastapi_validation_errors_are_400_envelopes(
    client: TestClient, body: str, param: str | None
) -> None:
    response = client.post("/items", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    error = envelope(response)
    if param is not None:
        assert error["param"] == param


def test_body_limit_by_content_length(client: TestClient, metrics: Metrics) -> None:
    before = rejected(metrics, "body_too_large")
    response = client.post("/raw", content=b"x" * (LIMIT + 1))
    assert response.status_code == 413
    assert envelope(response)["code"] == "body_too_large"
    assert rejected(metrics, "body_too_large") == before + 1


def test_body_limit_while_streaming(client: TestClient) -> None:
    def chunks():  # no Content-Length: chunked transfer
        for _ in range(4):
            yield b"x" * 1000

    response = client.post("/raw", content=chunks())
    assert response.status_code == 413
    assert envelope(response)["code"] == "body_too_large"
    # the same limit applies to bodies FastAPI reads itself
    response = client.post("/items", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert client.post("/raw", content=b"x" * LIMIT).json() == {"size": LIMIT}


@pytest.mark.parametrize(
    ("loc", "param"),
    [
        (("body", "messages", 0, "content"), "messages[0].content"),
        (("body",), None),
        (("query", "x"), "x"),
        ((), None),
    ],
)
def test_validation_param(loc: tuple[int | str, ...], param: str | None) -> None:
    assert validation_param(loc) == param
