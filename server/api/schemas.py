"""Pydantic models of the OpenAI requests and responses, and the one conversion the API owns:
HTTP body -> ``CompletionRequest`` / ``ChatCompletionRequest`` (validated) -> ``GenerationRequest``.

Bad input never gets past this module: ``parse_request`` raises ``InvalidRequestError`` (400) naming the
offending ``param`` for malformed or deeply nested JSON, NaN/Infinity (raw ``NaN`` tokens included), wrong
types, out-of-range values and OpenAI features this server does not implement.
"""

from __future__ import annotations

import json
import math
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from server.engine.types import (
    MAX_SEED,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    ChatMessage,
    FinishReason,
    GenerationRequest,
    InvalidRequestError,
    SamplingParams,
)

MAX_JSON_DEPTH = 32
MAX_MODEL_NAME_CHARS = 256
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_CHAT_MAX_TOKENS = 512  # OpenAI's chat default is "the rest of the context"; ours is bounded

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
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        param = _param_from_loc(value, error["loc"], missing=error["type"] == "missing")
        message = str(error["msg"])
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


def _is_default(value: Any, defaults: tuple[Any, ...]) -> bool:
    return any(value is d or (type(value) is type(d) and value == d) for d in defaults)


class GenerationFields(BaseModel):
    """Fields shared by both endpoints. Unknown fields are ignored, as OpenAI-compatible servers do;
    known OpenAI features that this server lacks are refused unless they carry their default."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)

    model: str = Field(min_length=1, max_length=MAX_MODEL_NAME_CHARS)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-MAX_SEED - 1, le=MAX_SEED)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    user: str | None = Field(None, max_length=256)
    n: int | None = Field(None, ge=1, le=128)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # vLLM's extras
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    ignore_eos: bool | None = None
    # OpenAI features we do not implement: accepted only at their defaults
    logit_bias: Any = None

    # field -> the values that mean "not used"
    UNSUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = {"logit_bias": (None, {})}

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

    def check_supported(self, max_model_len: int) -> None:
        """Refuse what validation alone cannot: unimplemented features in use, n > 1, stream_options
        without stream, a max_tokens no prompt could fit."""
        for name, defaults in self.UNSUPPORTED.items():
            if not _is_default(getattr(self, name), defaults):
                raise InvalidRequestError(f"{name} is not supported by this server", param=name)
        if self.n is not None and self.n != 1:
            raise InvalidRequestError("only n=1 is supported", param="n")
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

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def max_tokens_param(self) -> str:
        return "max_tokens"

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options is not None and self.stream_options.include_usage)

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        """Re-validated by ``SamplingParams`` itself (raises ``InvalidSamplingParamsError`` naming the field)."""
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_tokens=self.requested_max_tokens or default_max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k is None else self.top_k,
            min_p=0.0 if self.min_p is None else self.min_p,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            seed=self.seed,
            stop=stop,
            ignore_eos=bool(self.ignore_eos),
        )


class CompletionRequest(GenerationFields):
    """``POST /v1/completions``. One prompt: a string or a list of token ids (a one-element batch of
    either is accepted too)."""

    prompt: str | list[int] | list[str] | list[list[int]]
    echo: Any = None
    best_of: Any = None
    logprobs: Any = None
    suffix: Any = None

    UNSUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = {
        **GenerationFields.UNSUPPORTED,
        "echo": (None, False),
        "best_of": (None, 1),
        "logprobs": (None,),
        "suffix": (None, ""),
    }

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[Any]) -> str | list[int]:
        if isinstance(value, str):
            return value
        if value and isinstance(value[0], str | list):
            if len(value) != 1:
                raise PydanticCustomError("batch_prompt", "only one prompt per request is supported")
            only: str | list[int] = value[0]
            return only
        return value

    def single_prompt(self) -> str | list[int]:
        # _one_prompt already unwrapped one-element batches.
        return self.prompt  # type: ignore[return-value]

    def to_generation_request(
        self, request_id: str, *, adapter: str | None, tenant: str
    ) -> GenerationRequest:
        # CompletionRequest -> GenerationRequest
        return GenerationRequest(
            request_id=request_id,
            sampling=self.sampling_params(DEFAULT_COMPLETION_MAX_TOKENS),
            prompt=self.single_prompt(),
            adapter=adapter,
            tenant=tenant,
        )


class ChatMessageIn(BaseModel):
    """One chat message. ``content`` is a string or a list of ``{"type": "text", "text": ...}`` parts;
    ``developer`` is read as ``system``. Tool and function messages are not supported."""

    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: Any
    name: str | None = Field(None, max_length=256)

    @field_validator("content")
    @classmethod
    def _text_only(cls, value: Any) -> str:
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

    def to_chat_message(self) -> ChatMessage:
        return ChatMessage(role="system" if self.role == "developer" else self.role, content=self.content)


class ChatCompletionRequest(GenerationFields):
    """``POST /v1/chat/completions``; the engine renders ``messages`` with the tokenizer's chat template."""

    messages: list[ChatMessageIn] = Field(min_length=1, max_length=4096)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: Any = None
    top_logprobs: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    web_search_options: Any = None

    UNSUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = {
        **GenerationFields.UNSUPPORTED,
        "logprobs": (None, False),
        "top_logprobs": (None, 0),
        "tools": (None, []),
        "tool_choice": (None, "none", "auto"),
        "functions": (None, []),
        "function_call": (None, "none", "auto"),
        "response_format": (None, {"type": "text"}),
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

    def to_generation_request(
        self, request_id: str, *, adapter: str | None, tenant: str, max_model_len: int
    ) -> GenerationRequest:
        # ChatCompletionRequest -> GenerationRequest
        return GenerationRequest(
            request_id=request_id,
            sampling=self.sampling_params(min(DEFAULT_CHAT_MAX_TOKENS, max_model_len // 2)),
            messages=[m.to_chat_message() for m in self.messages],
            adapter=adapter,
            tenant=tenant,
        )


# ----------------------------------------------------------------------------------------- responses

OpenAIFinishReason = Literal["stop", "length"]


def openai_finish_reason(reason: FinishReason) -> OpenAIFinishReason:
    """The contract allows ``stop|length|content_filter`` (and tool calls for chat), not ``abort``.
    An aborted request (drain timeout) reports ``length``: its text was cut short, which is what a client
    checking for ``length`` should conclude. Errors never reach here (they are error events)."""
    return "stop" if reason is FinishReason.STOP else "length"


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: OpenAIFinishReason | None


class CompletionResponse(BaseModel):
    """A plain completion and, with ``finish_reason`` None until the last one, each stream chunk."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = Field(default=None, exclude_if=lambda v: v is None)


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    logprobs: None = None
    finish_reason: OpenAIFinishReason


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = Field(default=None, exclude_if=lambda v: v is None)
    content: str | None = Field(default=None, exclude_if=lambda v: v is None)


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: None = None
    finish_reason: OpenAIFinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = Field(default=None, exclude_if=lambda v: v is None)


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
