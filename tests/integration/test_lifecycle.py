"""Life cycle of the real server: /health and /ready, and the SIGTERM drain: stop admitting (503), let
running requests finish up to --shutdown-timeout, abort the rest (reported to the client as finish_reason
``abort`` as vLLM does, see schemas.openai_finish_reason), exit 0."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.api_server import ServerProcess, sse_data, start_server, validate

pytestmark = pytest.mark.slow


def base_id(server: ServerProcess) -> str:
    with server.http() as http:
        return str(next(m["id"] for m in http.get("/v1/models").json()["data"] if m.get("parent") is None))


def stream_in_background(
    server: ServerProcess, request: dict[str, Any]
) -> tuple[threading.Event, dict[str, Any]]:
    """Start a streaming completion; ``started`` is set once its first chunk arrived; ``result`` gets the
    chunks and whether ``[DONE]`` came."""
    started = threading.Event()
    result: dict[str, Any] = {}

    def run() -> None:
        chunks: list[dict[str, Any]] = []
        result["chunks"], result["done"] = chunks, False
        try:
            with server.http() as http, http.stream("POST", "/v1/completions", json=request) as response:
                result["status"] = response.status_code
                for data in sse_data(response.iter_lines()):
                    started.set()
                    if data == "[DONE]":
                        result["done"] = True
                    else:
                        chunks.append(json.loads(data))
        except httpx.HTTPError as exc:
            result["error"] = exc
        finally:
            started.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    result["thread"] = thread
    return started, result


def refused_after_sigterm(server: ServerProcess, model: str) -> None:
    """New work is refused: 503 while the socket is still open, or no connection at all."""
    deadline = time.monotonic() + 60.0  # guards against a hang only
    while time.monotonic() < deadline:
        try:
            with server.http(timeout=2.0) as http:
                ready = http.get("/ready").status_code
                work = http.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 1})
        except httpx.TransportError:
            return
        if ready == 503 and work.status_code == 503:
            return
        time.sleep(0.05)
    raise AssertionError("the server still admitted work a minute after SIGTERM")


def test_health_and_ready(tmp_path: Path) -> None:
    server = start_server(tmp_path, ["--max-model-len", "256"])
    try:
        with server.http() as http:
            assert http.get("/health").json() == {"status": "ok"}
            assert http.get("/ready").status_code == 200
    finally:
        assert server.terminate() == 0, server.log_tail()


def test_sigterm_lets_running_requests_finish(tmp_path: Path) -> None:
    server = start_server(tmp_path, ["--max-model-len", "256", "--shutdown-timeout", "30"])
    model = base_id(server)
    request = {"model": model, "prompt": [5, 6, 7], "max_tokens": 24, "ignore_eos": True, "stream": True}
    started, result = stream_in_background(server, request)
    assert started.wait(60)
    server.process.send_signal(signal.SIGTERM)
    refused_after_sigterm(server, model)
    assert server.process.wait(timeout=60) == 0, server.log_tail()
    result["thread"].join(10)
    assert "error" not in result, result
    assert result["done"]
    chunks = result["chunks"]
    for chunk in chunks:
        validate("CreateCompletionResponse", chunk, streamed_completion=True)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert len("".join(c["choices"][0]["text"] for c in chunks)) > 0


def test_sigterm_aborts_what_outlives_the_timeout(tmp_path: Path) -> None:
    # 2,000 tokens take the demo model several seconds even on a fast core: far past the 1 s drain
    server = start_server(tmp_path, ["--max-model-len", "2048", "--shutdown-timeout", "1"])
    model = base_id(server)
    request = {"model": model, "prompt": [5, 6, 7], "max_tokens": 2000, "ignore_eos": True, "stream": True}
    started, result = stream_in_background(server, request)
    assert started.wait(60)
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=120) == 0, server.log_tail()
    result["thread"].join(10)
    # The client saw a well-formed end: the aborted request's last chunk, then [DONE].
    assert "error" not in result, result
    assert result["done"], result
    last = result["chunks"][-1]
    assert len(result["chunks"]) < 2000  # at most a chunk a token: the drain cut the request short
    validate("CreateCompletionResponse", last, streamed_completion=True, aborted=True)
    assert last["choices"][0]["finish_reason"] == "abort"  # as vLLM reports an aborted request
