"""The Ray Serve application: ``replica-0 .. replica-{N-1}`` (one engine each, one Ray replica each, so
each keeps its identity across restarts) behind ``ingress`` (``create_ingress_app`` over their handles).

Why one deployment per engine and our own router rather than ``@serve.multiplexed``: multiplexing keeps a
per-replica LRU of its own that knows nothing of our store's GPU and CPU tiers (an adapter our store
evicted would still attract traffic, one it preloaded would not), it routes only by model id with no
per-request head for the header, and a replica is anonymous to the caller. With named deployments the
ingress knows exactly which replica holds which adapter, reads it back from every response, and can retry
a failed request on a *different* replica.

``serve run server.scale.deployments:build_app replicas=2 num_cpus=0.5`` runs it under Ray's own CLI (any
``Settings``/``ScaleSettings`` field as ``key=value``); ``loraserve serve-ray`` (``server.scale.launch``)
starts Ray, runs it, and drains the replicas on SIGTERM.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import Any, cast

import ray.exceptions
from fastapi import FastAPI
from prometheus_client import generate_latest
from ray import serve
from ray.serve.deployment import Deployment
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from server.config import ScaleSettings, Settings
from server.scale.forward import AsgiForwarder, ForwardedRequest, ResponseHead
from server.scale.ingress import create_ingress_app
from server.scale.replicas import ReplicaFailedError, ReplicaState

log = logging.getLogger("loraserve.scale")

APP_NAME = "loraserve"
INGRESS_NAME = "ingress"
GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})


def replica_name(index: int) -> str:
    return f"replica-{index}"


class EngineReplica:
    """One engine and its ``create_app``, answering requests the ingress forwards (a Ray Serve
    deployment; Ray restarts it when its process dies or ``check_health`` raises)."""

    def __init__(self, settings: Mapping[str, Any], replica_id: str) -> None:
        from server.bootstrap import build_server

        self.replica_id = replica_id
        self.settings = Settings.model_validate(dict(settings))
        self.parts = build_server(self.settings)
        self.parts.engine.start()
        self.forwarder = AsgiForwarder(self.parts.app)
        log.info("replica %s ready (pid %d)", replica_id, os.getpid())

    def _tiers(self) -> dict[str, str]:
        adapters = getattr(self.parts.store, "adapters", None)
        return {a.name: a.tier for a in adapters()} if adapters is not None else {}

    def _adapter_tier(self, request: ForwardedRequest, tiers: Mapping[str, str]) -> str:
        if request.path not in GENERATION_PATHS:
            return "none"
        try:
            model = json.loads(request.body).get("model")
        except (ValueError, AttributeError):
            return "none"
        return tiers.get(model, "none") if isinstance(model, str) else "none"

    async def forward(self, request: ForwardedRequest) -> AsyncGenerator[ResponseHead | bytes, None]:
        arrived_tier = self._adapter_tier(request, self._tiers())
        async with contextlib.aclosing(self.forwarder.play(request)) as parts:
            async for part in parts:
                if isinstance(part, bytes):
                    yield part
                else:
                    status, headers = part
                    yield ResponseHead(status, headers, self.replica_id, arrived_tier, self._tiers())

    def state(self) -> ReplicaState:
        engine = self.parts.engine
        return ReplicaState(
            replica_id=self.replica_id,
            pid=os.getpid(),
            model_id=engine.model_id,
            ready=engine.is_ready,
            live_requests=engine.num_live,
            slots=self.settings.max_num_seqs,
            tiers=self._tiers(),
        )

    def metrics_text(self) -> str:
        return generate_latest(self.parts.metrics.registry).decode()

    async def drain(self, timeout: float) -> None:
        """Stop admitting, let live requests finish (up to ``timeout`` s), abort the rest."""
        await self.parts.engine.drain(timeout)

    def check_health(self) -> None:
        if not self.parts.engine.is_alive:
            raise RuntimeError(f"replica {self.replica_id}: the engine loop is not running")

    def __del__(self) -> None:
        parts = getattr(self, "parts", None)
        if parts is not None:
            parts.engine.stop()
            parts.close()


class RayReplicaSet:
    """``ReplicaSet`` over Ray Serve handles; a Ray error (dead actor, lost replica) is a
    ``ReplicaFailedError``."""

    def __init__(self, handles: Mapping[str, DeploymentHandle]) -> None:
        self._handles = dict(handles)

    @property
    def replica_ids(self) -> Sequence[str]:
        return sorted(self._handles)

    async def forward(
        self, replica_id: str, request: ForwardedRequest
    ) -> AsyncGenerator[ResponseHead | bytes, None]:
        stream = cast(
            DeploymentResponseGenerator[Any],
            self._handles[replica_id].options(stream=True).forward.remote(request),
        )
        try:
            async for part in stream:
                yield part
        except ray.exceptions.RayError as exc:
            raise ReplicaFailedError(replica_id, type(exc).__name__) from exc
        finally:
            stream.cancel()  # the client left (or we are done): the replica sees a disconnect

    async def _call(self, replica_id: str, method: str, *args: Any) -> Any:
        try:
            return await getattr(self._handles[replica_id], method).remote(*args)
        except ray.exceptions.RayError as exc:
            raise ReplicaFailedError(replica_id, type(exc).__name__) from exc

    async def state(self, replica_id: str) -> ReplicaState:
        state: ReplicaState = await self._call(replica_id, "state")
        return state

    async def metrics_text(self, replica_id: str) -> str:
        text: str = await self._call(replica_id, "metrics_text")
        return text

    async def drain(self, replica_id: str, timeout: float) -> None:
        await self._call(replica_id, "drain", timeout)


class IngressDeployment:
    """The HTTP ingress (a Ray Serve deployment whose ASGI app is built on the replica)."""

    def __init__(
        self, settings: Mapping[str, Any], scale: Mapping[str, Any], replicas: Mapping[str, DeploymentHandle]
    ) -> None:
        self._app = create_ingress_app(
            Settings.model_validate(dict(settings)),
            ScaleSettings.model_validate(dict(scale)),
            RayReplicaSet(replicas),
        )

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self._app


def build_application(settings: Settings, scale: ScaleSettings) -> serve.Application:
    """The bound application: N engine deployments and the ingress over them."""
    # every replica needs a free slot per request Serve lets in; the engine's own queue (--max-queue,
    # 429 beyond) does the waiting, so Serve must not cap below it
    ongoing = settings.max_num_seqs + settings.max_queue
    drain_s = settings.shutdown_timeout + 10.0
    engine_options = {"num_cpus": scale.num_cpus, "num_gpus": scale.num_gpus}
    settings_data = settings.model_dump(mode="json")
    replica_deployment = cast(Deployment, serve.deployment(EngineReplica))
    handles = {}
    for i in range(scale.replicas):
        rid = replica_name(i)
        handles[rid] = replica_deployment.options(
            name=rid,
            num_replicas=1,
            max_ongoing_requests=ongoing,
            ray_actor_options=engine_options,
            graceful_shutdown_timeout_s=drain_s,
            health_check_period_s=2.0,
        ).bind(settings_data, rid)
    ingress = cast(Deployment, serve.deployment(serve.ingress()(IngressDeployment))).options(
        name=INGRESS_NAME,
        num_replicas=1,
        max_ongoing_requests=ongoing * scale.replicas,
        ray_actor_options={"num_cpus": 0},
        graceful_shutdown_timeout_s=drain_s,
    )
    return ingress.bind(settings_data, scale.model_dump(mode="json"), handles)


def build_app(args: dict[str, str]) -> serve.Application:
    """Application builder for ``serve run server.scale.deployments:build_app key=value ...`` and KubeRay's
    ``serveConfigV2`` (``args:``): each key a ``Settings`` or ``ScaleSettings`` field."""
    engine_args = {k: v for k, v in args.items() if k in Settings.model_fields}
    scale_args = {k: v for k, v in args.items() if k in ScaleSettings.model_fields}
    unknown = set(args) - set(engine_args) - set(scale_args)
    if unknown:
        raise ValueError(f"unknown loraserve settings: {', '.join(sorted(unknown))}")
    return build_application(Settings.model_validate(engine_args), ScaleSettings.model_validate(scale_args))
