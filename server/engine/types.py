"""Named types that cross the engine's boundaries. Nothing here imports torch.

One request flows one way, one type per hop:
``GenerationRequest`` -> ``Sequence`` (engine state) -> ``Batch`` -> runner -> ``StepOutput`` -> ``TokenEvent``.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable, Collection
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

# ----------------------------------------------------------------------------------------------- errors


class EngineError(Exception):
    """Base of every error the engine raises on purpose. ``status`` is the HTTP status the API maps it to."""

    status: int = 500
    code: str = "internal_error"
    error_type: str = "server_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequestError(EngineError):
    """Bad input: a value out of range, NaN, a prompt too long. Never reaches torch."""

    status = 400
    code = "invalid_request"
    error_type = "invalid_request_error"


class InvalidSamplingParamsError(InvalidRequestError):
    code = "invalid_sampling_params"


class PromptTooLongError(InvalidRequestError):
    code = "context_length_exceeded"


class UnknownModelError(EngineError):
    """The named model is neither the base nor an adapter the caller may use."""

    status = 404
    code = "model_not_found"
    error_type = "invalid_request_error"


class AdapterUnavailableError(EngineError):
    """The adapter exists but could not be loaded (bad files, rank too high, ...)."""

    status = 422
    code = "adapter_unavailable"
    error_type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = "model", status: int | None = None) -> None:
        super().__init__(message, param=param)
        if status is not None:
            self.status = status


class QueueFullError(EngineError):
    status = 429
    code = "queue_full"
    error_type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineNotReadyError(EngineError):
    """The engine is starting, draining or stopped."""

    status = 503
    code = "not_ready"
    error_type = "server_error"


class StepFailedError(EngineError):
    """A model step raised; the requests of that step fail, the engine goes on."""

    status = 500
    code = "step_failed"


# --------------------------------------------------------------------------------------------- sampling

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_SEED = 2**63 - 1
MAX_LOGPROBS = 20  # top alternatives per position, as OpenAI and vLLM's default --max-logprobs
MAX_LOGIT_BIAS = 100.0
MAX_LOGIT_BIAS_ENTRIES = 300  # OpenAI's limit on logit_bias keys
MAX_STOP_TOKEN_IDS = 64


def _check_float(name: str, value: float, lo: float, hi: float, *, lo_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidSamplingParamsError(f"{name} must be a number, got {type(value).__name__}", param=name)
    if not math.isfinite(value):
        raise InvalidSamplingParamsError(f"{name} must be a finite number, got {value}", param=name)
    too_low = value <= lo if lo_open else value < lo
    if too_low or value > hi:
        left = "(" if lo_open else "["
        raise InvalidSamplingParamsError(f"{name} must be in {left}{lo}, {hi}], got {value}", param=name)


def _check_int(name: str, value: int, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidSamplingParamsError(f"{name} must be an integer, got {type(value).__name__}", param=name)
    if not lo <= value <= hi:
        raise InvalidSamplingParamsError(f"{name} must be in [{lo}, {hi}], got {value}", param=name)


@dataclass(slots=True, frozen=True)
class SamplingParams:
    """Per-request sampling. Validated on construction: a bad value raises
    ``InvalidSamplingParamsError`` naming the field, before anything reaches torch.

    ``temperature == 0`` is greedy. ``top_k <= 0`` and ``top_p == 1`` and ``min_p == 0`` disable
    those filters. ``repetition_penalty`` follows the CTRL/HF rule over prompt and output tokens;
    presence and frequency penalties follow OpenAI over output tokens only.

    ``max_tokens`` None means "up to the rest of the context" (the engine fills it in once the prompt is
    tokenized); 0 generates nothing (a prefill for prompt logprobs only). ``logprobs`` asks for the sampled
    token's logprob plus that many top alternatives per output token (None: none); ``prompt_logprobs`` the
    same for every prompt token after the first. ``logit_bias`` adds ``bias`` to token ``id`` before
    anything else; until ``min_tokens`` tokens are out, EOS and ``stop_token_ids`` cannot be sampled.
    ``stop_token_ids`` end a sequence like EOS (their text is kept unless they are special tokens that
    ``skip_special_tokens`` drops). vLLM's names and semantics throughout.
    """

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # special tokens whose text stays in the output despite ``skip_special_tokens``: set by the API (never
    # a request field) to a tool parser's marker tokens, so that the parser sees them
    keep_special_token_ids: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, 0, 1 << 30)
        _check_float("temperature", self.temperature, 0.0, 2.0)
        _check_float("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        _check_int("top_k", self.top_k, -1, 1 << 30)
        _check_float("min_p", self.min_p, 0.0, 1.0)
        _check_float("repetition_penalty", self.repetition_penalty, 0.0, 10.0, lo_open=True)
        _check_float("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_float("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        if self.seed is not None:
            _check_int("seed", self.seed, -MAX_SEED - 1, MAX_SEED)
        if not isinstance(self.stop, tuple):
            raise InvalidSamplingParamsError("stop must be a tuple of strings", param="stop")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidSamplingParamsError(
                f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}", param="stop"
            )
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise InvalidSamplingParamsError("each stop string must be a non-empty string", param="stop")
            if len(s) > MAX_STOP_STRING_CHARS:
                raise InvalidSamplingParamsError(
                    f"a stop string may have at most {MAX_STOP_STRING_CHARS} characters", param="stop"
                )
        for name in (
            "ignore_eos",
            "skip_special_tokens",
            "spaces_between_special_tokens",
            "include_stop_str_in_output",
        ):
            if not isinstance(getattr(self, name), bool):
                raise InvalidSamplingParamsError(f"{name} must be a boolean", param=name)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value, 0, MAX_LOGPROBS)
        if len(self.logit_bias) > MAX_LOGIT_BIAS_ENTRIES:
            raise InvalidSamplingParamsError(
                f"logit_bias may have at most {MAX_LOGIT_BIAS_ENTRIES} entries", param="logit_bias"
            )
        for token_id, bias in self.logit_bias:
            _check_int("logit_bias", token_id, 0, 1 << 31)
            _check_float("logit_bias", bias, -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS)
        _check_int("min_tokens", self.min_tokens, 0, 1 << 30)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidSamplingParamsError(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
                param="min_tokens",
            )
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidSamplingParamsError(
                f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids are allowed", param="stop_token_ids"
            )
        for token_id in self.stop_token_ids:
            _check_int("stop_token_ids", token_id, 0, 1 << 31)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def token_ids_in_use(self) -> list[int]:
        """Every token id this request names (logit_bias keys, stop_token_ids): each must be < vocab."""
        return [t for t, _ in self.logit_bias] + list(self.stop_token_ids)


# --------------------------------------------------------------------------------------------- requests


class FinishReason(enum.StrEnum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"


@dataclass(slots=True, frozen=True)
class ToolCall:
    """A function call an assistant message made (history) or a reply carries: ``arguments`` is JSON text."""

    id: str
    name: str
    arguments: str


@dataclass(slots=True, frozen=True)
class ChatMessage:
    """One message of a conversation. An assistant message may carry ``tool_calls``; a ``tool`` message
    answers the call ``tool_call_id``."""

    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None


class TokenConstraint(Protocol):
    """A request's grammar (``server.structured.grammar.Constraint``): the runner asks it for the allowed
    next tokens, the engine advances it past each accepted token, in order, and ends the request (finish
    ``stop``) once it is complete. Its state belongs to the request, not to a slot or a step."""

    def fill_bitmask(self, address: int, nbytes: int) -> None: ...

    def accept(self, token_id: int) -> bool: ...

    @property
    def param(self) -> str: ...

    @property
    def is_complete(self) -> bool: ...


@dataclass(slots=True)
class GenerationRequest:
    """What the API hands the engine. Exactly one of ``prompt`` (text or token ids) or ``messages``
    (rendered with the tokenizer's chat template) is set. ``adapter`` None means the base model."""

    request_id: str
    sampling: SamplingParams
    prompt: str | list[int] | None = None
    messages: list[ChatMessage] | None = None
    adapter: str | None = None
    tenant: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    # with sampling.max_tokens None: generate at most this many (None: up to the rest of the context);
    # either way never more than the context leaves after the prompt
    default_max_tokens: int | None = None
    # structured outputs / a forced tool call: the output must match this grammar (compiled by the API)
    constraint: TokenConstraint | None = None
    # chat only: the functions offered, as the chat template's ``tools`` argument (OpenAI's tool objects)
    tools: list[dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise InvalidRequestError("exactly one of prompt or messages must be given", param="prompt")


@dataclass(slots=True, frozen=True)
class Logprob:
    """One token at one position: its id, its text alone (special tokens included) and its logprob."""

    token_id: int
    token: str
    logprob: float


@dataclass(slots=True, frozen=True)
class TokenLogprobs:
    """The logprobs of one position: the token that is there (sampled, or the prompt's), its rank in the
    distribution (1 = most likely), and the ``top`` alternatives, most likely first."""

    chosen: Logprob
    rank: int
    top: tuple[Logprob, ...]


@dataclass(slots=True, frozen=True)
class TokenEvent:
    """One increment of a request's output, in order. The last event of a request has ``finish_reason``
    set; ``error`` is set only with ``FinishReason.ERROR``.

    ``logprobs`` has one entry per token of ``token_ids`` when the request asked for them (else empty).
    ``prompt_logprobs`` is set on the request's first event when it asked for them: one entry per prompt
    token, the first None (nothing predicts it)."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason | None = None
    error: EngineError | None = None
    logprobs: tuple[TokenLogprobs, ...] = ()
    prompt_logprobs: tuple[TokenLogprobs | None, ...] | None = None
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (OpenAI's usage field)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


# ------------------------------------------------------------------------------------------- tokenizer


class Tokenizer(Protocol):
    """The slice of a Hugging Face tokenizer the engine uses (no torch)."""

    @property
    def eos_token_ids(self) -> frozenset[int]: ...

    @property
    def byte_level(self) -> bool:
        """``decode`` joins the tokens' bytes and reads them as UTF-8, each invalid sequence replaced by
        one U+FFFD (byte-level BPE: GPT-2, Llama 3, Qwen). Then only a text's last U+FFFD may still turn
        into a character as tokens follow; one with text after it is final. Not so for SentencePiece's
        byte fallback, which shows every byte of a run as U+FFFD until the run is valid UTF-8."""
        ...

    def encode(self, text: str) -> list[int]: ...

    def encode_plain(self, text: str, *, add_special_tokens: bool) -> list[int]:
        """``encode`` with the choice of special tokens (``/tokenize``)."""
        ...

    def encode_chat(
        self, messages: SequenceABC[ChatMessage], tools: list[dict[str, Any]] | None = None
    ) -> list[int]: ...

    def decode(
        self,
        token_ids: SequenceABC[int],
        *,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
        keep_special_token_ids: Collection[int] = (),
    ) -> str: ...

    def token_text(self, token_id: int) -> str:
        """The text of one token alone, special tokens included (logprob entries show it)."""
        ...


# ------------------------------------------------------------------------------------ runner boundary


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)  # identity semantics: one object per request
class Sequence:
    """The one state object that travels between scheduler, engine and runner.

    ``token_ids`` holds prompt then output. ``num_cached`` counts tokens whose KV is computed and sits in
    the blocks of ``block_table`` (the block manager's list: token ``i`` is in block
    ``block_table[i // block_size]``); a step computes the next ``Batch.num_new_tokens`` of them.
    ``slot`` is the sequence's row of per-sequence state (sampling), held from admission to the end.
    ``num_prefix_cached`` counts prompt tokens whose KV came from the prefix cache at admission.
    """

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    sampling: SamplingParams
    adapter: str | None
    seed: int
    tenant: str | None = None
    arrival_time: float = 0.0
    status: SequenceStatus = SequenceStatus.WAITING
    slot: int = -1
    num_cached: int = 0
    lease: AdapterLease | None = None  # pins the adapter version while the sequence lives
    block_table: list[int] = field(default_factory=list)
    num_prefix_cached: int = 0
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finish_reason: FinishReason | None = None
    aborted: bool = False
    abort_reason: str = "client"
    constraint: TokenConstraint | None = None  # the request's grammar, advanced with each output token

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def max_total_tokens(self) -> int:
        # the engine resolves max_tokens=None (rest of the context) before it builds a Sequence
        return self.num_prompt_tokens + (self.sampling.max_tokens or 0)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def in_prefill(self) -> bool:
        """True until every token but the last has KV (the last one is computed by each decode step)."""
        return self.num_cached < self.num_tokens - 1


@dataclass(slots=True)
class Batch:
    """What the scheduler hands the runner for one step: row ``i`` computes ``num_new_tokens[i]`` tokens of
    ``seqs[i]`` from ``seqs[i].num_cached`` on (a decode row one, a prompt chunk many; decode rows first).
    A row *samples* when its tokens reach the end of the sequence; a prompt chunk that stops short does
    not. Every sequence holds a slot and the blocks for its tokens."""

    seqs: list[Sequence]
    num_new_tokens: list[int]

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def kind(self) -> Literal["prefill", "decode", "mixed"]:
        """For logs and metrics: decode when every row computes its last token only."""
        prefill = [self.is_prefill(i) for i in range(len(self.seqs))]
        if not any(prefill):
            return "decode"
        return "prefill" if all(prefill) else "mixed"

    def is_prefill(self, row: int) -> bool:
        """Whether row ``row`` computes prompt tokens (or recomputes a preempted sequence's), not one
        decode token."""
        seq = self.seqs[row]
        return seq.in_prefill or self.num_new_tokens[row] > 1

    def samples(self, row: int) -> bool:
        seq = self.seqs[row]
        return seq.num_cached + self.num_new_tokens[row] >= seq.num_tokens

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def num_prefill_tokens(self) -> int:
        """Prompt tokens (or recomputed ones) this step computes: the prefill rows' tokens."""
        return sum(n for i, n in enumerate(self.num_new_tokens) if self.is_prefill(i))

    @property
    def num_decode_rows(self) -> int:
        return sum(1 for i in range(len(self.seqs)) if not self.is_prefill(i))


@dataclass(slots=True, frozen=True)
class PositionLogprobs:
    """Logprobs at one position, as the runner computes them (ids only, no text): the logprob and rank of
    the token at that position, and the top ``k`` (ids, logprobs), most likely first."""

    token_id: int
    logprob: float
    rank: int
    top_ids: tuple[int, ...]
    top_logprobs: tuple[float, ...]


@dataclass(slots=True)
class StepOutput:
    """One sampled token per *sampling* row of the batch (``Batch.samples``), in batch order.

    ``logprobs[i]`` is set for the i-th sampling row when its request asked for logprobs (else None, or
    the list is empty when no row asked). ``prompt_logprobs[i]`` (one per batch row) is set for rows that
    asked for prompt logprobs: one entry per computed prompt token after the first, in order."""

    token_ids: list[int]
    logprobs: list[PositionLogprobs | None] = field(default_factory=list)
    prompt_logprobs: list[tuple[PositionLogprobs, ...] | None] = field(default_factory=list)


class AdapterLease(Protocol):
    """Pins one adapter version while a sequence uses it. ``version`` names that version everywhere (the
    store's key, PEFT's adapter name, the LoRA slot's key); ``digest`` is the sha256 of its weights, which
    keys the prefix cache; ``snapshot`` says its rows run on a merged copy (whose KV differs)."""

    @property
    def adapter(self) -> str: ...

    @property
    def version(self) -> str: ...

    @property
    def digest(self) -> str: ...

    @property
    def on_snapshot(self) -> bool: ...


@dataclass(slots=True, frozen=True)
class KVBlocks:
    """The runner's paged KV memory as the scheduler's block manager sees it. ``base_digest`` keys the
    base model's blocks in the prefix cache (adapter versions use their weights' digest)."""

    num_blocks: int
    block_size: int
    base_digest: str


class ModelRunner(Protocol):
    """Everything the engine needs from the runtime. All methods but the properties are called on the
    engine thread only."""

    @property
    def kv_blocks(self) -> KVBlocks: ...

    @property
    def model_id(self) -> str: ...

    @property
    def tokenizer(self) -> Tokenizer: ...

    @property
    def max_model_len(self) -> int: ...

    @property
    def num_slots(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    def adapter_names(self) -> list[str]:
        """Adapters that requests may name (registered, in any tier). Safe from any thread."""
        ...

    def has_adapter(self, name: str) -> bool:
        """True when ``name`` is a registered adapter. Safe from any thread."""
        ...

    def acquire_adapter(self, name: str) -> AdapterLease | None:
        """Pin ``name`` if it is ready to run now; None if it is still loading (a background load is
        started). Raises ``AdapterUnavailableError`` if it cannot be served."""
        ...

    def release_adapter(self, lease: AdapterLease) -> None: ...

    def housekeeping(self) -> None:
        """Between steps: move finished background loads into the model, apply version swaps."""
        ...

    def set_wakeup(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` (from any thread) whenever ``housekeeping`` may have news: a background load
        finished. The engine waits for it instead of polling while every request waits on a load."""
        ...

    def bind_thread(self) -> None:
        """Called once, on the engine thread, before the first step: the runtime's compute threads (torch's
        intra-op threads) belong to this thread from now on."""
        ...

    def step(self, batch: Batch) -> StepOutput: ...

    def free_slot(self, slot: int) -> None:
        """The sequence in ``slot`` left; its penalty and sampling state may be overwritten."""
        ...
