"""Admin routes: load/unload adapters (vLLM-compatible bodies), list them, build/retire snapshots.

The handle is ``request.app.state.store``, typed by the ``AdapterAdmin`` protocol: the API never imports
torch or ``adapter_store``. Store errors carry ``status`` (4xx/5xx), ``reason`` and an actionable message;
they become the OpenAI error envelope. Handlers are plain ``def``: registering hashes the adapter's
weights, so FastAPI runs them on its thread pool rather than on the event loop.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from server.api.auth import AdminDep
from server.api.errors import ApiError

router = APIRouter(tags=["admin"])


class AdapterInfoView(Protocol):
    """What the store reports per adapter."""

    name: str
    tier: str
    pinned: int
    digest: str
    requests: int
    snapshot: str
    rank: int
    path: str


class AdapterAdmin(Protocol):
    """The slice of ``adapter_store.AdapterStore`` the admin routes use (any thread)."""

    def load(self, name: str, path: str) -> AdapterInfoView: ...

    def unload(self, name: str) -> None: ...

    def adapters(self) -> Sequence[AdapterInfoView]: ...

    def build_snapshot(self, name: str) -> None: ...

    def retire_snapshot(self, name: str) -> None: ...


class LoadLoraAdapterRequest(BaseModel):
    """vLLM's body for ``POST /v1/load_lora_adapter`` (unknown vLLM fields are ignored)."""

    model_config = ConfigDict(extra="ignore")
    lora_name: str = Field(min_length=1, max_length=128)
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadLoraAdapterRequest(BaseModel):
    """vLLM's body for ``POST /v1/unload_lora_adapter``."""

    model_config = ConfigDict(extra="ignore")
    lora_name: str = Field(min_length=1, max_length=128)


class AdapterEntry(BaseModel):
    """One adapter in ``GET /v1/adapters``."""

    object: str = "adapter"
    id: str
    tier: str
    pinned: int
    digest: str
    requests: int
    snapshot: str
    rank: int
    path: str

    @classmethod
    def of(cls, info: AdapterInfoView) -> AdapterEntry:
        return cls(
            id=info.name,
            tier=info.tier,
            pinned=info.pinned,
            digest=info.digest,
            requests=info.requests,
            snapshot=info.snapshot,
            rank=info.rank,
            path=info.path,
        )


class AdapterList(BaseModel):
    object: str = "list"
    data: list[AdapterEntry]


class AdminResult(BaseModel):
    message: str
    adapter: AdapterEntry | None = None


def _store(request: Request) -> AdapterAdmin:
    store: AdapterAdmin | None = request.app.state.store
    if store is None:
        raise ApiError(503, "this server runs without an adapter store", type="server_error", code="no_store")
    return store


@contextmanager
def _store_errors(param: str | None, *, name_param: str | None = None) -> Iterator[None]:
    """A store error (anything with an int HTTP ``status``) becomes an ``ApiError`` naming ``param``
    (``name_param`` when the adapter name itself was refused); any other exception is a bug and
    propagates."""
    try:
        yield
    except Exception as exc:
        status = getattr(exc, "status", None)
        if not isinstance(status, int) or not 400 <= status < 600:
            raise
        kind = (
            "server_error"
            if status >= 500
            else "not_found_error"
            if status == 404
            else "invalid_request_error"
        )
        reason = getattr(exc, "reason", None)
        named = name_param if reason == "bad_name" and name_param is not None else param
        raise ApiError(status, str(exc), type=kind, param=named, code=reason) from exc


def _find(store: AdapterAdmin, name: str) -> AdapterInfoView | None:
    return next((a for a in store.adapters() if a.name == name), None)


@router.post("/v1/load_lora_adapter", summary="Register (or re-register) an adapter and start loading it")
def load_lora_adapter(body: LoadLoraAdapterRequest, request: Request, _admin: AdminDep) -> AdminResult:
    store = _store(request)
    with _store_errors("lora_path", name_param="lora_name"):
        info = store.load(body.lora_name, body.lora_path)
    return AdminResult(
        message=f"Success: LoRA adapter '{info.name}' added successfully.", adapter=AdapterEntry.of(info)
    )


@router.post("/v1/unload_lora_adapter", summary="Unregister an adapter (its weights go once unpinned)")
def unload_lora_adapter(body: UnloadLoraAdapterRequest, request: Request, _admin: AdminDep) -> AdminResult:
    store = _store(request)
    with _store_errors("lora_name"):
        store.unload(body.lora_name)
    return AdminResult(message=f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


@router.get("/v1/adapters", summary="Every registered adapter: tier, pins, digest, requests, snapshot")
def list_adapters(request: Request, _admin: AdminDep) -> AdapterList:
    return AdapterList(data=[AdapterEntry.of(a) for a in _store(request).adapters()])


@router.post(
    "/v1/adapters/{name}/snapshot", status_code=202, summary="Build a merged snapshot in the background"
)
def build_snapshot(name: str, request: Request, _admin: AdminDep) -> AdminResult:
    store = _store(request)
    with _store_errors("name"):
        store.build_snapshot(name)
    info = _find(store, name)
    return AdminResult(
        message=f"snapshot of '{name}' is building",
        adapter=AdapterEntry.of(info) if info is not None else None,
    )


@router.delete("/v1/adapters/{name}/snapshot", summary="Retire the adapter's snapshot (once unpinned)")
def retire_snapshot(name: str, request: Request, _admin: AdminDep) -> AdminResult:
    store = _store(request)
    with _store_errors("name"):
        store.retire_snapshot(name)
    return AdminResult(message=f"snapshot of '{name}' retired")
