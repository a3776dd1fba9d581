"""Request bodies -> validated models -> GenerationRequest; every bad input is an InvalidRequestError
naming its param (the API turns it into a 400 envelope)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from server.api.schemas import (
    DEFAULT_COMPLETION_MAX_TOKENS,
    MAX_JSON_DEPTH,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    CompletionRequest,
    openai_finish_reason,
    parse_json,
    parse_request,
)
from server.engine.types import ChatMessage, FinishReason, InvalidRequestError

MAX_MODEL_LEN = 256
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "m", "prompt": "hi"}


def completion(**fields: Any) -> CompletionRequest:
    request = parse_request(json.dumps({**COMPLETION, **fields}).encode(), CompletionRequest)
    request.check_supported(MAX_MODEL_LEN)
    return request


def chat(**fields: Any) -> ChatCompletionRequest:
    request = parse_request(json.dumps({**CHAT, **fields}).encode(), ChatCompletionRequest)
    request.check_supported(MAX_MODEL_LEN)
    return request


def test_completion_defaults_and_fields() -> None:
    request = completion()
    generation = request.to_generation_request("cmpl-1", adapter=None, tenant="t")
    assert generation.prompt == "hi" and generation.adapter is None and generation.tenant == "t"
    assert generation.sampling.max_tokens is None  # omitted: the default, capped by the context
    assert generation.default_max_tokens == DEFAULT_COMPLETION_MAX_TOKENS
    assert generation.sampling.temperature == 1.0 and generation.sampling.stop == ()

    request = completion(
        max_tokens=8,
        temperature=0,
        top_p=0.5,
        stop="x",
        seed=7,
        presence_penalty=1.5,
        frequency_penalty=-1,
        top_k=5,
        min_p=0.1,
        repetition_penalty=1.2,
        ignore_eos=True,
        user="u",
        n=1,
        stream=True,
        stream_options={"include_usage": True},
        logprobs=None,
        echo=False,
        best_of=1,
        metadata={"x": "1"},  # an ignorable field
    )
    sampling = request.to_generation_request("cmpl-2", adapter="a", tenant="t").sampling
    assert (sampling.max_tokens, sampling.temperature, sampling.top_p, sampling.stop) == (8, 0.0, 0.5, ("x",))
    assert (sampling.seed, sampling.top_k, sampling.min_p, sampling.repetition_penalty) == (7, 5, 0.1, 1.2)
    assert sampling.ignore_eos and sampling.greedy and request.include_usage


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("text", ["text"]),
        ([1, 2, 3], [[1, 2, 3]]),
        (["one"], ["one"]),
        ([[4, 5]], [[4, 5]]),
        (["a", "b"], ["a", "b"]),
        ([[1], [2, 3]], [[1], [2, 3]]),
    ],
)
def test_completion_prompt_forms(prompt: Any, expected: Any) -> None:
    assert completion(prompt=prompt).prompts() == expected


def test_prompt_list_and_n_give_one_request_per_choice_with_derived_seeds() -> None:
    request = completion(prompt=["a", "b"], n=3, seed=11, logprobs=2, echo=True, max_tokens=0)
    requests = request.to_generation_requests("cmpl-x", adapter="ad", tenant="t")
    assert [r.request_id for r in requests] == [f"cmpl-x-{i}" for i in range(6)]
    assert [r.prompt for r in requests] == ["a"] * 3 + ["b"] * 3
    seeds = [r.sampling.seed for r in requests]
    assert seeds[0] == 11 and len(set(seeds[:3])) == 3 and seeds[:3] == seeds[3:]
    assert all(r.sampling.logprobs == 2 and r.sampling.prompt_logprobs == 2 for r in requests)
    assert all(r.sampling.max_tokens == 0 for r in requests)


def test_vllm_extras_reach_the_sampling_params() -> None:
    sampling = (
        completion(
            logit_bias={"5": -100, "7": 2.5},
            min_tokens=2,
            max_tokens=4,
            stop_token_ids=[9],
            skip_special_tokens=False,
            spaces_between_special_tokens=False,
            include_stop_str_in_output=True,
            prompt_logprobs=1,
        )
        .to_generation_request("c", adapter=None, tenant="t")
        .sampling
    )
    assert sampling.logit_bias == ((5, -100.0), (7, 2.5)) and sampling.min_tokens == 2
    assert sampling.stop_token_ids == (9,) and sampling.prompt_logprobs == 1
    assert not sampling.skip_special_tokens and not sampling.spaces_between_special_tokens
    assert sampling.include_stop_str_in_output and sampling.logprobs is None


def test_chat_logprobs_fields() -> None:
    sampling = (
        chat(logprobs=True, top_logprobs=4).to_generation_request("c", adapter=None, tenant="t").sampling
    )
    assert sampling.logprobs == 4
    assert chat(logprobs=True).to_generation_request("c", adapter=None, tenant="t").sampling.logprobs == 0
    assert chat().to_generation_request("c", adapter=None, tenant="t").sampling.logprobs is None


def test_chat_messages_and_max_completion_tokens() -> None:
    request = chat(
        messages=[
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": "ok", "name": "bot"},
        ],
        max_completion_tokens=9,
        max_tokens=3,
        tool_choice="none",
        response_format={"type": "text"},
    )
    generation = request.to_generation_request("chatcmpl-1", adapter=None, tenant="t")
    assert generation.messages == [
        ChatMessage("system", "be brief"),
        ChatMessage("user", "ab"),
        ChatMessage("assistant", "ok"),
    ]
    assert generation.sampling.max_tokens == 9
    default = chat().to_generation_request("c", adapter=None, tenant="t")
    assert default.sampling.max_tokens is None  # the engine fills in the rest of the context (vLLM)


# (fields merged into a valid body, the param the error must name); the same table drives the HTTP test
BAD_COMPLETION_FIELDS: list[tuple[dict[str, Any], str]] = [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"presence_penalty": 2.1}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": MAX_MODEL_LEN}, "max_tokens"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"max_tokens": "8"}, "max_tokens"),
    ({"n": 17}, "n"),
    ({"n": 0}, "n"),
    ({"n": 16, "prompt": ["a"] * 5}, "n"),  # 80 choices
    ({"seed": 2**64}, "seed"),
    ({"top_k": -2}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"ignore_eos": "yes"}, "ignore_eos"),
    ({"stop": ["s"] * 17}, "stop"),
    ({"stop": [1]}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"stop": "x" * 1000}, "stop"),
    ({"stream": "true"}, "stream"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": True, "stream_options": {"include_usage": "y"}}, "stream_options.include_usage"),
    (
        {"stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": 1}},
        "stream_options.continuous_usage_stats",
    ),
    ({"logprobs": 21}, "logprobs"),
    ({"logprobs": -1}, "logprobs"),
    ({"logprobs": True}, "logprobs"),
    ({"echo": "yes"}, "echo"),
    ({"best_of": 3}, "best_of"),
    ({"suffix": "end"}, "suffix"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"5": -100.5}}, "logit_bias"),
    ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"logit_bias": {"-1": 1}}, "logit_bias"),
    ({"logit_bias": {"5": "1"}}, "logit_bias"),
    ({"logit_bias": [1]}, "logit_bias"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"stop_token_ids": "1"}, "stop_token_ids"),
    ({"skip_special_tokens": 1}, "skip_special_tokens"),
    ({"prompt_logprobs": 21}, "prompt_logprobs"),
    ({"max_tokens": 0, "echo": False}, "max_tokens"),
    ({"guided_json": 5}, "guided_json"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_choice": [""]}, "guided_choice"),
    ({"structured_outputs": {}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs.choice"),
    ({"structured_outputs": {"json": "{oops"}}, "structured_outputs.json"),
    ({"guided_json": {"type": "object"}, "guided_regex": "a"}, "guided_regex"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"guided_decoding_backend": "outlines"}, "guided_decoding_backend"),
    ({"no_such_field": 1}, "no_such_field"),
    ({"model": ""}, "model"),
    ({"model": 5}, "model"),
    ({"model": None}, "model"),
    ({"prompt": None}, "prompt"),
    ({"prompt": ["a"] * 33}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": {"text": "a"}}, "prompt"),
    ({"user": "u" * 300}, "user"),
]

BAD_CHAT_FIELDS: list[tuple[dict[str, Any], str]] = [
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
    (
        {
            "messages": [
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                    ],
                }
            ]
        },
        "messages[0].tool_calls[0].function.name",
    ),
    (
        {
            "messages": [
                {
                    "role": "assistant",
                    "tool_calls": [
                        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1"}}
                    ],
                }
            ]
        },
        "messages[0].tool_calls[0].function.arguments",
    ),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages[0].tool_calls"),
    ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": []}]}, "messages[0].content"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "messages[0].content",
    ),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"max_completion_tokens": MAX_MODEL_LEN + 1}, "max_completion_tokens"),
    ({"logprobs": 3}, "logprobs"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"logprobs": False, "top_logprobs": 3}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"guided_regex": ""}, "guided_regex"),
    ({"reasoning_effort": "high"}, "reasoning_effort"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    (
        {
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": "required",
            "response_format": {"type": "json_object"},
        },
        "tool_choice",
    ),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema.schema"),
    ({"n": 17}, "n"),
    ({"n": 0}, "n"),
    ({"temperature": 9}, "temperature"),
]


@pytest.mark.parametrize(("fields", "param"), BAD_COMPLETION_FIELDS)
def test_bad_completion_fields(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        completion(**fields)
    assert info.value.param == param
    assert info.value.status == 400


@pytest.mark.parametrize(("fields", "param"), BAD_CHAT_FIELDS)
def test_bad_chat_fields(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        chat(**fields)
    assert info.value.param == param


def test_missing_required_fields_name_the_field() -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_request(b'{"prompt": "x"}', CompletionRequest)
    assert info.value.param == "model"
    with pytest.raises(InvalidRequestError) as info:
        parse_request(b'{"model": "m"}', ChatCompletionRequest)
    assert info.value.param == "messages"


# raw bodies: (body, param or None)
BAD_RAW_BODIES: list[tuple[bytes, str | None]] = [
    (b'{"model": "m", "prompt": "x", "temperature": NaN}', "temperature"),
    (b'{"model": "m", "prompt": "x", "top_p": Infinity}', "top_p"),
    (b'{"model": "m", "prompt": "x", "temperature": -Infinity}', "temperature"),
    (b'{"model": "m", "prompt": "x", "temperature": 1e999}', "temperature"),
    (b'{"model": "m", "prompt": "x", "extra": {"deep": [NaN]}}', "extra.deep[0]"),
    (b'{"model": "m", "prompt": "x", "x": ' + b"[" * 100 + b"]" * 100 + b"}", None),
    (b"[" * 100_000, None),
    (b'{"model": "m", "prompt": "x", "seed": 1' + b"0" * 5000 + b"}", None),
    (b'{"model": "m", "prompt": "x"', None),
    (b"", None),
    (b"\xff\xfe", None),
    (b'"just a string"', None),
    (b"[1, 2]", None),
]


@pytest.mark.parametrize(("body", "param"), BAD_RAW_BODIES)
def test_bad_raw_bodies(body: bytes, param: str | None) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_request(body, CompletionRequest)
    if param is not None:
        assert info.value.param == param


def test_depth_limit_is_exact() -> None:
    ok = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert parse_json(ok.encode()) is not None
    with pytest.raises(InvalidRequestError):
        parse_json(("[" + ok + "]").encode())


@pytest.mark.parametrize(
    ("reason", "openai"),
    [(FinishReason.STOP, "stop"), (FinishReason.LENGTH, "length"), (FinishReason.ABORT, "abort")],
)
def test_finish_reason_mapping(reason: FinishReason, openai: str) -> None:
    assert openai_finish_reason(reason) == openai


def test_chunk_delta_omits_unset_role_and_content() -> None:
    chunk = ChatCompletionChunk(id="c", created=1, model="m", choices=[ChatChunkChoice(delta=ChatDelta())])
    assert json.loads(chunk.model_dump_json())["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": None,
    }
    assert "usage" not in json.loads(chunk.model_dump_json())


def test_the_api_never_imports_torch() -> None:
    code = (
        "import sys, server.api.app, server.api.openai_routes, server.api.streaming, server.api.auth; "
        "sys.exit('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr or "importing server.api.app imported torch"
