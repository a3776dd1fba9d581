"""Tool calling on the real server (CPU): ``tools``, ``tool_choice`` (none / auto / required / a named
function), ``parallel_tool_calls``, tool messages and assistant ``tool_calls`` in the history, streamed and
not, through the official ``openai`` client and raw HTTP checked against the OpenAI contract.

The demo model was never taught tools, so ``required`` and a named function are what prove the parsing:
the grammar forces a call in the parser's format and the arguments must validate against the function's
parameters (``jsonschema``). Each chat-template family (``tests/integration/tool_templates.py``) runs on a
copy of the demo base carrying that template, with its parser detected from the template."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from server.api.schemas import ChatCompletionRequest, parse_request
from server.runtime.tokenizer import HFTokenizer
from server.structured.tool_parsers import detect_tool_parser
from tests.integration.api_server import ServerProcess, assert_error, read_stream, start_server, validate
from tests.integration.tool_templates import EXPECTED_PARSER, FAMILIES

pytestmark = pytest.mark.slow

BASE = "demo-base"
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Paris", "Oslo", "Lima"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"zone": {"type": "string", "pattern": "^[A-Z]{3}$"}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
PARAMETERS = {"get_weather": WEATHER, "get_time": TIME}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, demo_bundle: Any) -> Iterator[ServerProcess]:
    process = start_server(
        tmp_path_factory.mktemp("tools"),
        [
            "--model",
            str(demo_bundle.base),
            "--adapter-dir",
            str(demo_bundle.adapters),
            "--served-model-name",
            BASE,
        ],
    )
    yield process
    assert process.terminate() == 0, process.log_tail()


def ask(model: str = BASE, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "tools": TOOLS,
        "max_tokens": 120,
        **extra,
    }


def check_calls(calls: list[dict[str, Any]], names: set[str] | None = None) -> None:
    assert calls
    for call in calls:
        assert call["type"] == "function" and call["id"].startswith("call_")
        name = call["function"]["name"]
        assert name in (names or PARAMETERS)
        jsonschema.validate(json.loads(call["function"]["arguments"]), PARAMETERS[name])


def streamed_calls(http: httpx.Client, body: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None, str]:
    """(tool calls assembled from the deltas as a client does, the finish reason, the streamed content)."""
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        chunks, done = read_stream(r)
    assert done
    calls: dict[int, dict[str, Any]] = {}
    content, reason = "", None
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk)
        choice = chunk["choices"][0]
        content += choice["delta"].get("content") or ""
        reason = choice["finish_reason"] or reason
        for delta in choice["delta"].get("tool_calls") or []:
            call = calls.setdefault(
                delta["index"], {"type": "function", "function": {"name": "", "arguments": ""}}
            )
            call["id"] = delta.get("id", call.get("id"))
            call["function"]["name"] += delta["function"].get("name") or ""
            call["function"]["arguments"] += delta["function"]["arguments"]
    return [calls[i] for i in sorted(calls)], reason, content


@pytest.mark.parametrize("model", [BASE, "shout", "digits", "pirate"])
def test_required_forces_a_valid_call(http: httpx.Client, model: str) -> None:
    r = http.post("/v1/chat/completions", json=ask(model, tool_choice="required", temperature=0.9, seed=5))
    assert r.status_code == 200, r.text
    body = r.json()
    validate("CreateChatCompletionResponse", body)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    check_calls(choice["message"]["tool_calls"])


def test_a_named_function_is_the_one_called(http: httpx.Client) -> None:
    named = {"type": "function", "function": {"name": "get_time"}}
    r = http.post("/v1/chat/completions", json=ask(tool_choice=named, n=3, temperature=1.0))
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        assert choice["finish_reason"] == "tool_calls"
        check_calls(choice["message"]["tool_calls"], {"get_time"})


def test_streamed_call_comes_in_pieces_and_assembles(http: httpx.Client) -> None:
    calls, reason, content = streamed_calls(http, ask(tool_choice="required", temperature=0.7, seed=2))
    assert reason == "tool_calls"
    assert content == ""
    check_calls(calls)


def test_parallel_calls_when_asked(http: httpx.Client) -> None:
    body = ask(tool_choice="required", parallel_tool_calls=True, temperature=1.0, seed=3, max_tokens=200)
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    if choice["finish_reason"] == "tool_calls":  # the model may also run out of tokens mid-call: length
        check_calls(choice["message"]["tool_calls"])
    else:
        assert choice["finish_reason"] == "length"


def test_tool_choice_none_answers_in_text(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json=ask(tool_choice="none", max_tokens=16))
    assert r.status_code == 200, r.text
    message = r.json()["choices"][0]["message"]
    assert isinstance(message["content"], str) and "tool_calls" not in message


def test_openai_round_trip_call_tool_message_answer(server: ServerProcess) -> None:
    client = server.openai()
    messages: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(
        model="pirate",
        messages=messages,
        tools=TOOLS,
        tool_choice="required",
        max_tokens=120,  # type: ignore[arg-type]
    )
    call = first.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert first.choices[0].finish_reason == "tool_calls"
    messages.append(first.choices[0].message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"sky": "sunny"})})
    answer = client.chat.completions.create(model="pirate", messages=messages, tools=TOOLS, max_tokens=24)  # type: ignore[arg-type]
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert isinstance(answer.choices[0].message.content, str)
    # the same conversation streamed
    stream = client.chat.completions.create(
        model="pirate",
        messages=messages,
        tools=TOOLS,
        max_tokens=24,
        stream=True,  # type: ignore[arg-type]
    )
    reasons = [c.choices[0].finish_reason for c in stream if c.choices and c.choices[0].finish_reason]
    assert reasons == [answer.choices[0].finish_reason] or reasons[0] in ("stop", "length", "tool_calls")


def test_unconstrained_and_tool_rows_in_one_batch(server: ServerProcess) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int) -> dict[str, Any]:
        body = ask(["shout", BASE, "digits"][i % 3], temperature=0.8, seed=i)
        if i % 2 == 0:
            body["tool_choice"] = "required"
        else:
            body = {"model": body["model"], "messages": body["messages"], "max_tokens": 24}
        with server.http() as client:
            r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        return dict(r.json()["choices"][0], forced=i % 2 == 0)

    with ThreadPoolExecutor(8) as pool:
        for choice in pool.map(one, range(8)):
            if choice["forced"]:
                assert choice["finish_reason"] == "tool_calls"
                check_calls(choice["message"]["tool_calls"])
            else:
                assert "tool_calls" not in choice["message"]


BIG = {
    "type": "object",
    "properties": {f"p{i}": {"type": "string", "description": "x" * 100} for i in range(700)},
}


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "c1",
                                "type": "function",
                                "function": {"name": "launch", "arguments": "{}"},
                            }
                        ],
                    },
                ]
            },
            "messages[1].tool_calls[0].function.name",
        ),
        ({"messages": [{"role": "tool", "content": "sunny"}]}, "messages[0].tool_call_id"),
        ({"messages": [{"role": "tool", "tool_call_id": "c1"}]}, "messages[0].content"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": BIG}}]},
            "tools[0].function.parameters",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}]},
            "tools[0].function.parameters",
        ),
        ({"tool_choice": {"type": "function", "function": {"name": "missing"}}}, "tool_choice.function.name"),
        ({"tools": [TOOLS[0], TOOLS[0]]}, "tools[1].function.name"),
        ({"tools": [], "tool_choice": "required"}, "tool_choice"),
    ],
)
def test_bad_tool_input_is_a_400_naming_the_field(
    http: httpx.Client, extra: dict[str, Any], param: str
) -> None:
    assert_error(http.post("/v1/chat/completions", json=ask(**extra)), 400, param)
    assert http.post("/v1/chat/completions", json=ask(max_tokens=2)).status_code == 200


# --------------------------------------------------------------------------------- template families


HISTORY = [
    {"role": "user", "content": "Weather?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_time", "arguments": '{"zone": "CET"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
    {"role": "user", "content": "And Paris?"},
]
HISTORY_CALL = {
    "qwen2.5": '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>',
    "hermes": '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>',
    "llama3.1": '{"name": "get_time", "parameters": {"zone": "CET"}}',
    "mistral": '[TOOL_CALLS] [{"name": "get_time", "arguments": {"zone": "CET"}, "id": "call_1"}]',
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_renders_tools_and_calls_in_its_own_format(
    family: str, demo_bundle: Any, tmp_path: Path
) -> None:
    base = tmp_path / f"demo-{family}"
    shutil.copytree(demo_bundle.base, base)
    (base / "chat_template.jinja").write_text(FAMILIES[family])
    from transformers import AutoTokenizer

    tokenizer = HFTokenizer(AutoTokenizer.from_pretrained(base))
    assert detect_tool_parser(tokenizer.hf.chat_template) == EXPECTED_PARSER[family]
    # the request's conversion renders the tools and the history's call in the family's own shape
    chat = parse_request(
        json.dumps(ask(messages=HISTORY, tool_choice="required")).encode(), ChatCompletionRequest
    )
    chat.check_supported(512)
    request = chat.to_generation_request("r", adapter=None, tenant="t")
    assert request.messages is not None
    prompt = tokenizer.hf.decode(tokenizer.encode_chat(request.messages, request.tools))
    assert '"get_weather"' in prompt and '"Paris"' in prompt  # the tools argument, with its schema
    assert HISTORY_CALL[family] in prompt, prompt
    process = start_server(tmp_path, ["--model", str(base), "--served-model-name", BASE])
    try:
        with process.http() as http:
            # the prompt carries the tools and a history call in the family's shape
            body = ask(messages=HISTORY, tool_choice="required", temperature=0.8, seed=1)
            r = http.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            assert choice["finish_reason"] == "tool_calls", choice
            check_calls(choice["message"]["tool_calls"])
            calls, reason, _ = streamed_calls(http, body)
            assert reason == "tool_calls"
            check_calls(calls)
    finally:
        assert process.terminate() == 0, process.log_tail()
