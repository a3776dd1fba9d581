"""Pydantic models of the OpenAI requests and responses, and the one conversion the API owns:
HTTP body -> ``CompletionRequest`` / ``ChatCompletionRequest`` (validated) -> ``GenerationRequest``.

Bad input never gets past this module: ``parse_request`` raises ``InvalidRequestError`` (400) naming the
offending ``param`` for malformed or deeply nested JSON, NaN/Infinity (raw ``NaN`` tokens included), wrong
types, out-of-range values, OpenAI or vLLM features this server does not implement, and fields it does not
know. A field is either honoured, or refused, or on the short list of fields that change nothing about
generation and are ignored (``IGNORED_FIELDS``): a vLLM field such as ``guided_json`` is never silently
dropped.
"""

from __future__ import annotations

import json
import math
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from server.api.constraints import (
    MAX_TOOLS,
    NamedToolChoice,
    ResponseFormatIn,
    StructuredOutputsIn,
    ToolChoice,
    ToolIn,
    check_choices,
    output_grammar,
)
from server.engine.types import (
    MAX_LOGIT_BIAS,
    MAX_LOGIT_BIAS_ENTRIES,
    MAX_LOGPROBS,
    MAX_SEED,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    ChatMessage,
    FinishReason,
    GenerationRequest,
    InvalidRequestError,
    SamplingParams,
    ToolCall,
)
from server.structured.grammar import MAX_CHOICES as MAX_GRAMMAR_CHOICES
from server.structured.grammar import GrammarSpec

MAX_JSON_DEPTH = 32
MAX_MODEL_NAME_CHARS = 256
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's and vLLM's default for /v1/completions
MAX_N = 16  # choices per prompt
MAX_PROMPTS = 32  # prompts in one /v1/completions request
MAX_CHOICES = 64  # prompts x n
# Fields that change nothing about what is generated (OpenAI's bookkeeping): accepted and ignored.
IGNORED_FIELDS = frozenset({"metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key"})
_SEED_STRIDE = 0x9E3779B97F4A7C15  # choice j of a seeded request samples with seed + j * stride (mod 2**64)

# ------------------------------------------------------------------------------------------ JSON body


def parse_json(raw: bytes) -> Any:
    """Strict JSON: no NaN/Infinity (raw tokens or overflowing literals), at most ``MAX_JSON_DEPTH``
    levels of nesting. Raises ``InvalidRequestError``; ``param`` names where a non-finite number sits."""
    try:
        value = json.loads(raw, parse_constant=_non_finite, parse_float=float)
    except RecursionError:
        raise InvalidRequestError(f"the JSON body is nested deeper than {MAX_JSON_DEPTH} levels") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"the body is not valid JSON: {exc}") from None
    except ValueError as exc:  # e.g. an integer literal with thousands of digits
        raise InvalidRequestError(f"the body is not acceptable JSON: {exc}") from None
    _check_tree(value)
    return value


def _non_finite(token: str) -> float:
    return float(token)  # NaN / Infinity / -Infinity: kept, then refused with its path by _check_tree


def _check_tree(root: Any) -> None:
    # Iterative walk: depth and non-finite floats, with the path of the offender.
    stack: list[tuple[Any, str, int]] = [(root, "", 1)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, dict | list):
            if depth > MAX_JSON_DEPTH:
                raise InvalidRequestError(
                    f"the JSON body is nested deeper than {MAX_JSON_DEPTH} levels", param=path or None
                )
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, child in items:
                child_path = f"{path}[{key}]" if isinstance(key, int) else (f"{path}.{key}" if path else key)
                stack.append((child, child_path, depth + 1))
        elif isinstance(value, float) and not math.isfinite(value):
            raise InvalidRequestError(
                f"{path or 'the body'} must be a finite number (NaN and Infinity are not JSON)",
                param=path or None,
            )


ModelT = TypeVar("ModelT", bound=BaseModel)


def parse_request(raw: bytes, model: type[ModelT]) -> ModelT:
    """Body bytes -> a validated request model, or ``InvalidRequestError`` naming the field."""
    value = parse_json(raw)
    if not isinstance(value, dict):
        raise InvalidRequestError("the body must be a JSON object")
    if issubclass(model, GenerationFields):
        value = {k: v for k, v in value.items() if k not in IGNORED_FIELDS}
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        param = _param_from_loc(value, error["loc"], missing=error["type"] == "missing")
        message = str(error["msg"])
        if error["type"] == "extra_forbidden":
            message = "this field is not supported by this server"
        raise InvalidRequestError(f"{param}: {message}" if param else message, param=param) from None


def _param_from_loc(body: Any, loc: tuple[int | str, ...], *, missing: bool) -> str | None:
    # pydantic puts union member tags ("str", "list[str]") in ``loc``; keep only the parts that exist in
    # the body, so ``("stop", "list[str]", 0)`` becomes ``stop[0]``.
    out = ""
    node = body
    for part in loc:
        if isinstance(node, dict) and isinstance(part, str) and part in node:
            out = f"{out}.{part}" if out else part
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            out += f"[{part}]"
            node = node[part]
        elif missing and isinstance(node, dict) and isinstance(part, str):
            return f"{out}.{part}" if out else part
    return out or None


# ------------------------------------------------------------------------------------------ requests


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    include_usage: bool | None = False
    # vLLM's extension: with include_usage, every chunk carries the usage so far (per-token accounting for
    # clients and benchmarks when the detokenizer merges tokens into one chunk)
    continuous_usage_stats: bool | None = False


def _is_default(value: Any, defaults: tuple[Any, ...]) -> bool:
    return any(value is d or (type(value) is type(d) and value == d) for d in defaults)


class GenerationFields(BaseModel):
    """Fields shared by both endpoints. A field this server does not know is refused (400 naming it),
    except ``IGNORED_FIELDS``; known OpenAI features that it lacks are refused unless they carry their
    default."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)

    model: str = Field(min_length=1, max_length=MAX_MODEL_NAME_CHARS)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-MAX_SEED - 1, le=MAX_SEED)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    user: str | None = Field(None, max_length=256)
    n: int | None = Field(None, ge=1, le=MAX_N)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logit_bias: Any = None  # {"token id": bias in [-100, 100]}, checked by _check_logit_bias
    # vLLM's extras
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    ignore_eos: bool | None = None
    min_tokens: int | None = Field(None, ge=0)
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    return_tokens_as_token_ids: bool | None = None
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    # structured outputs (server/api/constraints.py): OpenAI's response_format, vLLM's structured_outputs
    # and its older guided_* names
    response_format: ResponseFormatIn | None = None
    structured_outputs: StructuredOutputsIn | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = Field(None, min_length=1)
    guided_choice: list[str] | None = Field(None, min_length=1, max_length=MAX_GRAMMAR_CHOICES)
    guided_grammar: str | None = Field(None, min_length=1)
    guided_decoding_backend: Any = None
    guided_whitespace_pattern: Any = None

    # field -> the values that mean "not used"
    UNSUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = {
        "guided_decoding_backend": (None, "auto", "llguidance"),  # llguidance is the only backend
        "guided_whitespace_pattern": (None,),
    }

    _check_guided_choice = field_validator("guided_choice")(check_choices)

    def output_grammar(self) -> GrammarSpec | None:
        """The grammar the output must match (at most one source), or None."""
        guided = {
            "json": self.guided_json,
            "regex": self.guided_regex,
            "choice": self.guided_choice,
            "grammar": self.guided_grammar,
        }
        return output_grammar(self.response_format, self.structured_outputs, guided)

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise PydanticCustomError(
                "too_many_stops", f"at most {MAX_STOP_STRINGS} stop strings are allowed"
            )
        for s in stops:
            if not s or len(s) > MAX_STOP_STRING_CHARS:
                raise PydanticCustomError(
                    "bad_stop", f"each stop string must have 1 to {MAX_STOP_STRING_CHARS} characters"
                )
        return value

    @field_validator("stop_token_ids")
    @classmethod
    def _check_stop_token_ids(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and any(t < 0 for t in value):
            raise PydanticCustomError("stop_token_ids", "stop_token_ids must be non-negative token ids")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, value: Any) -> dict[int, float] | None:
        if value is None:
            return None
        if not isinstance(value, dict):
            raise PydanticCustomError("logit_bias", "logit_bias must be an object of token id -> bias")
        if len(value) > MAX_LOGIT_BIAS_ENTRIES:
            raise PydanticCustomError(
                "logit_bias", f"logit_bias may have at most {MAX_LOGIT_BIAS_ENTRIES} entries"
            )
        out: dict[int, float] = {}
        for key, bias in value.items():
            if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 10):
                raise PydanticCustomError(
                    "logit_bias", "logit_bias keys must be token ids (non-negative integers as strings)"
                )
            if isinstance(bias, bool) or not isinstance(bias, int | float):
                raise PydanticCustomError("logit_bias", "logit_bias values must be numbers")
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise PydanticCustomError(
                    "logit_bias", f"logit_bias values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]"
                )
            out[int(key)] = float(bias)
        return out

    def check_supported(self, max_model_len: int) -> None:
        """Refuse what validation alone cannot: unimplemented features in use, stream_options without
        stream, a max_tokens no prompt could fit, min_tokens above max_tokens, too many choices."""
        for name, defaults in self.UNSUPPORTED.items():
            if not _is_default(getattr(self, name), defaults):
                raise InvalidRequestError(f"{name} is not supported by this server", param=name)
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError(
                "stream_options is only allowed with stream: true", param="stream_options"
            )
        max_tokens = self.requested_max_tokens
        if max_tokens is not None and max_tokens >= max_model_len:
            raise InvalidRequestError(
                f"max_tokens is {max_tokens}; this model's context is {max_model_len} tokens, prompt included",
                param=self.max_tokens_param,
            )
        if self.min_tokens and max_tokens is not None and self.min_tokens > max_tokens:
            raise InvalidRequestError(
                f"min_tokens ({self.min_tokens}) must not exceed {self.max_tokens_param} ({max_tokens})",
                param="min_tokens",
            )
        if self.num_choices > MAX_CHOICES:
            raise InvalidRequestError(
                f"{self.num_choices} choices requested (prompts x n); at most {MAX_CHOICES} are allowed",
                param="n",
            )
        self.output_grammar()  # a malformed or doubled constraint: 400 before anything is compiled

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def max_tokens_param(self) -> str:
        return "max_tokens"

    @property
    def n_choices(self) -> int:
        return self.n or 1

    @property
    def num_choices(self) -> int:
        return self.n_choices

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options is not None and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        """Usage on every chunk (vLLM's ``continuous_usage_stats``, which needs ``include_usage``)."""
        return self.include_usage and bool(self.stream_options and self.stream_options.continuous_usage_stats)

    def sampling_params(
        self, *, logprobs: int | None, prompt_logprobs: int | None, choice: int = 0
    ) -> SamplingParams:
        """Re-validated by ``SamplingParams`` itself (raises ``InvalidSamplingParamsError`` naming the field).
        ``max_tokens`` None: the engine fills in the rest of the context (or the endpoint's default).
        Choice ``j`` of a seeded request samples with its own seed derived from the request's (choice 0 with
        the request's own), so ``n`` choices differ and the whole response is reproducible."""
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_tokens=self.requested_max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k is None else self.top_k,
            min_p=0.0 if self.min_p is None else self.min_p,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            seed=None if self.seed is None else choice_seed(self.seed, choice),
            stop=stop,
            ignore_eos=bool(self.ignore_eos),
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            logit_bias=tuple(sorted((self.logit_bias or {}).items())),
            min_tokens=self.min_tokens or 0,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            skip_special_tokens=self.skip_special_tokens is not False,
            spaces_between_special_tokens=self.spaces_between_special_tokens is not False,
            include_stop_str_in_output=bool(self.include_stop_str_in_output),
        )


def choice_seed(seed: int, choice: int) -> int:
    """The seed of choice ``choice`` of a request seeded with ``seed`` (an int64, as the sampler wants)."""
    value = (seed + choice * _SEED_STRIDE) % (1 << 64)
    return value - (1 << 64) if value > MAX_SEED else value


class CompletionRequest(GenerationFields):
    """``POST /v1/completions``. ``prompt`` is a string, a list of token ids, or a list of either (one
    choice per prompt and ``n``, at most ``MAX_PROMPTS`` prompts). ``max_tokens`` 0 is allowed with
    ``echo`` (the prompt's logprobs only)."""

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: Any = None
    suffix: Any = None

    UNSUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = {
        **GenerationFields.UNSUPPORTED,
        "best_of": (None, 1),  # vLLM dropped it too
        "suffix": (None, ""),
    }

    @field_validator("prompt")
    @classmethod
    def _check_prompts(cls, value: str | list[Any]) -> str | list[Any]:
        batch = isinstance(value, list) and value and isinstance(value[0], str | list)
        if batch and len(value) > MAX_PROMPTS:
            raise PydanticCustomError(
                "too_many_prompts", f"at most {MAX_PROMPTS} prompts per request are allowed"
            )
        return value

    def prompts(self) -> list[str | list[int]]:
        """Each prompt of the request, in order."""
        value = self.prompt
        if isinstance(value, list) and value and isinstance(value[0], str | list):
            return list(value)
        return [value]  # type: ignore[list-item]

    @property
    def num_choices(self) -> int:
        return len(self.prompts()) * self.n_choices

    def check_supported(self, max_model_len: int) -> None:
        super().check_supported(max_model_len)
        if self.max_tokens == 0 and not self.echo:
            raise InvalidRequestError("max_tokens 0 is only allowed with echo: true", param="max_tokens")

    def to_generation_requests(
        self, request_id: str, *, adapter: str | None, tenant: str
    ) -> list[GenerationRequest]:
        """CompletionRequest -> one GenerationRequest per choice: prompt ``i``, choice ``j`` has index
        ``i * n + j`` and id ``{request_id}-{index}``."""
        # echo with logprobs reports the prompt tokens' logprobs too (that is how harnesses score text)
        prompt_logprobs = self.prompt_logprobs
        if self.echo and self.logprobs is not None:
            prompt_logprobs = max(self.logprobs, prompt_logprobs or 0)
        n = self.n_choices
        requests = []
        for i, prompt in enumerate(self.prompts()):
            for j in range(n):
                requests.append(
                    GenerationRequest(
                        request_id=f"{request_id}-{i * n + j}",
                        sampling=self.sampling_params(
                            logprobs=self.logprobs, prompt_logprobs=prompt_logprobs, choice=j
                        ),
                        prompt=prompt,
                        adapter=adapter,
                        tenant=tenant,
                        default_max_tokens=DEFAULT_COMPLETION_MAX_TOKENS,
                    )
                )
        return requests

    def to_generation_request(
        self, request_id: str, *, adapter: str | None, tenant: str
    ) -> GenerationRequest:
        """The first choice's request (a one-prompt, n=1 request has only that one)."""
        return self.to_generation_requests(request_id, adapter=adapter, tenant=tenant)[0]


class FunctionCallIn(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    name: str = Field(min_length=1, max_length=64)
    arguments: str = Field(max_length=1 << 16)  # JSON text, as OpenAI sends it

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, value: str) -> str:
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            raise PydanticCustomError("arguments", "arguments must be a JSON object as text") from None
        if not isinstance(parsed, dict):
            raise PydanticCustomError("arguments", "arguments must be a JSON object as text")
        return value


class ToolCallIn(BaseModel):
    """A call an assistant message of the history made."""

    model_config = ConfigDict(strict=True, extra="ignore")

    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessageIn(BaseModel):
    """One chat message. ``content`` is a string or a list of ``{"type": "text", "text": ...}`` parts;
    ``developer`` is read as ``system``. An assistant message may carry ``tool_calls`` (its content may then
    be null); a ``tool`` message answers the call ``tool_call_id``."""

    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = None
    name: str | None = Field(None, max_length=256)
    tool_calls: list[ToolCallIn] | None = Field(None, max_length=MAX_TOOLS)
    tool_call_id: str | None = Field(None, min_length=1, max_length=256)

    @field_validator("content")
    @classmethod
    def _text_only(cls, value: Any) -> str | None:
        if value is None:
            return None
        if isinstance(value, str):
            return value
        if isinstance(value, list) and value:
            texts = []
            for part in value:
                if not (
                    isinstance(part, dict)
                    and part.get("type") == "text"
                    and isinstance(part.get("text"), str)
                ):
                    raise PydanticCustomError(
                        "text_only", "only text content is supported: a string or a list of text parts"
                    )
                texts.append(part["text"])
            return "".join(texts)
        raise PydanticCustomError("text_only", "content must be a string or a non-empty list of text parts")

    def check(self, index: int, tool_names: set[str]) -> None:
        """What one message's fields cannot check alone: content present unless an assistant calls
        tools, a tool message names its call, a call in the history names an offered function."""
        at = f"messages[{index}]"
        if self.role == "tool" and self.tool_call_id is None:
            raise InvalidRequestError("a tool message needs tool_call_id", param=f"{at}.tool_call_id")
        if self.tool_calls is not None and self.role != "assistant":
            raise InvalidRequestError("only assistant messages carry tool_calls", param=f"{at}.tool_calls")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise InvalidRequestError(f"{at}.content is required", param=f"{at}.content")
        for j, call in enumerate(self.tool_calls or []):
            if call.function.name not in tool_names:
                raise InvalidRequestError(
                    f"the tool call names {call.function.name!r}, which is not in tools",
                    param=f"{at}.tool_calls[{j}].function.name",
                )

    def to_chat_message(self) -> ChatMessage:
        calls = tuple(
            ToolCall(id=c.id, name=c.function.name, arguments=c.function.arguments)
            for c in self.tool_calls or ()
        )
        return ChatMessage(
            role="system" if self.role == "developer" else self.role,
            content=self.content or "",
            tool_calls=calls,
            tool_call_id=self.tool_call_id,
        )


class ChatCompletionRequest(GenerationFields):
    """``POST /v1/chat/completions``; the engine renders ``messages`` with the tokenizer's chat template.
    ``max_completion_tokens``/``max_tokens`` omitted: up to the rest of the context, as vLLM."""

    messages: list[ChatMessageIn] = Field(min_length=1, max_length=4096)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[ToolIn] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    web_search_options: Any = None

    UNSUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = {
        **GenerationFields.UNSUPPORTED,
        "functions": (None, []),
        "function_call": (None, "none", "auto"),
        "audio": (None,),
        "modalities": (None, ["text"]),
        "prediction": (None,),
        "web_search_options": (None,),
    }

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def max_tokens_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def check_supported(self, max_model_len: int) -> None:
        super().check_supported(max_model_len)
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs: true", param="top_logprobs")
        names = {t.function.name for t in self.tools or ()}
        for i, message in enumerate(self.messages):
            message.check(i, names)
        if self.forces_tool_call:
            if not self.tools:
                raise InvalidRequestError("tool_choice needs tools", param="tool_choice")
            if self.output_grammar() is not None:
                raise InvalidRequestError(
                    "a forced tool call cannot be combined with an output format", param="tool_choice"
                )

    @property
    def uses_tools(self) -> bool:
        """Tools are offered and may be called: the reply is parsed for tool calls."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def forces_tool_call(self) -> bool:
        return self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice)

    def template_tools(self) -> list[dict[str, Any]] | None:
        """``tools`` as the chat template's ``tools`` argument (None when not offered or ``none``)."""
        if not self.uses_tools:
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools or ()]

    def to_generation_requests(
        self, request_id: str, *, adapter: str | None, tenant: str
    ) -> list[GenerationRequest]:
        """ChatCompletionRequest -> one GenerationRequest per choice (id ``{request_id}-{index}``)."""
        messages = [m.to_chat_message() for m in self.messages]
        tools = self.template_tools()
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return [
            GenerationRequest(
                request_id=f"{request_id}-{j}",
                sampling=self.sampling_params(
                    logprobs=logprobs, prompt_logprobs=self.prompt_logprobs, choice=j
                ),
                messages=messages,
                adapter=adapter,
                tenant=tenant,
                tools=tools,
            )
            for j in range(self.n_choices)
        ]

    def to_generation_request(
        self, request_id: str, *, adapter: str | None, tenant: str
    ) -> GenerationRequest:
        """The first choice's request."""
        return self.to_generation_requests(request_id, adapter=adapter, tenant=tenant)[0]


# ----------------------------------------------------------------------------------------- responses

OpenAIFinishReason = Literal["stop", "length", "abort", "tool_calls"]


def openai_finish_reason(reason: FinishReason) -> OpenAIFinishReason:
    """``stop`` and ``length`` as OpenAI; an aborted request (drain timeout) reports ``abort``, as vLLM
    does, in the plain response and the stream alike (OpenAI's schema has no such value: a client
    that checks for ``stop``/``length`` sees neither). Errors never reach here (they are error events)."""
    if reason is FinishReason.STOP:
        return "stop"
    return "abort" if reason is FinishReason.ABORT else "length"


class PromptTokensDetails(BaseModel):
    """OpenAI's breakdown of the prompt tokens: ``cached_tokens`` came from the prefix cache."""

    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
        )


def _none(value: Any) -> bool:
    return value is None


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy logprobs object: per token its text, offset in the choice's text (counted over the
    token texts, as vLLM), logprob (None for an echoed prompt's first token) and top alternatives."""

    text_offset: list[int]
    token_logprobs: list[float | None]
    tokens: list[str]
    top_logprobs: list[dict[str, float] | None]


class PromptLogprob(BaseModel):
    """vLLM's ``prompt_logprobs`` entry for one token id at one prompt position."""

    logprob: float
    rank: int
    decoded_token: str


PromptLogprobs = list[dict[str, PromptLogprob] | None]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: OpenAIFinishReason | None
    prompt_logprobs: PromptLogprobs | None = Field(default=None, exclude_if=_none)


class CompletionResponse(BaseModel):
    """A plain completion and, with ``finish_reason`` None until the last one, each stream chunk."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = Field(default=None, exclude_if=_none)


class FunctionCallOut(BaseModel):
    name: str
    arguments: str  # JSON text


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut

    @classmethod
    def of(cls, call: ToolCall) -> ToolCallOut:
        return cls(id=call.id, function=FunctionCallOut(name=call.name, arguments=call.arguments))


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: None = None
    tool_calls: list[ToolCallOut] | None = Field(default=None, exclude_if=_none)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    """OpenAI's ``ChatCompletionTokenLogprob``."""

    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None
    refusal: None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: OpenAIFinishReason


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: PromptLogprobs | None = Field(default=None, exclude_if=_none)


class FunctionCallDelta(BaseModel):
    name: str | None = Field(default=None, exclude_if=_none)
    arguments: str


class ToolCallDelta(BaseModel):
    """A piece of one tool call in a stream: the first piece of call ``index`` carries its id and name,
    the following ones more of its arguments."""

    index: int
    id: str | None = Field(default=None, exclude_if=_none)
    type: Literal["function"] | None = Field(default=None, exclude_if=_none)
    function: FunctionCallDelta


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = Field(default=None, exclude_if=_none)
    content: str | None = Field(default=None, exclude_if=_none)
    tool_calls: list[ToolCallDelta] | None = Field(default=None, exclude_if=_none)


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: OpenAIFinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = Field(default=None, exclude_if=_none)
    prompt_logprobs: PromptLogprobs | None = Field(default=None, exclude_if=_none)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str
    parent: str | None = None
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ------------------------------------------------------------------------------------ tokenize (vLLM)


class TokenizeRequest(BaseModel):
    """``POST /tokenize`` (vLLM): ``prompt``, or ``messages`` rendered with the chat template."""

    model_config = ConfigDict(strict=True, extra="forbid")

    model: str = Field(min_length=1, max_length=MAX_MODEL_NAME_CHARS)
    prompt: str | None = Field(None, max_length=1 << 20)
    messages: list[ChatMessageIn] | None = Field(None, min_length=1, max_length=4096)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    def check_supported(self, max_model_len: int) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise InvalidRequestError("give exactly one of prompt or messages", param="prompt")
        if self.messages is not None and not self.add_generation_prompt:
            raise InvalidRequestError(
                "add_generation_prompt: false is not supported", param="add_generation_prompt"
            )


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    """``POST /detokenize`` (vLLM)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    model: str = Field(min_length=1, max_length=MAX_MODEL_NAME_CHARS)
    tokens: list[int] = Field(max_length=1 << 20)

    def check_supported(self, max_model_len: int) -> None:
        return None


class DetokenizeResponse(BaseModel):
    prompt: str
