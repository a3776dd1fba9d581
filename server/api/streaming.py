"""``TokenEvent``s -> OpenAI responses: SSE chunks for ``stream: true``, one JSON body otherwise.

Either way a client that goes away becomes one ``engine.abort(request_id, "disconnect")`` per choice: the SSE
generator is cancelled by sse-starlette when the client disconnects; a plain request watches
``http.disconnect`` while it waits for the engine. Each finished request writes one log line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel
from sse_starlette import ServerSentEvent
from starlette.requests import Request

from server.api.errors import engine_error_body
from server.api.schemas import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatMessageOut,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    FunctionCallDelta,
    OpenAIFinishReason,
    PromptLogprob,
    PromptLogprobs,
    ToolCallDelta,
    ToolCallOut,
    TopLogprob,
    Usage,
    openai_finish_reason,
)
from server.engine.types import EngineError, FinishReason, TokenEvent, TokenLogprobs
from server.structured.tool_parsers import ParsedOutput, ToolParser

if TYPE_CHECKING:
    from server.engine.engine import AsyncEngine, RequestStream

log = logging.getLogger("loraserve.requests")

DONE = "[DONE]"
ARGUMENT_PIECE_CHARS = 16  # a streamed tool call's arguments go out in pieces of this many characters


@dataclass(slots=True)
class Choice:
    """One choice of a response (one engine request): its output as it arrives."""

    index: int
    request_id: str
    prompt_token_ids: tuple[int, ...]
    counts_prompt: bool = True  # False for choices 2..n of a prompt: usage counts each prompt once
    prompt_text: str = ""  # what echo puts before the output
    parts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: tuple[TokenLogprobs | None, ...] | None = None
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the prefix cache supplied
    finish_reason: FinishReason | None = None
    error: EngineError | None = None
    text_offset: int = 0  # the stream's next text_offset (completions logprobs)
    streamed_chars: int = 0  # how much of the text a chat stream has sent as content (tool calls hold some)
    started: bool = False  # the stream sent something of this choice

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def absorb(self, event: TokenEvent) -> None:
        if event.text:
            self.parts.append(event.text)
        self.logprobs.extend(event.logprobs)
        if event.prompt_logprobs is not None:
            self.prompt_logprobs = event.prompt_logprobs
        self.completion_tokens = event.completion_tokens
        self.cached_tokens = event.cached_tokens
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason
            self.error = event.error


@dataclass(slots=True)
class Generation:
    """One response's choices as their events arrive; complete when every choice has finished."""

    request_id: str  # the response's id
    model: str  # as the client named it: the adapter id or the base id
    adapter: str | None
    tenant: str
    choices: list[Choice]
    created: int = field(default_factory=lambda: int(time.time()))
    started: float = field(default_factory=time.monotonic)
    disconnected: bool = False
    _by_request: dict[str, Choice] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._by_request = {c.request_id: c for c in self.choices}

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    @property
    def error(self) -> EngineError | None:
        return next((c.error for c in self.choices if c.error is not None), None)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(c.prompt_token_ids) for c in self.choices if c.counts_prompt)

    @property
    def completion_tokens(self) -> int:
        return sum(c.completion_tokens for c in self.choices)

    @property
    def cached_tokens(self) -> int:
        return sum(c.cached_tokens for c in self.choices if c.counts_prompt)

    @property
    def usage(self) -> Usage:
        return Usage.of(self.prompt_tokens, self.completion_tokens, self.cached_tokens)

    def absorb(self, event: TokenEvent) -> Choice:
        choice = self._by_request[event.request_id]
        choice.absorb(event)
        return choice

    def log_finished(self) -> None:
        """The one structured line per finished request (fields also in ``extra`` for JSON logging)."""
        if self.disconnected:
            finish = "disconnect"
        elif self.error is not None:
            finish = str(FinishReason.ERROR)
        else:
            reasons = {str(c.finish_reason or "incomplete") for c in self.choices}
            finish = reasons.pop() if len(reasons) == 1 else ",".join(sorted(reasons))
        fields = {
            "request_id": self.request_id,
            "tenant": self.tenant,
            "adapter": self.adapter or "-",
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "latency_ms": round((time.monotonic() - self.started) * 1000, 1),
            "finish_reason": finish,
        }
        if len(self.choices) > 1:
            fields["choices"] = len(self.choices)
        if self.error is not None:
            fields["error"] = self.error.code
        # The fields travel as ``extra``: the cli's formatters print them as key=value or JSON.
        log.info("request finished", extra=fields)


# ------------------------------------------------------------------------------------------ rendering


class ResponseFormat(Protocol):
    """How one endpoint renders a ``Generation``: the plain body, and the stream's chunks."""

    def response(self, g: Generation) -> BaseModel: ...

    def opening_chunks(self, g: Generation) -> list[BaseModel]: ...

    def chunks(self, g: Generation, choice: Choice, event: TokenEvent) -> Sequence[BaseModel]:
        """The chunks for ``event`` of ``choice`` (already absorbed): none when it has nothing to send."""
        ...

    def usage_chunk(self, g: Generation) -> BaseModel: ...


@dataclass(slots=True, frozen=True)
class LogprobStyle:
    """How tokens are named in logprobs: their text, or ``token_id:N`` (vLLM's
    ``return_tokens_as_token_ids``)."""

    token_text: Callable[[int], str]
    as_token_ids: bool = False

    def name(self, token_id: int, text: str) -> str:
        return f"token_id:{token_id}" if self.as_token_ids else text


def prompt_logprobs_body(entries: Sequence[TokenLogprobs | None] | None) -> PromptLogprobs | None:
    """vLLM's ``prompt_logprobs``: per prompt position None (the first) or {token id: entry}, holding
    the prompt's own token and the top alternatives."""
    if entries is None:
        return None
    out: PromptLogprobs = []
    for entry in entries:
        if entry is None:
            out.append(None)
            continue
        ranked = {e.token_id: (e, rank) for rank, e in enumerate(entry.top, start=1)}
        ranked.setdefault(entry.chosen.token_id, (entry.chosen, entry.rank))
        out.append(
            {
                str(t): PromptLogprob(logprob=e.logprob, rank=rank, decoded_token=e.token)
                for t, (e, rank) in ranked.items()
            }
        )
    return out


class CompletionFormat:
    """``text_completion`` objects; stream chunks share the plain response's shape. ``logprobs`` (0-20 or
    None) and ``echo`` are the request's; with echo the prompt's text (and, with logprobs, the prompt
    tokens' logprobs, the first None) come first."""

    def __init__(
        self, *, logprobs: int | None, echo: bool, style: LogprobStyle, prompt_logprobs: bool
    ) -> None:
        self.logprobs = logprobs
        self.echo = echo
        self.style = style
        self.prompt_logprobs = prompt_logprobs

    def response(self, g: Generation) -> CompletionResponse:
        choices = []
        for c in g.choices:
            assert c.finish_reason is not None
            logprobs = None
            if self.logprobs is not None:
                logprobs, _ = self._logprobs(c, c.logprobs, with_prompt=self.echo, offset=0)
            choices.append(
                CompletionChoice(
                    index=c.index,
                    text=(c.prompt_text if self.echo else "") + c.text,
                    logprobs=logprobs,
                    finish_reason=openai_finish_reason(c.finish_reason),
                    prompt_logprobs=prompt_logprobs_body(c.prompt_logprobs) if self.prompt_logprobs else None,
                )
            )
        return CompletionResponse(
            id=g.request_id, created=g.created, model=g.model, choices=choices, usage=g.usage
        )

    def opening_chunks(self, g: Generation) -> list[BaseModel]:
        return []

    def chunks(self, g: Generation, choice: Choice, event: TokenEvent) -> list[CompletionResponse]:
        chunk = self._chunk(g, choice, event)
        return [] if chunk is None else [chunk]

    def _chunk(self, g: Generation, choice: Choice, event: TokenEvent) -> CompletionResponse | None:
        first = not choice.started
        echo = self.echo and first
        text = (choice.prompt_text if echo else "") + event.text
        wants_logprobs = self.logprobs is not None and (event.logprobs or echo)
        if not (text or event.finished or wants_logprobs or (first and event.prompt_logprobs)):
            return None
        choice.started = True
        logprobs = None
        if self.logprobs is not None:
            logprobs, choice.text_offset = self._logprobs(
                choice, list(event.logprobs), with_prompt=echo, offset=choice.text_offset
            )
        reason = None if event.finish_reason is None else openai_finish_reason(event.finish_reason)
        prompt_logprobs = None
        if self.prompt_logprobs and event.prompt_logprobs is not None:
            prompt_logprobs = prompt_logprobs_body(event.prompt_logprobs)
        item = CompletionChoice(
            index=choice.index,
            text=text,
            logprobs=logprobs,
            finish_reason=reason,
            prompt_logprobs=prompt_logprobs,
        )
        return CompletionResponse(id=g.request_id, created=g.created, model=g.model, choices=[item])

    def usage_chunk(self, g: Generation) -> CompletionResponse:
        return CompletionResponse(
            id=g.request_id, created=g.created, model=g.model, choices=[], usage=g.usage
        )

    def _logprobs(
        self, c: Choice, output: Sequence[TokenLogprobs], *, with_prompt: bool, offset: int
    ) -> tuple[CompletionLogprobs, int]:
        """Logprobs of (the echoed prompt and) ``output``, offsets from ``offset``; returns the next offset."""
        body = CompletionLogprobs(text_offset=[], token_logprobs=[], tokens=[], top_logprobs=[])
        positions: list[tuple[int, TokenLogprobs | None]] = []
        if with_prompt:
            entries = c.prompt_logprobs or (None,) * len(c.prompt_token_ids)
            positions += list(zip(c.prompt_token_ids, entries, strict=True))
        positions += [(e.chosen.token_id, e) for e in output]
        style = self.style
        for token_id, entry in positions:
            text = entry.chosen.token if entry is not None else style.token_text(token_id)
            body.text_offset.append(offset)
            body.tokens.append(style.name(token_id, text))
            offset += len(text)
            if entry is None:
                body.token_logprobs.append(None)
                body.top_logprobs.append(None)
                continue
            body.token_logprobs.append(entry.chosen.logprob)
            # as vLLM: the top alternatives, plus the token itself when it is not among them
            top = {style.name(t.token_id, t.token): t.logprob for t in entry.top}
            top.setdefault(style.name(token_id, text), entry.chosen.logprob)
            body.top_logprobs.append(top)
        return body, offset


class ChatFormat:
    """``chat.completion`` and ``chat.completion.chunk`` objects; the first chunk of each choice carries
    the role. With ``logprobs`` each token comes with OpenAI's ``ChatCompletionTokenLogprob``."""

    def __init__(
        self,
        *,
        logprobs: bool,
        style: LogprobStyle,
        prompt_logprobs: bool,
        tool_parser: ToolParser | None = None,
        forced_tool_call: bool = False,
    ) -> None:
        self.logprobs = logprobs
        self.style = style
        self.prompt_logprobs = prompt_logprobs
        self.tool_parser = tool_parser  # set when the request offers tools: replies are parsed for calls
        self.forced_tool_call = forced_tool_call  # the grammar forces a call: a stream holds all text back

    def _parsed(self, c: Choice) -> ParsedOutput:
        # A reply that ends with ``stop`` is parsed for tool calls; one cut short (``length``) stays text.
        if self.tool_parser is None or c.finish_reason is not FinishReason.STOP:
            return ParsedOutput(c.text, ())
        return self.tool_parser.parse(c.text)

    def _finish_reason(self, c: Choice, parsed: ParsedOutput) -> OpenAIFinishReason:
        assert c.finish_reason is not None
        return "tool_calls" if parsed.tool_calls else openai_finish_reason(c.finish_reason)

    def response(self, g: Generation) -> ChatCompletionResponse:
        choices = []
        for c in g.choices:
            parsed = self._parsed(c)
            calls = [ToolCallOut.of(call) for call in parsed.tool_calls] or None
            choices.append(
                ChatChoice(
                    index=c.index,
                    message=ChatMessageOut(content=parsed.content, tool_calls=calls),
                    logprobs=self._logprobs(c.logprobs),
                    finish_reason=self._finish_reason(c, parsed),
                )
            )
        return ChatCompletionResponse(
            id=g.request_id,
            created=g.created,
            model=g.model,
            choices=choices,
            usage=g.usage,
            prompt_logprobs=self._prompt_logprobs(g.choices[0].prompt_logprobs),
        )

    def opening_chunks(self, g: Generation) -> list[BaseModel]:
        return [
            ChatCompletionChunk(
                id=g.request_id,
                created=g.created,
                model=g.model,
                choices=[ChatChunkChoice(index=c.index, delta=ChatDelta(role="assistant", content=""))],
            )
            for c in g.choices
        ]

    def chunks(self, g: Generation, choice: Choice, event: TokenEvent) -> list[ChatCompletionChunk]:
        wants_logprobs = self.logprobs and bool(event.logprobs)
        prompt_logprobs = self._prompt_logprobs(event.prompt_logprobs)
        text, calls, reason = self._stream_step(choice, event)
        if not (text or calls or event.finished or wants_logprobs or prompt_logprobs):
            return []
        choice.started = True

        def chunk(delta: ChatDelta, **extra: Any) -> ChatCompletionChunk:
            item = ChatChunkChoice(index=choice.index, delta=delta, **extra)
            return ChatCompletionChunk(id=g.request_id, created=g.created, model=g.model, choices=[item])

        out = [
            chunk(
                ChatDelta(content=text or None),
                logprobs=self._logprobs(event.logprobs) if wants_logprobs else None,
            )
        ]
        out[0].prompt_logprobs = prompt_logprobs
        for delta in calls:
            out.append(chunk(ChatDelta(tool_calls=[delta])))
        if reason is not None:
            if calls or len(out) > 1:
                out.append(chunk(ChatDelta(), finish_reason=reason))
            else:
                out[0].choices[0].finish_reason = reason
        if not (text or wants_logprobs or prompt_logprobs) and len(out) > 1:
            out.pop(0)  # nothing but tool calls: no empty content chunk before them
        return out

    def _stream_step(
        self, choice: Choice, event: TokenEvent
    ) -> tuple[str, list[ToolCallDelta], OpenAIFinishReason | None]:
        """(content to send now, tool-call deltas, finish reason) for one event of a chat stream. With tools,
        text from where a call may start is held back until the reply ends and is parsed."""
        if self.tool_parser is None:
            reason = None if event.finish_reason is None else openai_finish_reason(event.finish_reason)
            return event.text, [], reason
        full = choice.text
        if not event.finished:
            end = 0 if self.forced_tool_call else _call_free_end(full, self.tool_parser)
            end = max(end, choice.streamed_chars)
            text, choice.streamed_chars = full[choice.streamed_chars : end], end
            return text, [], None
        parsed = self._parsed(choice)
        if not parsed.tool_calls:
            text, choice.streamed_chars = full[choice.streamed_chars :], len(full)
            return text, [], self._finish_reason(choice, parsed)
        content = parsed.content or ""
        text = content[choice.streamed_chars :] if len(content) > choice.streamed_chars else ""
        deltas = []
        for k, call in enumerate(parsed.tool_calls):
            deltas.append(
                ToolCallDelta(
                    index=k,
                    id=call.id,
                    type="function",
                    function=FunctionCallDelta(name=call.name, arguments=""),
                )
            )
            for start in range(0, len(call.arguments), ARGUMENT_PIECE_CHARS):
                piece = call.arguments[start : start + ARGUMENT_PIECE_CHARS]
                deltas.append(ToolCallDelta(index=k, function=FunctionCallDelta(arguments=piece)))
        return text, deltas, "tool_calls"

    def usage_chunk(self, g: Generation) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=g.request_id, created=g.created, model=g.model, choices=[], usage=g.usage
        )

    def _prompt_logprobs(self, entries: Sequence[TokenLogprobs | None] | None) -> PromptLogprobs | None:
        return prompt_logprobs_body(entries) if self.prompt_logprobs else None

    def _logprobs(self, entries: Sequence[TokenLogprobs]) -> ChatLogprobs | None:
        if not self.logprobs:
            return None
        style = self.style

        def top(token_id: int, text: str, logprob: float) -> TopLogprob:
            return TopLogprob(
                token=style.name(token_id, text), logprob=logprob, bytes=list(text.encode("utf-8"))
            )

        return ChatLogprobs(
            content=[
                ChatTokenLogprob(
                    **top(e.chosen.token_id, e.chosen.token, e.chosen.logprob).model_dump(),
                    top_logprobs=[top(t.token_id, t.token, t.logprob) for t in e.top],
                )
                for e in entries
            ]
        )


def _sse(model: BaseModel) -> ServerSentEvent:
    return ServerSentEvent(data=model.model_dump_json())


def abort_all(engine: AsyncEngine, stream: RequestStream, reason: str) -> None:
    """Abort every request of ``stream`` (finished ones are ignored by the engine)."""
    for request_id in stream.request_ids:
        engine.abort(request_id, reason)


# ------------------------------------------------------------------------------------------- streaming


async def sse_events(
    engine: AsyncEngine,
    stream: RequestStream,
    g: Generation,
    fmt: ResponseFormat,
    *,
    include_usage: bool,
    continuous_usage: bool = False,
) -> AsyncIterator[ServerSentEvent]:
    """TokenEvents -> SSE chunks (each carries one choice, tagged with its ``index``), ending with
    ``data: [DONE]``. An engine error mid-stream becomes ``data: {"error": {...}}`` then ``[DONE]``, and
    aborts the request's other choices. Cancellation (the client left) aborts every choice once. With
    ``continuous_usage`` every chunk carries the response's usage so far (vLLM's ``continuous_usage_stats``):
    a chunk's tokens are the growth of ``completion_tokens``, also where one chunk holds several tokens."""

    def emit(chunk: BaseModel) -> ServerSentEvent:
        if continuous_usage:
            chunk = chunk.model_copy(update={"usage": g.usage})
        return _sse(chunk)

    try:
        for opening in fmt.opening_chunks(g):
            yield emit(opening)
        async for event in stream:
            choice = g.absorb(event)
            if event.finish_reason is FinishReason.ERROR:
                abort_all(engine, stream, "error")
                error = event.error or EngineError("generation failed")
                yield ServerSentEvent(data=json.dumps(engine_error_body(error)))
                break
            for chunk in fmt.chunks(g, choice, event):
                yield emit(chunk)
        else:
            if include_usage:
                yield emit(fmt.usage_chunk(g))
        yield ServerSentEvent(data=DONE)
    except (asyncio.CancelledError, GeneratorExit):
        if not g.finished:
            g.disconnected = True
            abort_all(engine, stream, "disconnect")
        raise
    finally:
        g.log_finished()


# -------------------------------------------------------------------------------------- plain requests


async def _wait_for_disconnect(request: Request) -> None:
    # The body is already read, so the next ASGI message is the disconnect (or nothing, until cancelled).
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def collect(request: Request, engine: AsyncEngine, stream: RequestStream, g: Generation) -> bool:
    """Consume the whole stream into ``g``. Returns False, after aborting the request, if the client
    disconnected first."""

    async def consume() -> None:
        async for event in stream:
            g.absorb(event)
            if event.finish_reason is FinishReason.ERROR:
                abort_all(engine, stream, "error")  # the response fails: its other choices stop too

    return await _unless_disconnected(request, engine, stream, g, consume())


async def await_first_event(
    request: Request, engine: AsyncEngine, stream: RequestStream, g: Generation
) -> bool:
    """Wait until the stream's first event is there (without consuming it). Returns False, after aborting
    the request, if the client disconnected first."""

    async def first() -> None:
        await stream.peek()

    return await _unless_disconnected(request, engine, stream, g, first())


async def _unless_disconnected(
    request: Request,
    engine: AsyncEngine,
    stream: RequestStream,
    g: Generation,
    work: Coroutine[None, None, None],
) -> bool:
    consumer = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if consumer.done():
            consumer.result()
            return True
        g.disconnected = True
        abort_all(engine, stream, "disconnect")
        return False
    except asyncio.CancelledError:
        if not g.finished:
            g.disconnected = True
            abort_all(engine, stream, "disconnect")
        raise
    finally:
        for task in (consumer, watcher):
            task.cancel()


def _call_free_end(text: str, parser: ToolParser) -> int:
    """How much of ``text`` is surely not part of a tool call in ``parser``'s format: a call may start at
    its start marker or at any of its markers (Llama 3's ``<|python_tag|>`` comes before the ``{``)."""
    return min(_safe_end(text, marker) for marker in (parser.start_marker, *parser.markers))


def _safe_end(text: str, marker: str) -> int:
    """How much of ``text`` is surely not part of a tool call: up to ``marker``, or up to a suffix that
    could be its beginning."""
    found = text.find(marker)
    if found >= 0:
        return found
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return len(text) - k
    return len(text)
