"""The ingress's view of the engine replicas: what one reports, and the ``ReplicaSet`` seam the ingress
calls (Ray Serve handles in ``deployments``; anything with the same methods in tests)."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from server.scale.forward import ForwardedRequest, ResponseHead


class ReplicaFailedError(RuntimeError):
    """A call to a replica failed in transport (its process died, Ray lost it): not an HTTP answer."""

    def __init__(self, replica_id: str, detail: str) -> None:
        super().__init__(f"replica {replica_id} failed: {detail}")
        self.replica_id = replica_id


@dataclass(slots=True)
class ReplicaState:
    """One replica's answer to a state poll."""

    replica_id: str
    pid: int
    model_id: str
    ready: bool
    live_requests: int
    slots: int  # --max-num-seqs
    tiers: dict[str, str] = field(default_factory=dict)  # adapter -> gpu | cpu | disk


class ReplicaSet(Protocol):
    """The engine replicas, by id. ``forward`` yields one ``ResponseHead`` then body chunks, and raises
    ``ReplicaFailedError`` when the replica goes away; closing it early cancels the call on the replica."""

    @property
    def replica_ids(self) -> Sequence[str]: ...

    def forward(
        self, replica_id: str, request: ForwardedRequest
    ) -> AsyncGenerator[ResponseHead | bytes, None]: ...

    async def state(self, replica_id: str) -> ReplicaState: ...

    async def metrics_text(self, replica_id: str) -> str: ...

    async def drain(self, replica_id: str, timeout: float) -> None: ...
