"""Structured outputs on the real server (demo bundle, CPU): ``response_format`` (json_object, json_schema),
vLLM's ``structured_outputs`` and ``guided_*`` aliases on both routes, streamed and not, for the base and
every adapter, alone and in one batch with unconstrained requests.

The demo model is tiny and was never taught JSON: whatever parses here, the grammar's token mask made so.
Every answer that finishes with ``stop`` must parse and validate against its schema (``jsonschema``, an
independent validator); bad constraints are 400s naming the field."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import jsonschema
import pytest
from pydantic import BaseModel, Field

from tests.integration.api_server import ServerProcess, assert_error, read_stream, start_server, validate

pytestmark = pytest.mark.slow

BASE = "demo-base"
ADAPTERS = ("shout", "digits", "pirate")
MODELS = (BASE, *ADAPTERS)
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "pet": {"enum": ["cat", "dog", "owl"]},
    },
    "required": ["name", "age", "pet"],
    "additionalProperties": False,
}


class Animal(BaseModel):
    # Bounded fields: a tiny model never chooses to close an unbounded string (it runs into max_tokens and
    # reports ``length``); the bounds put the end of every field in the grammar.
    kind: str = Field(max_length=10)
    legs: int = Field(ge=0, le=8)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, demo_bundle: Any) -> Iterator[ServerProcess]:
    process = start_server(
        tmp_path_factory.mktemp("structured"),
        [
            "--model",
            str(demo_bundle.base),
            "--adapter-dir",
            str(demo_bundle.adapters),
            "--served-model-name",
            BASE,
            "--max-model-len",
            "512",
            "--max-num-seqs",
            "8",
        ],
    )
    yield process
    assert process.terminate() == 0, process.log_tail()


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "Tell me about the cat."}],
        "max_tokens": 120,
        **extra,
    }


def person_format() -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}


def check_person(text: str) -> None:
    jsonschema.validate(json.loads(text), PERSON)


@pytest.mark.parametrize("model", MODELS)
def test_openai_parse_returns_the_pydantic_object(server: ServerProcess, model: str) -> None:
    client = server.openai()
    completion = client.chat.completions.parse(
        model=model,
        messages=[{"role": "user", "content": "Describe an animal."}],
        response_format=Animal,
        max_tokens=120,
        temperature=0.8,
        seed=7,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Animal)


@pytest.mark.parametrize("model", MODELS)
def test_json_schema_validates_and_the_body_keeps_the_contract(http: httpx.Client, model: str) -> None:
    r = http.post("/v1/chat/completions", json=chat(model, response_format=person_format(), n=2, seed=3))
    assert r.status_code == 200, r.text
    body = r.json()
    validate("CreateChatCompletionResponse", body)
    for choice in body["choices"]:
        assert choice["finish_reason"] == "stop"
        check_person(choice["message"]["content"])


def test_json_object_is_an_object(http: httpx.Client) -> None:
    # Free-form JSON has no bound: a tiny model may run into max_tokens, which is reported as such; every
    # answer that stops is an object, and every one is on its way to one.
    body = chat("pirate", response_format={"type": "json_object"}, temperature=1.0, n=4, seed=11)
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        content = choice["message"]["content"]
        assert content.startswith("{"), content
        if choice["finish_reason"] == "stop":
            assert isinstance(json.loads(content), dict)
        else:
            assert choice["finish_reason"] == "length"
            assert r.json()["usage"]["completion_tokens"] >= 120


def test_text_format_is_unconstrained(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json=chat(BASE, response_format={"type": "text"}, max_tokens=8))
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("field", "value", "check"),
    [
        ("regex", r"[a-z]{3}-\d{2}", lambda t: re.fullmatch(r"[a-z]{3}-\d{2}", t)),
        ("choice", ["yes", "no", "maybe"], lambda t: t in ("yes", "no", "maybe")),
        ("json", PERSON, lambda t: jsonschema.validate(json.loads(t), PERSON) is None),
        ("grammar", 'start: "x" ("y" | "z")+ "!"', lambda t: re.fullmatch(r"x[yz]+!", t)),
    ],
)
@pytest.mark.parametrize("route", ["completions", "chat"])
@pytest.mark.parametrize("alias", [False, True])
def test_structured_outputs_on_both_routes(
    http: httpx.Client, route: str, field: str, value: Any, check: Any, alias: bool
) -> None:
    if alias and field == "grammar":
        pytest.skip(
            "guided_grammar takes vLLM's EBNF in vLLM; here it is Lark, tested via structured_outputs"
        )
    extra = {f"guided_{field}": value} if alias else {"structured_outputs": {field: value}}
    if route == "chat":
        r = http.post("/v1/chat/completions", json=chat("digits", **extra))
    else:
        r = http.post(
            "/v1/completions", json={"model": "shout", "prompt": "The cow", "max_tokens": 120, **extra}
        )
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    text = choice["message"]["content"] if route == "chat" else choice["text"]
    assert choice["finish_reason"] == "stop", text
    assert check(text), text


def test_streamed_json_schema_concatenates_to_valid_json(http: httpx.Client) -> None:
    body = chat("shout", response_format=person_format(), stream=True, temperature=0.9)
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        chunks, done = read_stream(r)
    assert done
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    check_person(text)


def test_length_is_reported_as_length(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json=chat(BASE, response_format=person_format(), max_tokens=3))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] == "length"


def test_constrained_and_free_rows_of_every_adapter_share_batches(server: ServerProcess) -> None:
    # Twelve requests at once on 8 slots: constrained and unconstrained, base and every adapter, so decode
    # steps mix them. Each constrained answer validates; each free one matches what it gives alone (greedy).
    free_alone = {}
    with server.http() as client:
        for model in MODELS:
            r = client.post("/v1/chat/completions", json=chat(model, max_tokens=24, temperature=0.0))
            free_alone[model] = r.json()["choices"][0]["message"]["content"]

    def one(i: int) -> tuple[str, bool, dict[str, Any]]:
        model = MODELS[i % len(MODELS)]
        constrained = i % 2 == 0
        extra = {"response_format": person_format(), "seed": i} if constrained else {"max_tokens": 24}
        with server.http() as client:
            r = client.post("/v1/chat/completions", json=chat(model, temperature=0.0, **extra))
        assert r.status_code == 200, r.text
        return model, constrained, r.json()

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, range(12)))
    for model, constrained, body in results:
        choice = body["choices"][0]
        if constrained:
            assert choice["finish_reason"] == "stop"
            check_person(choice["message"]["content"])
        else:
            assert choice["message"]["content"] == free_alone[model]


def test_the_same_schema_serves_request_after_request(http: httpx.Client) -> None:
    # the second and third requests take the compiled grammar from the cache (tests/unit/test_structured.py)
    schema = {
        "type": "object",
        "properties": {"only_once": {"type": "boolean"}},
        "required": ["only_once"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "once", "schema": schema}}
    for _ in range(3):
        r = http.post("/v1/chat/completions", json=chat(BASE, response_format=fmt))
        assert r.status_code == 200, r.text
        assert json.loads(r.json()["choices"][0]["message"]["content"]) in (
            {"only_once": True},
            {"only_once": False},
        )


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "nope"}},
                }
            },
            "response_format.json_schema.schema",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format.json_schema.schema",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "string", "format": "zzz"}},
                }
            },
            "response_format.json_schema.schema",
        ),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": "json"}, "response_format"),
        ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
        ({"structured_outputs": {"regex": "(?=lookahead)x"}}, "structured_outputs.regex"),
        ({"structured_outputs": {"grammar": "start: ???"}}, "structured_outputs.grammar"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
        ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json"),
        ({"structured_outputs": {}}, "structured_outputs"),
        ({"structured_outputs": {"colour": "red"}}, "structured_outputs.colour"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs.choice"),
        ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex"),
        (
            {
                "guided_json": {
                    "type": "object",
                    "properties": {"a": {"type": "string", "pattern": "x" * 70000}},
                }
            },
            "guided_json",
        ),
        ({"response_format": {"type": "json_object"}, "stop": ["}"]}, "stop"),
        ({"structured_outputs": {"choice": ["yes", "no"]}, "stop": "e"}, "stop"),
        ({"response_format": {"type": "json_object"}, "stop_token_ids": [5]}, "stop_token_ids"),
        # needs the text of a special token, which no ordinary token of the demo vocabulary spells
        ({"structured_outputs": {"grammar": 'start: "<|system|>"\n'}}, "structured_outputs.grammar"),
        ({"guided_whitespace_pattern": " "}, "guided_whitespace_pattern"),
        ({"guided_decoding_backend": "xgrammar"}, "guided_decoding_backend"),
    ],
)
def test_bad_constraints_are_400s_naming_the_field(
    http: httpx.Client, extra: dict[str, Any], param: str
) -> None:
    r = http.post("/v1/chat/completions", json=chat(BASE, **extra))
    assert_error(r, 400, param)
    assert (
        http.post("/v1/chat/completions", json=chat(BASE, max_tokens=2)).status_code == 200
    )  # still serving
