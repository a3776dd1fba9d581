"""Every Prometheus metric of the server, defined once on a registry passed in (no globals).

Names are part of the contract (DESIGN section 5): the ``vllm:*`` ones keep existing dashboards and the
Kubernetes inference gateway working; ``loraserve_*`` are our own. Per-adapter label values are bounded:
``AdapterLabels`` keeps the most requested adapters and folds the rest into ``other``.
"""

from __future__ import annotations

import contextlib
import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
LOAD_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class AdapterLabels:
    """Maps an adapter name to a bounded label value: the first ``limit`` adapters ever seen keep their
    name; later ones become ``other``. Base requests are labelled with the base model id."""

    def __init__(self, limit: int = 32) -> None:
        self._limit = limit
        self._named: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, name: str) -> str:
        with self._lock:
            if name in self._named:
                return name
            if len(self._named) < self._limit:
                self._named.add(name)
                return name
            return "other"


class Metrics:
    """All metrics, on ``registry``. Attribute names follow the metric names."""

    def __init__(self, registry: CollectorRegistry, *, adapter_label_limit: int = 32) -> None:
        self.registry = registry
        self.adapter_label = AdapterLabels(adapter_label_limit)
        m = ["model_name"]

        # ---- vLLM-compatible
        self.num_requests_running = Gauge(
            "vllm:num_requests_running", "Requests in the running batch", m, registry=registry
        )
        self.num_requests_waiting = Gauge(
            "vllm:num_requests_waiting", "Requests waiting to be scheduled", m, registry=registry
        )
        self.kv_cache_usage_perc = Gauge(
            "vllm:kv_cache_usage_perc", "Fraction of KV slots in use (1 = full)", m, registry=registry
        )
        self.lora_requests_info = Gauge(
            "vllm:lora_requests_info",
            "Running and waiting LoRA adapters (labels carry the lists; value = update time)",
            ["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
            registry=registry,
        )
        self.time_to_first_token_seconds = Histogram(
            "vllm:time_to_first_token_seconds",
            "Time to first token",
            m,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.inter_token_latency_seconds = Histogram(
            "vllm:inter_token_latency_seconds",
            "Time between output tokens",
            m,
            buckets=ITL_BUCKETS,
            registry=registry,
        )
        self.e2e_request_latency_seconds = Histogram(
            "vllm:e2e_request_latency_seconds",
            "End-to-end request latency",
            m,
            buckets=E2E_BUCKETS,
            registry=registry,
        )
        self.request_queue_time_seconds = Histogram(
            "vllm:request_queue_time_seconds",
            "Time from arrival to first schedule",
            m,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens_total = Counter(
            "vllm:prompt_tokens", "Prompt tokens processed", m, registry=registry
        )
        self.generation_tokens_total = Counter(
            "vllm:generation_tokens", "Output tokens generated", m, registry=registry
        )
        self.request_success_total = Counter(
            "vllm:request_success",
            "Finished requests by finish reason",
            ["model_name", "finished_reason"],
            registry=registry,
        )

        # ---- our own
        self.adapter_resident = Gauge(
            "loraserve_adapter_resident",
            "1 when the adapter is resident in the tier",
            ["adapter", "tier"],
            registry=registry,
        )
        self.adapter_loads_total = Counter(
            "loraserve_adapter_loads", "Adapter loads into a tier", ["tier"], registry=registry
        )
        self.adapter_evictions_total = Counter(
            "loraserve_adapter_evictions", "Adapter evictions from a tier", ["tier"], registry=registry
        )
        self.adapter_load_seconds = Histogram(
            "loraserve_adapter_load_seconds",
            "Time to load an adapter into a tier",
            ["tier"],
            buckets=LOAD_BUCKETS,
            registry=registry,
        )
        self.adapter_requests_total = Counter(
            "loraserve_adapter_requests", "Requests per adapter", ["adapter"], registry=registry
        )
        self.snapshot_active = Gauge(
            "loraserve_snapshot_active",
            "1 while a merged snapshot serves the adapter",
            ["adapter"],
            registry=registry,
        )
        self.requests_rejected_total = Counter(
            "loraserve_requests_rejected", "Requests refused before admission", ["reason"], registry=registry
        )
        self.requests_aborted_total = Counter(
            "loraserve_requests_aborted",
            "Requests aborted while queued or running",
            ["reason"],
            registry=registry,
        )

    # ---- the adapter store's observer protocol (adapter_store.store.StoreObserver)
    def on_adapter_load(self, tier: str, seconds: float) -> None:
        self.adapter_loads_total.labels(tier=tier).inc()
        self.adapter_load_seconds.labels(tier=tier).observe(seconds)

    def on_adapter_evict(self, tier: str) -> None:
        self.adapter_evictions_total.labels(tier=tier).inc()

    def on_adapter_resident(self, adapter: str, tier: str, resident: bool) -> None:
        # not folded into "other": a series exists only while the adapter sits in the GPU or CPU tier, so
        # the count is bounded by --max-gpu-adapters + --max-cpu-adapters
        if resident:
            self.adapter_resident.labels(adapter=adapter, tier=tier).set(1)
        else:
            with contextlib.suppress(KeyError):
                self.adapter_resident.remove(adapter, tier)

    def on_snapshot_active(self, adapter: str, active: bool) -> None:
        self.snapshot_active.labels(adapter=self.adapter_label(adapter)).set(1 if active else 0)


class IngressMetrics:
    """The ``loraserve serve-ray`` ingress's own metrics (its ``/metrics`` adds every replica's
    ``Metrics``, labelled ``replica``), on a registry of its own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.routed_total = Counter(
            "loraserve_ingress_routed",
            "Requests forwarded to a replica, by why it was chosen (resident, least_loaded, round_robin)",
            ["replica", "reason"],
            registry=self.registry,
        )
        self.retries_total = Counter(
            "loraserve_ingress_retries",
            "Requests retried on another replica after this one failed",
            ["replica"],
            registry=self.registry,
        )
        self.replica_failures_total = Counter(
            "loraserve_ingress_replica_failures",
            "Calls to a replica that failed in transport (the replica died or was lost)",
            ["replica"],
            registry=self.registry,
        )
