"""``TokenEvent``s -> OpenAI responses: SSE chunks for ``stream: true``, one JSON body otherwise.

Either way a client that goes away becomes exactly one ``engine.abort(request_id, "disconnect")``: the SSE
generator is cancelled by sse-starlette when the client disconnects; a plain request watches
``http.disconnect`` while it waits for the engine. Each finished request writes one log line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

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
    ChatMessageOut,
    CompletionChoice,
    CompletionResponse,
    Usage,
    openai_finish_reason,
)
from server.engine.types import EngineError, FinishReason, TokenEvent

if TYPE_CHECKING:
    from server.engine.engine import AsyncEngine, RequestStream

log = logging.getLogger("loraserve.requests")

DONE = "[DONE]"


@dataclass(slots=True)
class Generation:
    """One request's output as it arrives; complete after the event that carries ``finish_reason``."""

    request_id: str
    model: str  # as the client named it: the adapter id or the base id
    adapter: str | None
    tenant: str
    prompt_tokens: int
    created: int = field(default_factory=lambda: int(time.time()))
    started: float = field(default_factory=time.monotonic)
    parts: list[str] = field(default_factory=list)
    completion_tokens: int = 0
    finish_reason: FinishReason | None = None
    error: EngineError | None = None
    disconnected: bool = False

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def usage(self) -> Usage:
        return Usage.of(self.prompt_tokens, self.completion_tokens)

    def absorb(self, event: TokenEvent) -> None:
        if event.text:
            self.parts.append(event.text)
        self.completion_tokens = event.completion_tokens
        if event.prompt_tokens:
            self.prompt_tokens = event.prompt_tokens
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason
            self.error = event.error

    def log_finished(self) -> None:
        """The one structured line per finished request (fields also in ``extra`` for JSON logging)."""
        finish = "disconnect" if self.disconnected else str(self.finish_reason or "incomplete")
        fields = {
            "request_id": self.request_id,
            "tenant": self.tenant,
            "adapter": self.adapter or "-",
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "latency_ms": round((time.monotonic() - self.started) * 1000, 1),
            "finish_reason": finish,
        }
        if self.error is not None:
            fields["error"] = self.error.code
        # The fields travel as ``extra``: the cli's formatters print them as key=value or JSON.
        log.info("request finished", extra=fields)


# ------------------------------------------------------------------------------------------ rendering


class ResponseFormat(Protocol):
    """How one endpoint renders a ``Generation``: the plain body, and the stream's chunks."""

    def response(self, g: Generation) -> BaseModel: ...

    def opening_chunk(self, g: Generation) -> BaseModel | None: ...

    def chunk(self, g: Generation, text: str, finish_reason: FinishReason | None) -> BaseModel: ...

    def usage_chunk(self, g: Generation) -> BaseModel: ...


class CompletionFormat:
    """``text_completion`` objects; stream chunks share the plain response's shape."""

    def response(self, g: Generation) -> CompletionResponse:
        assert g.finish_reason is not None
        choice = CompletionChoice(text=g.text, finish_reason=openai_finish_reason(g.finish_reason))
        return CompletionResponse(
            id=g.request_id, created=g.created, model=g.model, choices=[choice], usage=g.usage
        )

    def opening_chunk(self, g: Generation) -> None:
        return None

    def chunk(self, g: Generation, text: str, finish_reason: FinishReason | None) -> CompletionResponse:
        reason = None if finish_reason is None else openai_finish_reason(finish_reason)
        choice = CompletionChoice(text=text, finish_reason=reason)
        return CompletionResponse(id=g.request_id, created=g.created, model=g.model, choices=[choice])

    def usage_chunk(self, g: Generation) -> CompletionResponse:
        return CompletionResponse(
            id=g.request_id, created=g.created, model=g.model, choices=[], usage=g.usage
        )


class ChatFormat:
    """``chat.completion`` and ``chat.completion.chunk`` objects; the first chunk carries the role."""

    def response(self, g: Generation) -> ChatCompletionResponse:
        assert g.finish_reason is not None
        choice = ChatChoice(
            message=ChatMessageOut(content=g.text), finish_reason=openai_finish_reason(g.finish_reason)
        )
        return ChatCompletionResponse(
            id=g.request_id, created=g.created, model=g.model, choices=[choice], usage=g.usage
        )

    def opening_chunk(self, g: Generation) -> ChatCompletionChunk:
        choice = ChatChunkChoice(delta=ChatDelta(role="assistant", content=""))
        return ChatCompletionChunk(id=g.request_id, created=g.created, model=g.model, choices=[choice])

    def chunk(self, g: Generation, text: str, finish_reason: FinishReason | None) -> ChatCompletionChunk:
        reason = None if finish_reason is None else openai_finish_reason(finish_reason)
        choice = ChatChunkChoice(delta=ChatDelta(content=text or None), finish_reason=reason)
        return ChatCompletionChunk(id=g.request_id, created=g.created, model=g.model, choices=[choice])

    def usage_chunk(self, g: Generation) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=g.request_id, created=g.created, model=g.model, choices=[], usage=g.usage
        )


def _sse(model: BaseModel) -> ServerSentEvent:
    return ServerSentEvent(data=model.model_dump_json())


# ------------------------------------------------------------------------------------------- streaming


async def sse_events(
    engine: AsyncEngine,
    stream: RequestStream,
    g: Generation,
    fmt: ResponseFormat,
    *,
    include_usage: bool,
) -> AsyncIterator[ServerSentEvent]:
    """TokenEvents -> SSE chunks, ending with ``data: [DONE]``. An engine error mid-stream becomes
    ``data: {"error": {...}}`` then ``[DONE]``. Cancellation (the client left) aborts the request once."""
    try:
        opening = fmt.opening_chunk(g)
        if opening is not None:
            yield _sse(opening)
        async for event in stream:
            g.absorb(event)
            if event.finish_reason is FinishReason.ERROR:
                error = event.error or EngineError("generation failed")
                yield ServerSentEvent(data=json.dumps(engine_error_body(error)))
                break
            if event.text or event.finished:
                yield _sse(fmt.chunk(g, event.text, event.finish_reason))
        else:
            if include_usage:
                yield _sse(fmt.usage_chunk(g))
        yield ServerSentEvent(data=DONE)
    except (asyncio.CancelledError, GeneratorExit):
        if g.finish_reason is None:
            g.disconnected = True
            engine.abort(stream.request_id, "disconnect")
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
        engine.abort(stream.request_id, "disconnect")
        return False
    except asyncio.CancelledError:
        if g.finish_reason is None:
            g.disconnected = True
            engine.abort(stream.request_id, "disconnect")
        raise
    finally:
        for task in (consumer, watcher):
            task.cancel()
