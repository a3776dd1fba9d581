"""The OpenAI routes on the real server (demo bundle, CPU, open access): the official client for every
route, plain and streaming; every raw body and chunk validated against the contract; a table of bad
inputs, each a 4xx envelope naming its param, with the server still serving after; metrics counting."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.integration.api_server import (
    ServerProcess,
    assert_error,
    metric_value,
    read_stream,
    start_server,
    validate,
)
from tests.unit.test_schemas import BAD_CHAT_FIELDS, BAD_COMPLETION_FIELDS, BAD_RAW_BODIES, MAX_MODEL_LEN

pytestmark = pytest.mark.slow

MAX_BODY_BYTES = 8192
ADAPTER = "pirate"
PROMPT = "The cat is"
MESSAGES = [{"role": "user", "content": "What does the cat eat?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = start_server(
        tmp_path_factory.mktemp("api"),
        ["--max-model-len", str(MAX_MODEL_LEN), "--max-body-bytes", str(MAX_BODY_BYTES)],
    )
    yield process
    assert process.terminate() == 0, process.log_tail()


# ------------------------------------------------------------------------------------------- models


def test_models(server: ServerProcess, http: httpx.Client, base_id: str) -> None:
    body = http.get("/v1/models").json()
    validate("ListModelsResponse", body)
    by_id = {m["id"]: m for m in body["data"]}
    assert {base_id, "shout", "digits", "pirate"} <= set(by_id)
    assert all(by_id[a]["parent"] == base_id for a in ("shout", "digits", "pirate"))
    assert all(m["owned_by"] for m in body["data"])
    listed = {m.id for m in server.openai().models.list()}
    assert listed == set(by_id)


# -------------------------------------------------------------------------------------- completions


@pytest.mark.parametrize("adapter", [None, ADAPTER])
def test_completion_plain_and_streamed_agree(
    server: ServerProcess, http: httpx.Client, base_id: str, adapter: str | None
) -> None:
    model = adapter or base_id
    request = {"model": model, "prompt": PROMPT, "max_tokens": 6, "temperature": 0}

    raw = http.post("/v1/completions", json=request)
    assert raw.status_code == 200, raw.text
    body = raw.json()
    validate("CreateCompletionResponse", body)
    assert body["model"] == model and body["object"] == "text_completion"
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0

    with http.stream("POST", "/v1/completions", json={**request, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks, done = read_stream(response)
    assert done
    for chunk in chunks:
        validate("CreateCompletionResponse", chunk, streamed_completion=True)
        assert chunk["id"] == chunks[0]["id"] and chunk["model"] == model
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"][0]["finish_reason"] == body["choices"][0]["finish_reason"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == body["choices"][0]["text"]

    client = server.openai()
    plain = client.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0)
    assert plain.choices[0].text == body["choices"][0]["text"]
    assert plain.usage is not None and plain.usage.completion_tokens == usage["completion_tokens"]
    streamed = client.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == plain.choices[0].text


def test_completion_stream_include_usage(http: httpx.Client, base_id: str) -> None:
    request = {
        "model": base_id,
        "prompt": [5, 6, 7],
        "max_tokens": 4,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with http.stream("POST", "/v1/completions", json=request) as response:
        chunks, done = read_stream(response)
    assert done
    for chunk in chunks:
        validate("CreateCompletionResponse", chunk, streamed_completion=True)
    last = chunks[-1]
    assert last["choices"] == []
    assert last["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "total_tokens": 7,
        "prompt_tokens_details": {"cached_tokens": 0},  # a 3-token prompt has no full block to share
    }
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in c for c in chunks[:-1])


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_stream_continuous_usage_counts_every_chunks_tokens(
    http: httpx.Client, base_id: str, endpoint: str
) -> None:
    """vLLM's ``continuous_usage_stats``: every chunk carries the usage so far, so a chunk's tokens are the
    growth of ``completion_tokens`` (the tokens its logprobs list, also where it merged several)."""
    request: dict[str, Any] = {
        "model": base_id,
        "max_tokens": 12,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    if endpoint == "chat":
        request |= {"messages": MESSAGES, "logprobs": True, "top_logprobs": 1}
        path, schema = "/v1/chat/completions", "CreateChatCompletionStreamResponse"
    else:
        request |= {"prompt": PROMPT, "logprobs": 1}
        path, schema = "/v1/completions", "CreateCompletionResponse"
    with http.stream("POST", path, json=request) as response:
        assert response.status_code == 200
        chunks, done = read_stream(response)
    assert done and all("usage" in c for c in chunks)
    counted = 0
    for chunk in chunks:
        if endpoint == "chat":
            validate(schema, chunk)
        else:
            validate(schema, chunk, streamed_completion=True)
        usage = chunk["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        grew = usage["completion_tokens"] - counted
        counted = usage["completion_tokens"]
        logprobs = chunk["choices"][0].get("logprobs") if chunk["choices"] else None
        if endpoint == "chat":
            carried = len(logprobs["content"]) if logprobs else 0
        else:
            carried = len(logprobs["tokens"]) if logprobs else 0
        assert grew == carried, chunk
    assert counted == 12 and chunks[-1]["choices"] == []

    # without include_usage the extension asks for nothing
    request["stream_options"] = {"continuous_usage_stats": True}
    with http.stream("POST", path, json=request) as response:
        chunks, done = read_stream(response)
    assert done and all("usage" not in c for c in chunks)


# --------------------------------------------------------------------------------------------- chat


@pytest.mark.parametrize("adapter", [None, ADAPTER])
def test_chat_plain_and_streamed_agree(
    server: ServerProcess, http: httpx.Client, base_id: str, adapter: str | None
) -> None:
    model = adapter or base_id
    request: dict[str, Any] = {"model": model, "messages": MESSAGES, "max_tokens": 8, "temperature": 0}

    raw = http.post("/v1/chat/completions", json=request)
    assert raw.status_code == 200, raw.text
    body = raw.json()
    validate("CreateChatCompletionResponse", body)
    assert body["model"] == model and body["choices"][0]["message"]["role"] == "assistant"
    text = body["choices"][0]["message"]["content"]

    stream_request = {**request, "stream": True, "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/chat/completions", json=stream_request) as response:
        assert response.status_code == 200
        chunks, done = read_stream(response)
    assert done
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk)
        assert chunk["object"] == "chat.completion.chunk" and chunk["model"] == model
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content_chunks, usage_chunk = chunks[:-1], chunks[-1]
    assert all(c["choices"][0]["finish_reason"] is None for c in content_chunks[:-1])
    assert content_chunks[-1]["choices"][0]["finish_reason"] == body["choices"][0]["finish_reason"]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in content_chunks) == text
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == body["usage"]

    client = server.openai()
    plain = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8, temperature=0)  # type: ignore[arg-type]
    assert plain.choices[0].message.content == text
    streamed = client.chat.completions.create(
        model=model,
        messages=MESSAGES,  # type: ignore[arg-type]
        max_completion_tokens=8,
        temperature=0,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text


def test_chat_text_parts_and_stop(http: httpx.Client, base_id: str) -> None:
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "What does the "}, {"type": "text", "text": "cat eat?"}],
        },
    ]
    request = {
        "model": base_id,
        "messages": messages,
        "max_tokens": 8,
        "temperature": 0,
        "seed": 1,
        "stop": ["\n"],
    }
    response = http.post("/v1/chat/completions", json=request)
    assert response.status_code == 200, response.text
    validate("CreateChatCompletionResponse", response.json())
    assert "\n" not in response.json()["choices"][0]["message"]["content"]


# --------------------------------------------------------------------------------------- bad inputs


def _still_serving(http: httpx.Client, base_id: str) -> None:
    ok = http.post("/v1/completions", json={"model": base_id, "prompt": "hi", "max_tokens": 1})
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize(("fields", "param"), BAD_COMPLETION_FIELDS)
def test_bad_completion_fields(http: httpx.Client, base_id: str, fields: dict[str, Any], param: str) -> None:
    body = {"model": base_id, "prompt": "hi", **fields}
    assert_error(http.post("/v1/completions", json=body), 400, param)


@pytest.mark.parametrize(("fields", "param"), BAD_CHAT_FIELDS)
def test_bad_chat_fields(http: httpx.Client, base_id: str, fields: dict[str, Any], param: str) -> None:
    body = {"model": base_id, "messages": MESSAGES, **fields}
    assert_error(http.post("/v1/chat/completions", json=body), 400, param)


@pytest.mark.parametrize(("body", "param"), BAD_RAW_BODIES)
def test_bad_raw_bodies(http: httpx.Client, body: bytes, param: str | None) -> None:
    if len(body) > MAX_BODY_BYTES:
        body = body[:MAX_BODY_BYTES]  # the depth bomb, cut to fit: still invalid JSON
    response = http.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert_error(response, 400, param)


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/v1/completions", {"model": "no-such-model", "prompt": "hi"}, 404, "model"),
        ("/v1/chat/completions", {"model": "no-such-model", "messages": MESSAGES}, 404, "model"),
        (
            "/v1/completions",
            {"prompt": "hi " * 1000, "max_tokens": 4},
            400,
            "prompt",
        ),  # longer than the context
        ("/v1/completions", {"prompt": "hi", "max_tokens": MAX_MODEL_LEN - 1}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": [10**9]}, 400, "prompt"),  # not a token id
    ],
)
def test_bad_requests_the_engine_refuses(
    http: httpx.Client, base_id: str, path: str, body: dict[str, Any], status: int, param: str
) -> None:
    assert_error(http.post(path, json={"model": base_id, **body}), status, param)


def test_oversized_bodies(http: httpx.Client, base_id: str) -> None:
    big = json.dumps({"model": base_id, "prompt": "x" * MAX_BODY_BYTES}).encode()
    error = assert_error(http.post("/v1/completions", content=big), 413)
    assert error["code"] == "body_too_large"

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit holds while the body streams in
        yield big[: MAX_BODY_BYTES // 2]
        yield big[MAX_BODY_BYTES // 2 :]

    assert_error(http.post("/v1/completions", content=chunked()), 413)
    _still_serving(http, base_id)


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/v1/nothing", 404), ("GET", "/v1/completions", 405), ("DELETE", "/v1/models", 405)],
)
def test_unknown_routes_and_methods(http: httpx.Client, method: str, path: str, status: int) -> None:
    assert_error(http.request(method, path), status)


def test_openai_client_sees_the_errors(server: ServerProcess, base_id: str) -> None:
    import openai

    client = server.openai()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="hi")
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=base_id, messages=MESSAGES, temperature=5)  # type: ignore[arg-type]
    assert info.value.param == "temperature"  # type: ignore[attr-defined]


def test_no_5xx_and_still_serving_after_bad_input(http: httpx.Client, base_id: str) -> None:
    text = http.get("/metrics").text
    assert metric_value(text, "loraserve_requests_rejected_total", {"reason": "bad_request"}) > 0
    _still_serving(http, base_id)
    health = http.get("/health")
    assert health.status_code == 200 and http.get("/ready").status_code == 200


# ------------------------------------------------------------------------------------------ metrics

DESIGN_METRICS = [  # DESIGN section 5, as exposed
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:lora_requests_info",
    "vllm:time_to_first_token_seconds",
    "vllm:inter_token_latency_seconds",
    "vllm:e2e_request_latency_seconds",
    "vllm:request_queue_time_seconds",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:request_success_total",
    "loraserve_adapter_resident",
    "loraserve_adapter_loads_total",
    "loraserve_adapter_evictions_total",
    "loraserve_adapter_load_seconds",
    "loraserve_adapter_requests_total",
    "loraserve_snapshot_active",
    "loraserve_requests_rejected_total",
    "loraserve_requests_aborted_total",
]


def test_metrics_present_and_counting(http: httpx.Client, base_id: str) -> None:
    response = http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    for name in DESIGN_METRICS:
        assert f"# TYPE {name} " in response.text, name

    def tokens() -> tuple[float, float, float]:
        text = http.get("/metrics").text
        return (
            metric_value(text, "vllm:prompt_tokens_total", {"model_name": base_id}),
            metric_value(text, "vllm:generation_tokens_total", {"model_name": base_id}),
            metric_value(text, "loraserve_adapter_requests_total", {"adapter": ADAPTER}),
        )

    prompt_before, generated_before, adapter_before = tokens()
    request = {"model": base_id, "prompt": [5, 6, 7], "max_tokens": 3, "ignore_eos": True}
    assert http.post("/v1/completions", json=request).status_code == 200
    assert http.post("/v1/completions", json={**request, "model": ADAPTER}).status_code == 200
    prompt_after, generated_after, adapter_after = tokens()
    assert prompt_after >= prompt_before + 3
    assert generated_after >= generated_before + 3
    assert adapter_after == adapter_before + 1
    text = http.get("/metrics").text
    assert metric_value(text, "vllm:e2e_request_latency_seconds_count", {"model_name": base_id}) > 0
    assert (
        metric_value(text, "vllm:request_success_total", {"model_name": base_id, "finished_reason": "length"})
        > 0
    )
