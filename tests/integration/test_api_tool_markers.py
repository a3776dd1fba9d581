"""Tool-call markers that are special tokens, as on real tokenizers: Mistral's ``[TOOL_CALLS]``, Llama 3's
``<|python_tag|>`` and, here too, Hermes' ``<tool_call>`` / ``</tool_call>``. Output text is decoded with
``skip_special_tokens``, which would drop them: a request with tools keeps its parser's markers visible (and
only those), and a forced call's grammar emits each marker as its special token, as the model would.

Each family runs on a copy of the demo base whose tokenizer has the family's markers added as special tokens
(embeddings resized to match) and whose chat template is the family's. The demo model was never taught
tools, so ``tool_choice: auto`` is driven by a ``structured_outputs`` grammar that writes a call with the
marker token (referenced by id): what is proved is that the auto parser, which sees only the decoded text,
finds the call."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from tests.integration.api_server import ServerProcess, read_stream, start_server, validate
from tests.integration.tool_templates import FAMILIES

pytestmark = pytest.mark.slow

BASE = "demo-base"
TIME = {
    "type": "object",
    "properties": {"zone": {"enum": ["CET", "UTC", "PST"]}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS = [{"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
MARKERS = {
    "mistral": ("[TOOL_CALLS]",),
    "llama3.1": ("<|python_tag|>",),
    "hermes": ("<tool_call>", "</tool_call>"),
}
# The call each format writes, with the markers as tokens, for tool_choice auto: ``{m0}`` / ``{m1}`` are
# the markers' token ids.
AUTO_GRAMMARS = {
    "mistral": 'start: <[{m0}]> " [" body "]"\nbody: %json {call}\n',
    "llama3.1": "start: <[{m0}]> body\nbody: %json {call}\n",
    "hermes": 'start: <[{m0}]> "\\n" body "\\n" <[{m1}]>\nbody: %json {call}\n',
}


def _call_schema(arguments_key: str) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": "get_time"}, arguments_key: TIME},
        "required": ["name", arguments_key],
        "additionalProperties": False,
        "x-guidance": {"whitespace_flexible": False},
    }


def build_family_base(demo_base: Path, out: Path, family: str) -> dict[str, int]:
    """A copy of the demo base with ``family``'s markers as added special tokens and its chat template;
    returns the markers' ids."""
    from tokenizers import AddedToken
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_base)
    tokenizer.add_tokens([AddedToken(m, special=True, normalized=False) for m in MARKERS[family]])
    model = AutoModelForCausalLM.from_pretrained(demo_base)
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "chat_template.jinja").write_text(FAMILIES[family])
    ids = {m: int(tokenizer.convert_tokens_to_ids(m)) for m in MARKERS[family]}
    assert all(i >= len(tokenizer) - len(ids) for i in ids.values())  # new tokens, not text the vocab had
    return ids


@pytest.fixture(scope="module", params=sorted(MARKERS))
def family(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def marker_server(
    family: str, tmp_path_factory: pytest.TempPathFactory, demo_bundle: Any
) -> Iterator[tuple[ServerProcess, dict[str, int]]]:
    root = tmp_path_factory.mktemp(f"markers-{family.replace('.', '')}")
    ids = build_family_base(demo_bundle.base, root / "base", family)
    process = start_server(root, ["--model", str(root / "base"), "--served-model-name", BASE])
    yield process, ids
    assert process.terminate() == 0, process.log_tail()


@pytest.fixture(scope="module")
def client(marker_server: tuple[ServerProcess, dict[str, int]]) -> Iterator[httpx.Client]:
    with marker_server[0].http() as http:
        yield http


def ask(**extra: Any) -> dict[str, Any]:
    return {
        "model": BASE,
        "messages": [{"role": "user", "content": "What time is it in Paris?"}],
        "tools": TOOLS,
        "max_tokens": 60,
        "temperature": 0.8,
        "seed": 4,
        **extra,
    }


def auto_grammar(family: str, ids: dict[str, int]) -> str:
    arguments_key = "parameters" if family == "llama3.1" else "arguments"
    marker_ids = list(ids.values())
    return AUTO_GRAMMARS[family].format(
        m0=marker_ids[0], m1=marker_ids[-1], call=json.dumps(_call_schema(arguments_key))
    )


def check_call(calls: list[dict[str, Any]]) -> None:
    assert len(calls) == 1, calls
    assert calls[0]["function"]["name"] == "get_time" and calls[0]["id"].startswith("call_")
    jsonschema.validate(json.loads(calls[0]["function"]["arguments"]), TIME)


def streamed(http: httpx.Client, body: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None, str]:
    """(tool calls assembled from the deltas, the finish reason, the streamed content)."""
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
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
            call = calls.setdefault(delta["index"], {"function": {"name": "", "arguments": ""}})
            call["id"] = delta.get("id", call.get("id"))
            call["function"]["name"] += delta["function"].get("name") or ""
            call["function"]["arguments"] += delta["function"]["arguments"]
    return [calls[i] for i in sorted(calls)], reason, content


def test_auto_finds_a_call_written_with_the_marker_token(
    client: httpx.Client, marker_server: tuple[ServerProcess, dict[str, int]], family: str
) -> None:
    ids = marker_server[1]
    body = ask(tool_choice="auto", structured_outputs={"grammar": auto_grammar(family, ids)}, logprobs=True)
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    validate("CreateChatCompletionResponse", r.json())
    choice = r.json()["choices"][0]
    # the reply really began with the marker token (logprob entries show each token's own text)
    assert choice["logprobs"]["content"][0]["token"] == next(iter(ids))
    assert choice["finish_reason"] == "tool_calls", choice
    assert choice["message"]["content"] is None
    check_call(choice["message"]["tool_calls"])
    calls, reason, content = streamed(client, body)
    assert (reason, content) == ("tool_calls", "")  # nothing of the call leaked out as content
    check_call(calls)


@pytest.mark.parametrize("stream", [False, True])
def test_forced_call_emits_the_marker_as_its_special_token(
    client: httpx.Client, marker_server: tuple[ServerProcess, dict[str, int]], family: str, stream: bool
) -> None:
    ids = marker_server[1]
    body = ask(tool_choice="required")
    if stream:
        calls, reason, content = streamed(client, body)
        assert (reason, content) == ("tool_calls", "")
        check_call(calls)
        return
    r = client.post("/v1/chat/completions", json={**body, "logprobs": True})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    assert choice["message"]["content"] is None
    check_call(choice["message"]["tool_calls"])
    tokens = [entry["token"] for entry in choice["logprobs"]["content"]]
    if family == "llama3.1":  # its format has no marker to force: the call is bare JSON
        assert not set(tokens) & set(ids)
    else:
        # the first marker is one token (its id in the grammar), not the text spelt in pieces
        assert tokens[0] == next(iter(ids)), tokens
        assert all(tokens.count(marker) == 1 for marker in ids), tokens


def test_other_special_tokens_stay_out_of_the_content(client: httpx.Client) -> None:
    # the grammar writes the role tag <|system|>, a special token, into the reply: only markers are kept
    body = ask(tool_choice="auto", structured_outputs={"grammar": 'start: "ok" <[3]> "done"\n'})
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == "okdone", choice
    assert "tool_calls" not in choice["message"]
