"""One HTTP request, forwarded as data from the ingress to a replica, and played into the replica's own
ASGI app (``create_app``) in process: the replica answers exactly as a single ``loraserve serve`` would.

``ForwardedRequest -> ASGI scope/receive -> app -> send -> ResponseHead, then body chunks``. When the
consumer of the chunks goes away (the client left, so Ray cancelled the call), the app's next ``receive``
returns ``http.disconnect``: its own disconnect handling then aborts the request in the engine, as it does
for a direct client.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp, Message

FORWARDED_HEADERS = frozenset({b"authorization", b"content-type", b"accept", b"x-request-id"})


@dataclass(slots=True, frozen=True)
class ForwardedRequest:
    """The parts of an HTTP request a replica needs (picklable: it crosses Ray)."""

    method: str
    path: str
    body: bytes = b""
    query_string: bytes = b""
    headers: tuple[tuple[bytes, bytes], ...] = ()
    client: tuple[str, int] | None = None

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)


@dataclass(slots=True)
class ResponseHead:
    """Status and headers of the replica's answer, and what the replica reports alongside."""

    status: int
    headers: list[tuple[bytes, bytes]]
    replica_id: str
    adapter_tier: str  # the adapter's tier on the replica when the request arrived ("none": base/unknown)
    tiers: dict[str, str] = field(default_factory=dict)  # the replica's residency when it answered

    @property
    def is_event_stream(self) -> bool:
        content_type = next((v for k, v in self.headers if k.lower() == b"content-type"), b"")
        return content_type.startswith(b"text/event-stream")


_END = object()


class _Exchange:
    """The ASGI side of one forwarded request."""

    def __init__(self, request: ForwardedRequest) -> None:
        self.request = request
        self.messages: asyncio.Queue[Any] = asyncio.Queue()
        self.disconnected = asyncio.Event()
        self._body_sent = False

    async def receive(self) -> Message:
        if not self._body_sent:
            self._body_sent = True
            return {"type": "http.request", "body": self.request.body, "more_body": False}
        await self.disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        await self.messages.put(message)

    def scope(self) -> dict[str, Any]:
        r = self.request
        return {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": r.method,
            "scheme": "http",
            "path": r.path,
            "raw_path": r.path.encode(),
            "root_path": "",
            "query_string": r.query_string,
            "headers": [(k.lower(), v) for k, v in r.headers],
            "client": r.client,
            "server": ("127.0.0.1", 0),
        }


class AsgiForwarder:
    """Plays forwarded requests into one ASGI app; keeps a reference to requests still running after
    their consumer left (they end once the app has seen the disconnect)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._running: set[asyncio.Task[None]] = set()

    async def play(
        self, request: ForwardedRequest
    ) -> AsyncGenerator[tuple[int, list[tuple[bytes, bytes]]] | bytes, None]:
        """Run ``request`` through the app; yield ``(status, headers)`` once, then the body chunks. Closing
        or cancelling the iterator early is a client disconnect for the app."""
        exchange = _Exchange(request)
        task: asyncio.Task[None] = asyncio.ensure_future(
            self.app(exchange.scope(), exchange.receive, exchange.send)
        )
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        task.add_done_callback(lambda _: exchange.messages.put_nowait(_END))
        try:
            while True:
                message = await exchange.messages.get()
                if message is _END:
                    task.result()  # the app's exception, if it raised without answering
                    raise RuntimeError("the app finished without a complete response")
                if message["type"] == "http.response.start":
                    headers = [(bytes(k), bytes(v)) for k, v in message.get("headers", [])]
                    yield int(message["status"]), headers
                elif message["type"] == "http.response.body":
                    body = bytes(message.get("body", b""))
                    if body:
                        yield body
                    if not message.get("more_body", False):
                        return
        finally:
            # Answer complete or consumer gone: any further receive() is a disconnect. A request still
            # running sees it and aborts itself in the engine; the task then ends on its own.
            exchange.disconnected.set()
