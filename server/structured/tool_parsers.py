"""Tool-call text -> OpenAI ``tool_calls``, one parser per chat-template family, and the grammar that forces
a call in that family's own format (``tool_choice`` ``required`` or a named function).

Names follow vLLM's ``--tool-call-parser``: ``hermes`` (``<tool_call>{json}</tool_call>``: Qwen2.5 and
Hermes templates), ``llama3_json`` (``{"name": ..., "parameters": ...}``, optionally after
``<|python_tag|>``, several separated by ``;``) and ``mistral`` (``[TOOL_CALLS] [{"name", "arguments"}]``).

A real tokenizer may hold a parser's marker as one special token (Mistral's ``[TOOL_CALLS]``, Llama 3's
``<|python_tag|>``): the reply is then decoded with those tokens kept (``ToolParser.markers``), and a forced
call's grammar emits the marker as that token (``<[id]>``), as the model itself would, not spelt as text.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal, Protocol

from server.engine.types import ToolCall

ToolParserName = Literal["hermes", "llama3_json", "mistral"]
TOOL_PARSERS: tuple[ToolParserName, ...] = ("hermes", "llama3_json", "mistral")
NO_SPECIAL_TOKENS: Mapping[str, int] = MappingProxyType({})  # every marker spelt as text


@dataclass(slots=True, frozen=True)
class FunctionSpec:
    """One function a request offers: its name and JSON Schema parameters."""

    name: str
    parameters: dict[str, Any]


@dataclass(slots=True, frozen=True)
class ParsedOutput:
    """A reply split into its text (None when it is only tool calls) and its calls, in order."""

    content: str | None
    tool_calls: tuple[ToolCall, ...]


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolParser(Protocol):
    name: ToolParserName
    # text at which a reply may start a call: a stream holds text back from here on
    start_marker: str
    # the format's marker strings: those the tokenizer has as special tokens stay in the decoded reply
    markers: tuple[str, ...]

    def parse(self, text: str) -> ParsedOutput: ...

    def forced_grammar(
        self, functions: list[FunctionSpec], *, parallel: bool, special: Mapping[str, int] = NO_SPECIAL_TOKENS
    ) -> str:
        """A Lark grammar (llguidance's dialect) whose every sentence is one call (or, with ``parallel``,
        one or more) of one of ``functions``, with arguments valid against its parameters. ``special``
        maps each marker the tokenizer has as a special token to its id: the grammar emits that token."""
        ...


def _marker(text: str, special: Mapping[str, int]) -> str:
    """A marker as a Lark terminal: its special token (``<[id]>``) when it is one, else the literal text."""
    token_id = special.get(text)
    return json.dumps(text) if token_id is None else f"<[{token_id}]>"


def _call_schema(functions: list[FunctionSpec], arguments_key: str) -> dict[str, Any]:
    return {
        "anyOf": [
            {
                "type": "object",
                "properties": {"name": {"const": f.name}, arguments_key: f.parameters or {"type": "object"}},
                "required": ["name", arguments_key],
                "additionalProperties": False,
            }
            for f in functions
        ]
    }


def _json_rule(schema: dict[str, Any]) -> str:
    # compact JSON (no free whitespace): a tiny model would otherwise pad until max_tokens
    compact = {**schema, "x-guidance": {"whitespace_flexible": False}}
    return f"%json {json.dumps(compact)}"  # property order kept: a call names its function first


def _to_call(item: Any, arguments_keys: tuple[str, ...]) -> ToolCall | None:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        return None
    arguments: Any = next((item[k] for k in arguments_keys if k in item), {})
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return ToolCall(id=new_call_id(), name=item["name"], arguments=text)


def _decode_objects(text: str) -> list[Any] | None:
    # One or more JSON values separated by whitespace or ';'; None if anything else is there.
    decoder = json.JSONDecoder()
    values, pos = [], 0
    while pos < len(text):
        while pos < len(text) and text[pos] in " \t\r\n;":
            pos += 1
        if pos == len(text):
            break
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return None
        values.append(value)
    return values


class HermesParser:
    name: ToolParserName = "hermes"
    start_marker: str = "<tool_call>"
    markers: tuple[str, ...] = ("<tool_call>", "</tool_call>")
    _CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)

    def parse(self, text: str) -> ParsedOutput:
        start = text.find(self.start_marker)
        if start < 0:
            return ParsedOutput(text, ())
        calls = []
        for match in self._CALL.finditer(text, start):
            try:
                call = _to_call(json.loads(match.group(1)), ("arguments", "parameters"))
            except json.JSONDecodeError:
                call = None
            if call is None:
                return ParsedOutput(text, ())  # not a well-formed call: the reply stays text
            calls.append(call)
        if not calls:
            return ParsedOutput(text, ())
        return ParsedOutput(text[:start].strip() or None, tuple(calls))

    def forced_grammar(
        self, functions: list[FunctionSpec], *, parallel: bool, special: Mapping[str, int] = NO_SPECIAL_TOKENS
    ) -> str:
        start = 'start: call ("\\n" call)*' if parallel else "start: call"
        call = f'{_marker("<tool_call>", special)} "\\n" body "\\n" {_marker("</tool_call>", special)}'
        return f"{start}\ncall: {call}\nbody: {_json_rule(_call_schema(functions, 'arguments'))}\n"


class Llama3JsonParser:
    name: ToolParserName = "llama3_json"
    start_marker: str = "{"
    _TAG = "<|python_tag|>"
    markers: tuple[str, ...] = (_TAG,)

    def parse(self, text: str) -> ParsedOutput:
        body = text.strip().removeprefix(self._TAG).strip()
        if not body.startswith("{"):
            return ParsedOutput(text, ())
        values = _decode_objects(body)
        calls = [_to_call(v, ("parameters", "arguments")) for v in values or []]
        if not calls or any(c is None for c in calls):
            return ParsedOutput(text, ())
        return ParsedOutput(None, tuple(c for c in calls if c is not None))

    def forced_grammar(
        self, functions: list[FunctionSpec], *, parallel: bool, special: Mapping[str, int] = NO_SPECIAL_TOKENS
    ) -> str:
        # the tag is optional in this format (Llama 3.1 puts it before code, not JSON calls): none forced
        start = 'start: body ("; " body)*' if parallel else "start: body"
        return f"{start}\nbody: {_json_rule(_call_schema(functions, 'parameters'))}\n"


class MistralParser:
    name: ToolParserName = "mistral"
    start_marker: str = "[TOOL_CALLS]"
    markers: tuple[str, ...] = ("[TOOL_CALLS]",)

    def parse(self, text: str) -> ParsedOutput:
        start = text.find(self.start_marker)
        if start < 0:
            return ParsedOutput(text, ())
        values = _decode_objects(text[start + len(self.start_marker) :])
        items = values[0] if values and len(values) == 1 and isinstance(values[0], list) else None
        calls = [_to_call(v, ("arguments", "parameters")) for v in items or []]
        if not calls or any(c is None for c in calls):
            return ParsedOutput(text, ())
        return ParsedOutput(text[:start].strip() or None, tuple(c for c in calls if c is not None))

    def forced_grammar(
        self, functions: list[FunctionSpec], *, parallel: bool, special: Mapping[str, int] = NO_SPECIAL_TOKENS
    ) -> str:
        schema: dict[str, Any] = {
            "type": "array",
            "items": _call_schema(functions, "arguments"),
            "minItems": 1,
        }
        if not parallel:
            schema["maxItems"] = 1
        return f'start: {_marker(self.start_marker, special)} " " body\nbody: {_json_rule(schema)}\n'


_PARSERS: dict[ToolParserName, ToolParser] = {
    "hermes": HermesParser(),
    "llama3_json": Llama3JsonParser(),
    "mistral": MistralParser(),
}


def tool_parser(name: ToolParserName) -> ToolParser:
    return _PARSERS[name]


def detect_tool_parser(chat_template: str | None) -> ToolParserName:
    """The parser for a chat template (``--tool-call-parser auto``): the format its tool calls take, with
    Hermes' as the default (Qwen2.5, Hermes and the demo model)."""
    template = chat_template or ""
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<tool_call>" in template:
        return "hermes"
    if "<|python_tag|>" in template or "ipython" in template:
        return "llama3_json"
    return "hermes"
