"""``create_app``: the FastAPI application around an engine. The engine is started and drained by
``server.cli``; the app only reports its state (``/health``, ``/ready``)."""

from __future__ import annotations

import logging
import time

from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from server.api import admin_routes, openai_routes
from server.api.auth import MetricsDep, load_api_keys
from server.api.errors import ApiError, BodyLimitMiddleware, install_error_handlers
from server.api.output_constraints import OutputConstraints
from server.config import Settings
from server.engine.engine import AsyncEngine
from server.metrics import Metrics

log = logging.getLogger("loraserve.api")

probes = APIRouter(tags=["operations"])


def _not_ready(message: str) -> ApiError:
    return ApiError(503, message, type="server_error", code="not_ready")


@probes.get("/health", summary="Liveness: 200 while the engine loop runs")
async def health(request: Request) -> dict[str, str]:
    if not request.app.state.engine.is_alive:
        raise _not_ready("the engine loop is not running")
    return {"status": "ok"}


@probes.get("/ready", summary="Readiness: 503 while loading or draining")
async def ready(request: Request) -> dict[str, str]:
    if not request.app.state.engine.is_ready:
        raise _not_ready("the server is starting or draining")
    return {"status": "ready"}


@probes.get(
    "/metrics", summary="Prometheus metrics (a metrics or admin key with --api-keys)", response_class=Response
)
async def metrics(request: Request, _scraper: MetricsDep) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def create_app(
    settings: Settings,
    engine: AsyncEngine,
    *,
    store: admin_routes.AdapterAdmin | None = None,
    metrics: Metrics | None = None,
) -> FastAPI:
    """Build the app. A bad ``--api-keys`` file raises ``ApiKeysFileError`` here, at start."""
    metrics = metrics or engine.metrics or Metrics(CollectorRegistry())
    keyring = load_api_keys(settings.api_keys) if settings.api_keys is not None else None
    if keyring is None:
        log.warning(
            "!!! NO --api-keys FILE: the API is OPEN to every caller that can reach %s:%s; "
            "admin routes answer loopback callers only. Set --api-keys for anything but local use. !!!",
            settings.host,
            settings.port,
        )
    else:
        log.info("loaded %d API keys from %s", len(keyring), settings.api_keys)

    app = FastAPI(title="loraserve", summary="Multi-tenant LoRA inference, OpenAI-compatible")
    app.state.settings = settings
    app.state.engine = engine
    app.state.store = store
    app.state.metrics = metrics
    app.state.keyring = keyring
    app.state.started_at = int(time.time())
    app.state.output_constraints = OutputConstraints.for_engine(engine, settings.tool_call_parser)

    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, metrics=metrics)
    app.include_router(openai_routes.router)
    app.include_router(openai_routes.tokenizer_router)
    app.include_router(probes)
    app.include_router(admin_routes.router)
    return app
