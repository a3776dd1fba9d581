"""``create_ingress_app``: the one HTTP front of N engine replicas. It speaks the same routes as
``server.api.app.create_app`` by forwarding each request to a replica's own app, so bodies, errors and
streams are the single-process ones; what the ingress adds:

- API keys are checked here too (401 before anything is forwarded; 403 for admin routes), with the same
  keys file the replicas use, so a replica never sees an unauthenticated request. Tenancy (404 for a model
  the tenant may not see) is answered by the replica exactly as on one process.
- Routing by adapter affinity (``router.AffinityRouter``); every response carries ``x-loraserve-replica``
  (``ingress`` for answers made here) and forwarded ones ``x-loraserve-adapter-tier``: the adapter's tier on
  that replica when the request arrived.
- A replica that fails: a non-streamed request (or a stream that has sent nothing yet) is retried once on
  another replica; a stream already under way ends with an error event and ``[DONE]``.
- Admin fan-out: load/unload on every replica, ``/v1/adapters`` merged with a ``replica`` field.
- ``/metrics``: the ingress's own metrics, then every replica's with a ``replica`` label.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.auth import AdminDep, TenantDep, load_api_keys
from server.api.errors import ApiError, BodyLimitMiddleware, error_body, install_error_handlers
from server.config import ScaleSettings, Settings
from server.metrics import IngressMetrics
from server.scale.forward import ForwardedRequest, ResponseHead
from server.scale.prom import merge_expositions
from server.scale.replicas import ReplicaFailedError, ReplicaSet, ReplicaState
from server.scale.router import AffinityRouter, NoReplicaError, RoutingPolicy

log = logging.getLogger("loraserve.ingress")

REPLICA_HEADER = "x-loraserve-replica"
TIER_HEADER = "x-loraserve-adapter-tier"
INGRESS_ID = "ingress"
POLL_INTERVAL_S = 1.0
POLL_TIMEOUT_S = 5.0
_DROPPED_HEADERS = frozenset({b"content-length", b"transfer-encoding", b"connection"})


class ReplicaHeaderMiddleware:
    """``x-loraserve-replica: ingress`` on every answer that does not already name a replica."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_named(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(k.lower() == REPLICA_HEADER.encode() for k, _ in headers):
                    headers.append((REPLICA_HEADER.encode(), INGRESS_ID.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_named)


class Ingress:
    """Routing, retries and fan-out over a ``ReplicaSet`` (one per ingress app)."""

    def __init__(self, replicas: ReplicaSet, router: AffinityRouter, metrics: IngressMetrics) -> None:
        self.replicas = replicas
        self.router = router
        self.metrics = metrics
        self.states: dict[str, ReplicaState] = {}
        self.model_id: str | None = None

    # ------------------------------------------------------------------------------------ state

    async def poll_once(self) -> None:
        await asyncio.gather(*(self._poll(rid) for rid in self.replicas.replica_ids))

    async def _poll(self, replica_id: str) -> None:
        asked_at = self.router.now()
        try:
            state = await asyncio.wait_for(self.replicas.state(replica_id), POLL_TIMEOUT_S)
        except Exception as exc:  # whatever Ray raises for a replica it cannot reach: route around it
            if self.router.replicas[replica_id].healthy:
                log.warning("replica %s is not answering: %r", replica_id, exc)
            self.router.mark_down(replica_id)
            self.states.pop(replica_id, None)
            return
        if not self.router.replicas[replica_id].healthy:
            log.info("replica %s is back (pid %d)", replica_id, state.pid)
        self.router.mark_up(replica_id)
        self.router.report(replica_id, state.tiers, asked_at)
        self.states[replica_id] = state
        self.model_id = state.model_id

    async def poll_forever(self) -> None:
        while True:
            await self.poll_once()
            await asyncio.sleep(POLL_INTERVAL_S)

    @property
    def is_ready(self) -> bool:
        return any(s.ready and self.router.replicas[s.replica_id].healthy for s in self.states.values())

    # ------------------------------------------------------------------------------------ forwarding

    async def dispatch(self, adapter: str | None, request: ForwardedRequest) -> Response:
        """Forward to the replica the router picks; retry once elsewhere if it fails before answering
        (for a stream: before its first event)."""
        tried: list[str] = []
        while True:
            try:
                route = self.router.choose(adapter, exclude=tried)
            except NoReplicaError:
                raise ApiError(
                    503,
                    "no engine replica is available; retry shortly",
                    type="server_error",
                    code="no_replica",
                ) from None
            rid = route.replica_id
            self.metrics.routed_total.labels(replica=rid, reason=route.reason.value).inc()
            self.router.started(rid, adapter)
            parts = self.replicas.forward(rid, request)
            try:
                head = await anext(parts)
                if not isinstance(head, ResponseHead):
                    raise RuntimeError(f"replica {rid} answered without a head first")
                self.router.report(rid, head.tiers, self.router.now())
                if head.is_event_stream:
                    # the router hears of the stream's end from relay()
                    return StreamingResponse(
                        self._relay(rid, adapter, parts), status_code=head.status, headers=_headers(head)
                    )
                body = b"".join([chunk async for chunk in parts if isinstance(chunk, bytes)])
            except ReplicaFailedError as exc:
                self.router.finished(rid, adapter)
                self._failed(rid, exc)
                tried.append(rid)
                if len(tried) >= 2:
                    raise ApiError(
                        503,
                        "the engine replicas failed twice for this request; retry shortly",
                        type="server_error",
                        code="replica_failed",
                    ) from None
                self.metrics.retries_total.labels(replica=rid).inc()
                continue
            except BaseException:
                self.router.finished(rid, adapter)
                await parts.aclose()
                raise
            self.router.finished(rid, adapter)
            return Response(body, status_code=head.status, headers=_headers(head))

    async def _relay(
        self, rid: str, adapter: str | None, parts: AsyncGenerator[ResponseHead | bytes, None]
    ) -> AsyncIterator[bytes]:
        try:
            async for chunk in parts:
                if isinstance(chunk, bytes):
                    yield chunk
        except ReplicaFailedError as exc:
            self._failed(rid, exc)
            body = error_body(
                f"the engine replica serving this stream failed: {exc}",
                type="server_error",
                code="replica_failed",
            )
            yield f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n".encode()
        finally:
            self.router.finished(rid, adapter)
            with contextlib.suppress(Exception):
                await parts.aclose()

    def _failed(self, rid: str, exc: ReplicaFailedError) -> None:
        log.warning("%s", exc)
        self.metrics.replica_failures_total.labels(replica=rid).inc()
        self.router.mark_down(rid)
        self.states.pop(rid, None)

    async def fan_out(
        self, request: ForwardedRequest
    ) -> list[tuple[str, ResponseHead, bytes] | tuple[str, None, bytes]]:
        """The request on every healthy replica, concurrently: (replica, head, body), head None on failure."""
        targets = [rid for rid, v in self.router.replicas.items() if v.healthy]
        if not targets:
            raise ApiError(503, "no engine replica is available", type="server_error", code="no_replica")

        async def one(rid: str) -> tuple[str, ResponseHead, bytes] | tuple[str, None, bytes]:
            try:
                parts = [p async for p in self.replicas.forward(rid, request)]
            except ReplicaFailedError as exc:
                self._failed(rid, exc)
                return rid, None, b""
            head = parts[0]
            assert isinstance(head, ResponseHead)
            self.router.report(rid, head.tiers, self.router.now())
            return rid, head, b"".join(p for p in parts[1:] if isinstance(p, bytes))

        return list(await asyncio.gather(*(one(rid) for rid in targets)))


def _headers(head: ResponseHead) -> dict[str, str]:
    headers = {
        k.decode("latin-1"): v.decode("latin-1") for k, v in head.headers if k.lower() not in _DROPPED_HEADERS
    }
    headers[REPLICA_HEADER] = head.replica_id
    headers[TIER_HEADER] = head.adapter_tier
    return headers


async def _forwarded(request: Request) -> ForwardedRequest:
    body = b""
    async for chunk in request.stream():  # BodyLimitMiddleware bounds it
        body += chunk
    keep = {b"authorization", b"content-type", b"accept"}
    headers = tuple((k, v) for k, v in request.scope["headers"] if k.lower() in keep)
    client = (request.client.host, request.client.port) if request.client else None
    return ForwardedRequest(
        method=request.method,
        path=request.url.path,
        body=body,
        query_string=request.scope.get("query_string", b""),
        headers=headers,
        client=client,
    )


def _model_of(body: bytes) -> str | None:
    """The ``model`` field when the body is a JSON object naming one (the replica validates the rest)."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    model = parsed.get("model") if isinstance(parsed, dict) else None
    return model if isinstance(model, str) else None


def _merged_answer(results: Iterable[tuple[str, ResponseHead | None, bytes]], *, need_all: bool) -> Response:
    """One answer for a fan-out: the first success (every replica must succeed when ``need_all``), else
    the first replica error as it was. ``x-loraserve-replica`` lists the replicas that answered alike."""
    ok: list[tuple[str, ResponseHead, bytes]] = []
    failed: list[tuple[str, ResponseHead, bytes]] = []
    for rid, head, body in results:
        if head is not None:
            (ok if 200 <= head.status < 300 else failed).append((rid, head, body))
    group = failed if failed and (need_all or not ok) else ok
    if not group:
        raise ApiError(503, "no engine replica answered", type="server_error", code="no_replica")
    _, head, body = group[0]
    headers = _headers(head)
    headers[REPLICA_HEADER] = ",".join(sorted(rid for rid, _, _ in group))
    return Response(body, status_code=head.status, headers=headers)


def create_ingress_app(settings: Settings, scale: ScaleSettings, replicas: ReplicaSet) -> FastAPI:
    """The ingress app over ``replicas``; polls their state while it runs (lifespan)."""
    metrics = IngressMetrics()
    router = AffinityRouter(
        replicas.replica_ids,
        slots_per_replica=settings.max_num_seqs,
        # the store's CPU tier also keeps the state dicts of GPU-resident adapters
        adapters_per_replica=max(settings.max_gpu_adapters, settings.max_cpu_adapters),
        policy=RoutingPolicy(scale.routing),
    )
    ingress = Ingress(replicas, router, metrics)
    keyring = load_api_keys(settings.api_keys) if settings.api_keys is not None else None

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await ingress.poll_once()
        poller = asyncio.ensure_future(ingress.poll_forever())
        try:
            yield
        finally:
            poller.cancel()

    app = FastAPI(
        title="loraserve ingress", summary="N loraserve replicas behind one OpenAI API", lifespan=lifespan
    )
    app.state.settings = settings
    app.state.keyring = keyring
    app.state.ingress = ingress
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(ReplicaHeaderMiddleware)

    async def generate(request: Request, _tenant: TenantDep) -> Response:
        forwarded = await _forwarded(request)
        model = _model_of(forwarded.body)
        adapter = None if model is None or model == ingress.model_id else model
        return await ingress.dispatch(adapter, forwarded)

    app.add_api_route("/v1/completions", generate, methods=["POST"], tags=["openai"])
    app.add_api_route("/v1/chat/completions", generate, methods=["POST"], tags=["openai"])

    @app.get("/v1/models", tags=["openai"])
    async def list_models(request: Request, _tenant: TenantDep) -> Response:
        return await ingress.dispatch(None, await _forwarded(request))

    @app.post("/v1/load_lora_adapter", tags=["admin"])
    async def load_lora_adapter(request: Request, _admin: AdminDep) -> Response:
        return _merged_answer(await ingress.fan_out(await _forwarded(request)), need_all=True)

    @app.post("/v1/unload_lora_adapter", tags=["admin"])
    async def unload_lora_adapter(request: Request, _admin: AdminDep) -> Response:
        return _merged_answer(await ingress.fan_out(await _forwarded(request)), need_all=False)

    @app.delete("/v1/adapters/{name}/snapshot", tags=["admin"])
    async def retire_snapshot(request: Request, name: str, _admin: AdminDep) -> Response:
        return _merged_answer(await ingress.fan_out(await _forwarded(request)), need_all=False)

    @app.post("/v1/adapters/{name}/snapshot", tags=["admin"])
    async def build_snapshot(request: Request, name: str, _admin: AdminDep) -> Response:
        # built where the adapter's traffic goes
        return await ingress.dispatch(name, await _forwarded(request))

    @app.get("/v1/adapters", tags=["admin"])
    async def list_adapters(request: Request, _admin: AdminDep) -> JSONResponse:
        results = await ingress.fan_out(await _forwarded(request))
        data: list[dict[str, Any]] = []
        for rid, head, body in results:
            if head is None:
                continue
            if head.status != 200:
                return JSONResponse(json.loads(body), status_code=head.status)
            data += [{**entry, "replica": rid} for entry in json.loads(body)["data"]]
        data.sort(key=lambda e: (e["id"], e["replica"]))
        return JSONResponse({"object": "list", "data": data})

    @app.get("/health", tags=["operations"])
    async def health() -> dict[str, str]:
        if not any(v.healthy for v in router.replicas.values()):
            raise ApiError(503, "no engine replica is running", type="server_error", code="not_ready")
        return {"status": "ok"}

    @app.get("/ready", tags=["operations"])
    async def ready() -> dict[str, str]:
        if not ingress.is_ready:
            raise ApiError(503, "no engine replica is ready", type="server_error", code="not_ready")
        return {"status": "ready"}

    @app.get("/metrics", tags=["operations"], response_class=Response)
    async def prometheus() -> Response:
        async def scrape(rid: str) -> tuple[str, str | None]:
            try:
                return rid, await asyncio.wait_for(replicas.metrics_text(rid), POLL_TIMEOUT_S)
            except (ReplicaFailedError, TimeoutError):
                return rid, None

        healthy = [rid for rid, v in router.replicas.items() if v.healthy]
        scraped = dict(await asyncio.gather(*(scrape(rid) for rid in healthy)))
        texts = {rid: text for rid, text in scraped.items() if text is not None}
        return Response(
            merge_expositions(generate_latest(metrics.registry), texts), media_type=CONTENT_TYPE_LATEST
        )

    return app
