"""The tool-call parsers as tables (each family's text -> content and calls, malformed text stays text),
detection from chat templates, and each forced-call grammar: its sentences parse back into valid calls."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
from tokenizers import AddedToken
from transformers import AutoTokenizer

from server.engine.detokenizer import IncrementalDetokenizer
from server.runtime.tokenizer import HFTokenizer
from server.structured.grammar import GrammarCompiler, GrammarSpec
from server.structured.tool_parsers import (
    TOOL_PARSERS,
    FunctionSpec,
    ParsedOutput,
    detect_tool_parser,
    tool_parser,
)
from tests.integration.tool_templates import EXPECTED_PARSER, FAMILIES


def calls(out: ParsedOutput) -> list[tuple[str, Any]]:
    return [(c.name, json.loads(c.arguments)) for c in out.tool_calls]


PARSE_CASES = [
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>', None, [("f", {"a": 1})]),
    (
        "hermes",
        'Sure. <tool_call>{"name": "f", "arguments": {}}</tool_call>\n<tool_call>{"name": "g", "arguments": {"b": "x"}}</tool_call>',
        "Sure.",
        [("f", {}), ("g", {"b": "x"})],
    ),
    ("hermes", "no call here", "no call here", []),
    ("hermes", "<tool_call>{broken</tool_call>", "<tool_call>{broken</tool_call>", []),
    ("hermes", "", "", []),
    ("llama3_json", '{"name": "f", "parameters": {"a": 1}}', None, [("f", {"a": 1})]),
    (
        "llama3_json",
        '<|python_tag|>{"name": "f", "parameters": {}}; {"name": "g", "parameters": {"z": 0}}',
        None,
        [("f", {}), ("g", {"z": 0})],
    ),
    ("llama3_json", '{"not": "a call"}', '{"not": "a call"}', []),
    ("llama3_json", "Hello {there}", "Hello {there}", []),
    ("mistral", '[TOOL_CALLS] [{"name": "f", "arguments": {"a": [1]}}]', None, [("f", {"a": [1]})]),
    (
        "mistral",
        'ok [TOOL_CALLS][{"name": "f", "arguments": {}}, {"name": "g", "arguments": {}}]',
        "ok",
        [("f", {}), ("g", {})],
    ),
    ("mistral", "[TOOL_CALLS] [oops", "[TOOL_CALLS] [oops", []),
]


@pytest.mark.parametrize(("parser", "text", "content", "expected"), PARSE_CASES)
def test_parse(parser: str, text: str, content: str | None, expected: list[tuple[str, Any]]) -> None:
    out = tool_parser(parser).parse(text)  # type: ignore[arg-type]
    assert out.content == content
    assert calls(out) == expected
    assert all(c.id.startswith("call_") for c in out.tool_calls)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_detect_from_template(family: str) -> None:
    assert detect_tool_parser(FAMILIES[family]) == EXPECTED_PARSER[family]


@pytest.mark.parametrize("template", [None, "", "{{ messages }}"])
def test_detect_defaults_to_hermes(template: str | None) -> None:
    assert detect_tool_parser(template) == "hermes"


FUNCTIONS = [
    FunctionSpec(
        "get_weather",
        {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"]},
    ),
    FunctionSpec("noop", {"type": "object", "properties": {}}),
]
SENTENCES = {
    "hermes": (
        '<tool_call>\n{"name":"get_weather","arguments":{"city":"Oslo"}}\n</tool_call>',
        '<tool_call>\n{"name":"get_weather","arguments":{"city":"Rome"}}\n</tool_call>',
    ),
    "llama3_json": ('{"name":"noop","parameters":{}}', '{"name":"other","parameters":{}}'),
    "mistral": ('[TOOL_CALLS] [{"name":"get_weather","arguments":{"city":"Paris"}}]', "[TOOL_CALLS] []"),
}


@pytest.mark.parametrize("parser", TOOL_PARSERS)
def test_forced_grammar_admits_valid_calls_only(parser: str, demo_bundle: Any) -> None:
    hf = AutoTokenizer.from_pretrained(demo_bundle.base)
    compiler = GrammarCompiler(hf, vocab_size=len(hf), eos_token_ids=[hf.eos_token_id])
    p = tool_parser(parser)  # type: ignore[arg-type]
    spec = GrammarSpec("grammar", p.forced_grammar(FUNCTIONS, parallel=False), "tools")
    good, bad = SENTENCES[parser]
    for text, ok in ((good, True), (bad, False)):
        constraint = compiler.compile(spec)
        accepted = all(constraint.accept(t) for t in hf.encode(text, add_special_tokens=False))
        assert (accepted and constraint.is_complete) is ok, text
    parsed = p.parse(good)
    (call,) = parsed.tool_calls
    schema = next(f.parameters for f in FUNCTIONS if f.name == call.name)
    jsonschema.validate(json.loads(call.arguments), schema)


@pytest.mark.parametrize("parser", ["hermes", "mistral"])
def test_special_markers_are_kept_in_the_text_and_forced_as_tokens(parser: str, demo_bundle: Any) -> None:
    # a real tokenizer's markers: added tokens marked special (not in ``all_special_ids``)
    hf = AutoTokenizer.from_pretrained(demo_bundle.base)
    p = tool_parser(parser)  # type: ignore[arg-type]
    hf.add_tokens([AddedToken(m, special=True, normalized=False) for m in p.markers])
    tokenizer = HFTokenizer(hf)
    special = {m: tokenizer.special_token_id(m) for m in p.markers}
    assert all(i is not None and i >= len(hf) - len(p.markers) for i in special.values())
    assert tokenizer.special_token_id("get_weather") is None
    marker_ids = {i for i in special.values() if i is not None}
    good = SENTENCES[parser][0]
    ids = hf.encode(good, add_special_tokens=False)
    assert marker_ids <= set(ids)  # each marker is its special token in the text the model writes
    eos = hf.eos_token_id
    # skip_special_tokens drops the markers (no call found); keeping them (only them: not eos) finds it
    assert not p.parse(tokenizer.decode([*ids, eos])).tool_calls
    kept = tokenizer.decode([*ids, eos], keep_special_token_ids=marker_ids)
    assert kept == good
    detok = IncrementalDetokenizer(tokenizer, [hf.bos_token_id], keep_special_token_ids=marker_ids)
    assert "".join(detok.add(t) for t in [*ids, eos]) + detok.flush() == good
    assert p.parse(kept).tool_calls
    # the forced grammar emits the markers as those tokens, and no longer as text spelt in pieces
    compiler = GrammarCompiler(hf, vocab_size=len(hf), eos_token_ids=[eos])
    grammar = p.forced_grammar(
        FUNCTIONS, parallel=False, special={m: i for m, i in special.items() if i is not None}
    )
    assert all(f"<[{i}]>" in grammar for i in marker_ids)
    constraint = compiler.compile(GrammarSpec("grammar", grammar, "tools"))
    assert all(constraint.accept(t) for t in ids) and constraint.is_complete
    spelt = compiler.compile(GrammarSpec("grammar", grammar, "tools"))
    assert not all(
        spelt.accept(t) for t in hf.encode(good, split_special_tokens=True, add_special_tokens=False)
    )
