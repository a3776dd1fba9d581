"""Adapter-affinity routing over a fixed set of engine replicas (pure Python: no Ray, no torch).

A request for adapter X goes to a healthy replica that holds X in its GPU or CPU tier and has a free KV
slot (fewest requests in flight among them); otherwise to the least-loaded healthy replica: one with room
left in its tiers first (so that taking X evicts nothing), then fewest in flight, then fewest resident
adapters, so that new adapters spread over the replicas' tiers. Base requests go to the least-loaded
replica.

What a replica holds comes from two sources: its own reports (the residency it returns with every response
and with every state poll), and the requests this router sent it, which count as "holds X" from the moment
they are routed until a report taken after they finished says otherwise. Without the second, two requests
for a new adapter sent before the first report would land on different replicas.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum


class RoutingPolicy(StrEnum):
    AFFINITY = "affinity"
    ROUND_ROBIN = "round_robin"


class RouteReason(StrEnum):
    RESIDENT = "resident"  # a replica that holds the adapter (and has a free slot)
    LEAST_LOADED = "least_loaded"  # nobody holds it, or every holder is full, or a base request
    ROUND_ROBIN = "round_robin"


class NoReplicaError(RuntimeError):
    """Every replica is down or excluded; the caller answers 503."""


RESIDENT_TIERS = frozenset({"gpu", "cpu"})
_IN_FLIGHT = float("inf")  # "routed here and not finished": newer than any report


@dataclass(slots=True)
class ReplicaView:
    """What the router knows of one replica."""

    replica_id: str
    in_flight: int = 0  # requests routed here and not finished
    healthy: bool = True
    resident: frozenset[str] = frozenset()  # GPU or CPU tier, as last reported
    routed: dict[str, float] = field(default_factory=dict)  # adapter -> when its last request finished

    def holds(self, adapter: str) -> bool:
        return adapter in self.resident or adapter in self.routed


@dataclass(slots=True, frozen=True)
class Route:
    replica_id: str
    reason: RouteReason


class AffinityRouter:
    """Picks a replica per request; the ingress tells it when requests start and finish and what replicas
    report. Single event loop: no locking."""

    def __init__(
        self,
        replica_ids: Iterable[str],
        *,
        slots_per_replica: int,
        adapters_per_replica: int,
        policy: RoutingPolicy = RoutingPolicy.AFFINITY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.replicas = {rid: ReplicaView(rid) for rid in replica_ids}
        if not self.replicas:
            raise ValueError("the router needs at least one replica")
        self.slots_per_replica = slots_per_replica
        self.adapters_per_replica = adapters_per_replica
        self.policy = policy
        self._clock = clock
        self._cycle = itertools.cycle(sorted(self.replicas))

    # ------------------------------------------------------------------------------------ choosing

    def choose(self, adapter: str | None, *, exclude: Collection[str] = ()) -> Route:
        candidates = [v for v in self.replicas.values() if v.healthy and v.replica_id not in exclude]
        if not candidates:
            raise NoReplicaError("no engine replica is available")
        if self.policy is RoutingPolicy.ROUND_ROBIN:
            ids = {v.replica_id for v in candidates}
            return Route(next(r for r in self._cycle if r in ids), RouteReason.ROUND_ROBIN)
        if adapter is not None:
            holders = [v for v in candidates if v.holds(adapter) and v.in_flight < self.slots_per_replica]
            if holders:
                best = min(holders, key=lambda v: (v.in_flight, v.replica_id))
                return Route(best.replica_id, RouteReason.RESIDENT)

        def load(v: ReplicaView) -> tuple[bool, int, int, str]:
            held = len(v.resident | v.routed.keys())
            # a replica whose tiers are full would evict another adapter to take this one
            return (held >= self.adapters_per_replica, v.in_flight, held, v.replica_id)

        return Route(min(candidates, key=load).replica_id, RouteReason.LEAST_LOADED)

    # ------------------------------------------------------------------------------------ events

    def started(self, replica_id: str, adapter: str | None) -> None:
        view = self.replicas[replica_id]
        view.in_flight += 1
        if adapter is not None:
            view.routed[adapter] = _IN_FLIGHT

    def finished(self, replica_id: str, adapter: str | None) -> None:
        view = self.replicas[replica_id]
        view.in_flight = max(0, view.in_flight - 1)
        if adapter is not None and adapter in view.routed:
            view.routed[adapter] = self._clock()

    def report(self, replica_id: str, tiers: Mapping[str, str], taken_at: float) -> None:
        """The replica's residency (adapter -> tier), read at ``taken_at`` (this router's clock, the time
        the question was sent). Routed adapters it no longer holds are forgotten if they finished before."""
        view = self.replicas[replica_id]
        view.resident = frozenset(a for a, tier in tiers.items() if tier in RESIDENT_TIERS)
        for adapter, finished_at in list(view.routed.items()):
            if adapter not in view.resident and finished_at < taken_at:
                del view.routed[adapter]

    def mark_down(self, replica_id: str) -> None:
        """A call to the replica failed: route around it until a state poll answers again."""
        view = self.replicas[replica_id]
        view.healthy = False
        view.resident = frozenset()
        view.routed.clear()

    def mark_up(self, replica_id: str) -> None:
        self.replicas[replica_id].healthy = True

    def now(self) -> float:
        return self._clock()
