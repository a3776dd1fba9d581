"""Backpressure and disconnects on the real server: a tiny queue gives 429 + Retry-After and never a 5xx;
a client that leaves (streaming or not) aborts its generation within a second, counted once."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.integration.api_server import ServerProcess, assert_error, metric_value, sse_data, start_server

pytestmark = pytest.mark.slow

# Long enough that nothing finishes on its own during a test (2,000 tokens: seconds even on a fast core);
# aborted, or left to the queue test's end.
LONG = {"prompt": [5, 6, 7], "max_tokens": 2000, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = start_server(
        tmp_path_factory.mktemp("backpressure"),
        ["--max-num-seqs", "1", "--max-queue", "1", "--max-model-len", "2048"],
    )
    yield process
    assert process.terminate() == 0, process.log_tail()


def aborted(http: httpx.Client) -> float:
    return metric_value(
        http.get("/metrics").text, "loraserve_requests_aborted_total", {"reason": "disconnect"}
    )


def running(http: httpx.Client, base_id: str) -> float:
    text = http.get("/metrics").text
    return metric_value(text, "vllm:num_requests_running", {"model_name": base_id}) + metric_value(
        text, "vllm:num_requests_waiting", {"model_name": base_id}
    )


def generated(http: httpx.Client, base_id: str) -> float:
    return metric_value(http.get("/metrics").text, "vllm:generation_tokens_total", {"model_name": base_id})


def wait_for(predicate: Callable[[], bool], timeout: float = 60.0) -> None:
    """Poll until ``predicate`` holds; ``timeout`` only guards against a hang (no speed is asserted)."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, "timed out"
        time.sleep(0.02)


def test_disconnect_mid_stream_aborts_the_generation(
    server: ServerProcess, http: httpx.Client, base_id: str
) -> None:
    before = aborted(http)
    tokens_before = generated(http, base_id)
    with (
        server.http() as client,
        client.stream("POST", "/v1/completions", json={"model": base_id, "stream": True, **LONG}) as response,
    ):
        assert response.status_code == 200
        data = sse_data(response.iter_lines())
        next(data), next(data)  # two chunks: the generation is running
    # leaving the block closed the connection
    wait_for(lambda: aborted(http) >= before + 1)
    wait_for(lambda: running(http, base_id) == 0)
    assert aborted(http) == before + 1  # exactly once
    # the abort stopped the generation: far fewer than its 200 tokens were made (steps, not seconds)
    assert generated(http, base_id) - tokens_before < LONG["max_tokens"] / 2


def test_disconnect_while_waiting_for_a_plain_response_aborts(
    server: ServerProcess, http: httpx.Client, base_id: str
) -> None:
    before = aborted(http)
    tokens_before = generated(http, base_id)
    with server.http(timeout=0.5) as client, pytest.raises(httpx.ReadTimeout):
        client.post("/v1/completions", json={"model": base_id, **LONG})
    wait_for(lambda: aborted(http) >= before + 1)
    wait_for(lambda: running(http, base_id) == 0)
    assert aborted(http) == before + 1
    assert generated(http, base_id) - tokens_before < LONG["max_tokens"]


def test_full_queue_is_429_with_retry_after_and_no_5xx(
    server: ServerProcess, http: httpx.Client, base_id: str
) -> None:
    request = {"model": base_id, **LONG, "max_tokens": 40}

    def post(_: int) -> httpx.Response:
        with server.http() as client:
            return client.post("/v1/completions", json=request)

    # max-num-seqs 1 and max-queue 1: one runs, one waits, the rest are refused at once.
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(post, range(8)))
    statuses = sorted(r.status_code for r in responses)
    assert all(s < 500 for s in statuses), statuses
    assert statuses.count(200) >= 1 and statuses.count(429) >= 1, statuses
    for response in responses:
        if response.status_code == 429:
            error = assert_error(response, 429)
            assert error["type"] == "rate_limit_error"
            assert int(response.headers["retry-after"]) >= 1
    text = http.get("/metrics").text
    assert metric_value(
        text, "loraserve_requests_rejected_total", {"reason": "queue_full"}
    ) >= statuses.count(429)
    assert (
        http.post("/v1/completions", json={"model": base_id, "prompt": "hi", "max_tokens": 1}).status_code
        == 200
    )
