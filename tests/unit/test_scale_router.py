"""The ingress's replica choice (``server.scale.router``) and the merged exposition (``server.scale.prom``)."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import IngressMetrics, Metrics
from server.scale.prom import merge_expositions
from server.scale.router import AffinityRouter, NoReplicaError, RouteReason, RoutingPolicy


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 1.0
        return self.t


def router(
    policy: RoutingPolicy = RoutingPolicy.AFFINITY, slots: int = 2, adapters: int = 2
) -> AffinityRouter:
    return AffinityRouter(
        ["r0", "r1"], slots_per_replica=slots, adapters_per_replica=adapters, policy=policy, clock=Clock()
    )


def test_a_resident_adapter_goes_to_its_replica() -> None:
    r = router()
    r.report("r1", {"a": "gpu", "b": "cpu", "c": "disk"}, taken_at=0.0)
    assert r.choose("a") == r.choose("b") == r.choose("a")
    assert r.choose("a").replica_id == "r1" and r.choose("a").reason is RouteReason.RESIDENT
    # on disk only is not resident: least loaded, and r0 has room in its tiers
    assert r.choose("c").replica_id == "r0"


def test_a_routed_adapter_counts_as_held_until_a_later_report_says_otherwise() -> None:
    r = router()
    first = r.choose("x")
    r.started(first.replica_id, "x")
    assert r.choose("x").replica_id == first.replica_id  # before any report
    r.finished(first.replica_id, "x")
    r.report(first.replica_id, {}, taken_at=0.0)  # asked before the request finished: still held
    assert r.choose("x").reason is RouteReason.RESIDENT
    r.report(first.replica_id, {"x": "disk"}, taken_at=r.now())  # asked after: evicted
    assert r.choose("x").reason is RouteReason.LEAST_LOADED


def test_a_full_holder_sends_the_request_to_the_least_loaded() -> None:
    r = router(slots=1)
    r.report("r0", {"a": "gpu"}, taken_at=0.0)
    r.started("r0", "a")
    route = r.choose("a")
    assert (route.replica_id, route.reason) == ("r1", RouteReason.LEAST_LOADED)


def test_new_adapters_fill_free_tiers_before_evicting() -> None:
    r = router(adapters=2)
    r.report("r0", {"a": "gpu", "b": "cpu"}, taken_at=0.0)
    r.started("r1", None)  # r1 busier, but r0's tiers are full
    assert r.choose("c").replica_id == "r1"


@pytest.mark.parametrize("adapter", [None, "a"])
def test_down_replicas_are_skipped_and_none_left_is_an_error(adapter: str | None) -> None:
    r = router()
    r.report("r0", {"a": "gpu"}, taken_at=0.0)
    r.mark_down("r0")
    assert r.choose(adapter).replica_id == "r1"
    with pytest.raises(NoReplicaError):
        r.choose(adapter, exclude=["r1"])
    r.mark_up("r0")
    assert r.choose(adapter, exclude=["r1"]).replica_id == "r0"


def test_round_robin_rotates_whatever_is_resident() -> None:
    r = router(RoutingPolicy.ROUND_ROBIN)
    r.report("r0", {"a": "gpu"}, taken_at=0.0)
    assert [r.choose("a").replica_id for _ in range(4)] == ["r0", "r1", "r0", "r1"]


def test_a_router_needs_replicas() -> None:
    with pytest.raises(ValueError, match="at least one"):
        AffinityRouter([], slots_per_replica=1, adapters_per_replica=1)


def test_merged_exposition_labels_each_replica_and_types_each_family_once() -> None:
    replica = Metrics(CollectorRegistry())
    replica.prompt_tokens_total.labels(model_name="base", engine="0").inc(3)
    replica.num_requests_running.labels(model_name="base", engine="0").set(2)
    own = IngressMetrics()
    own.routed_total.labels(replica="replica-0", reason="resident").inc()
    text = generate_latest(replica.registry).decode()
    merged = merge_expositions(generate_latest(own.registry), {"replica-1": text, "replica-0": text}).decode()
    types = [line for line in merged.splitlines() if line.startswith("# TYPE")]
    assert len(types) == len(set(types))
    families = {f.name: f for f in text_string_to_metric_families(merged)}
    running = families["vllm:num_requests_running"].samples
    assert sorted(s.labels["replica"] for s in running) == ["replica-0", "replica-1"]
    assert {s.value for s in running} == {2.0}
    totals = [s for s in families["vllm:prompt_tokens"].samples if s.name.endswith("_total")]
    assert [s.value for s in totals] == [3.0, 3.0]
    routed = [s for s in families["loraserve_ingress_routed"].samples if s.name.endswith("_total")]
    assert routed[0].labels == {"replica": "replica-0", "reason": "resident"}
