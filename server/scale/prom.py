"""One Prometheus exposition out of several: the ingress's own metrics plus every replica's, each replica's
samples labelled ``replica="<id>"``. Families are merged by name, so each ``# HELP``/``# TYPE`` appears
once (Prometheus refuses a repeated ``# TYPE``)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

REPLICA_LABEL = "replica"


class _Families(Collector):
    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def merge_expositions(own: bytes, replicas: Mapping[str, str]) -> bytes:
    """``own`` (text exposition, unlabelled) followed by each replica's samples with ``replica=<id>``."""
    merged: dict[str, Metric] = {}

    def add(text: str, replica_id: str | None) -> None:
        for family in text_string_to_metric_families(text):
            target = merged.get(family.name)
            if target is None:
                target = merged[family.name] = Metric(family.name, family.documentation, family.type)
            for s in family.samples:
                labels = dict(s.labels)
                if replica_id is not None:
                    labels[REPLICA_LABEL] = replica_id
                target.samples.append(Sample(s.name, labels, s.value, s.timestamp, s.exemplar))

    add(own.decode(), None)
    for replica_id in sorted(replicas):
        add(replicas[replica_id], replica_id)
    # the text parser reads a counter's or histogram's ``_created`` line as a gauge family of its own;
    # re-exposing the parent family writes those samples again, so drop the stray family
    families = [
        f
        for name, f in merged.items()
        if not (name.endswith("_created") and name[: -len("_created")] in merged)
    ]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return generate_latest(registry)
