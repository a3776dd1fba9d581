"""The request fields that constrain what is generated: ``response_format`` (OpenAI), ``structured_outputs``
and its older ``guided_*`` names (vLLM), and ``tools`` / ``tool_choice`` (OpenAI). Validated here, resolved
into at most one ``GrammarSpec`` naming the field it came from; compiling it is the route's job (off the
event loop, see ``server.structured.grammar``)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from server.engine.types import InvalidRequestError
from server.structured.grammar import MAX_CHOICES, MAX_GRAMMAR_CHARS, GrammarSpec
from server.structured.tool_parsers import NO_SPECIAL_TOKENS, FunctionSpec, ToolParser

MAX_TOOLS = 128
MAX_CHOICE_CHARS = 1024
FUNCTION_NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"


class JsonSchemaFormat(BaseModel):
    """OpenAI's ``response_format.json_schema``."""

    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)

    name: str = Field(min_length=1, max_length=64)
    description: str | None = Field(None, max_length=4096)
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormatIn(BaseModel):
    """OpenAI's ``response_format``: ``text`` (no constraint), ``json_object`` or ``json_schema``."""

    model_config = ConfigDict(strict=True, extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


def check_choices(value: list[str] | None) -> list[str] | None:
    if value is not None and any(not c or len(c) > MAX_CHOICE_CHARS for c in value):
        raise PydanticCustomError("choice", f"each choice must have 1 to {MAX_CHOICE_CHARS} characters")
    return value


class StructuredOutputsIn(BaseModel):
    """vLLM's ``structured_outputs``: exactly one of ``json`` (a schema), ``regex``, ``choice``, ``grammar``
    (Lark, llguidance's dialect) or ``json_object``."""

    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = Field(None, min_length=1)
    choice: list[str] | None = Field(None, min_length=1, max_length=MAX_CHOICES)
    grammar: str | None = Field(None, min_length=1)
    json_object: bool | None = None

    _check_choice = field_validator("choice")(check_choices)


class FunctionIn(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    name: str = Field(pattern=FUNCTION_NAME_PATTERN)
    description: str | None = Field(None, max_length=8192)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolIn(BaseModel):
    """OpenAI's function tool."""

    model_config = ConfigDict(strict=True, extra="forbid")

    type: Literal["function"]
    function: FunctionIn


class NamedFunction(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    name: str = Field(pattern=FUNCTION_NAME_PATTERN)


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


def json_schema_spec(schema: Any, param: str) -> GrammarSpec:
    """A schema given as an object or as JSON text -> its ``GrammarSpec`` (400 naming ``param``)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(f"{param} is not valid JSON: {exc}", param=param) from None
    return GrammarSpec.json_schema(schema, param)


def output_grammar(
    response_format: ResponseFormatIn | None,
    structured: StructuredOutputsIn | None,
    guided: dict[str, Any],
) -> GrammarSpec | None:
    """The one grammar the output must match, or None; two sources at once are a 400 naming the second."""
    found: list[GrammarSpec] = []
    if response_format is not None and response_format.type == "json_object":
        found.append(GrammarSpec("json_object", "", "response_format"))
    elif response_format is not None and response_format.type == "json_schema":
        if response_format.json_schema is None or response_format.json_schema.schema_ is None:
            raise InvalidRequestError(
                "response_format.json_schema.schema is required with type json_schema",
                param="response_format.json_schema.schema",
            )
        found.append(
            json_schema_spec(response_format.json_schema.schema_, "response_format.json_schema.schema")
        )
    sources: list[tuple[str, str, Any]] = [(f"guided_{k}", k, v) for k, v in guided.items() if v is not None]
    if structured is not None:
        given = structured.model_dump(by_alias=True, exclude_none=True)
        if not given:
            raise InvalidRequestError(
                "structured_outputs needs one of json, regex, choice, grammar or json_object",
                param="structured_outputs",
            )
        sources += [(f"structured_outputs.{k}", k, v) for k, v in given.items()]
    for param, kind, value in sources:
        if kind == "json":
            found.append(json_schema_spec(value, param))
        elif kind == "json_object":
            if value:
                found.append(GrammarSpec("json_object", "", param))
        elif kind == "choice":
            found.append(GrammarSpec("choice", json.dumps(value), param))
        else:
            found.append(GrammarSpec("regex" if kind == "regex" else "grammar", value, param))
    if len(found) > 1:
        raise InvalidRequestError(
            f"give at most one output constraint ({found[0].param} and {found[1].param} were both given)",
            param=found[1].param,
        )
    return found[0] if found else None


def function_specs(tools: list[ToolIn]) -> list[FunctionSpec]:
    """The offered functions; a name given twice or parameters over the size bound are 400s naming them."""
    seen: set[str] = set()
    out = []
    for i, tool in enumerate(tools):
        f = tool.function
        if f.name in seen:
            raise InvalidRequestError(
                f"the function {f.name!r} is defined twice", param=f"tools[{i}].function.name"
            )
        seen.add(f.name)
        parameters = f.parameters if f.parameters is not None else {"type": "object", "properties": {}}
        if len(json.dumps(parameters)) > MAX_GRAMMAR_CHARS:
            raise InvalidRequestError(
                f"the parameters schema is larger than {MAX_GRAMMAR_CHARS} characters",
                param=f"tools[{i}].function.parameters",
            )
        out.append(FunctionSpec(f.name, parameters))
    return out


def tool_call_grammar(
    parser: ToolParser,
    functions: list[FunctionSpec],
    choice: ToolChoice,
    *,
    parallel: bool,
    special: Mapping[str, int] = NO_SPECIAL_TOKENS,
) -> GrammarSpec | None:
    """``required`` / a named function -> a grammar forcing a call in the parser's format; None otherwise.
    The grammar embeds every offered function's parameters, so a bad parameters schema is a 400 on
    ``tools`` (compiled like any other grammar). ``special``: the parser's markers that are special tokens
    of the tokenizer, by id (the grammar emits those tokens)."""
    if choice == "required":
        chosen = functions
    elif isinstance(choice, NamedToolChoice):
        chosen = [f for f in functions if f.name == choice.function.name]
        if not chosen:
            raise InvalidRequestError(
                f"tool_choice names {choice.function.name!r}, which is not in tools",
                param="tool_choice.function.name",
            )
    else:
        return None
    return GrammarSpec("grammar", parser.forced_grammar(chosen, parallel=parallel, special=special), "tools")
