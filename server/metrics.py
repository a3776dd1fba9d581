"""Every Prometheus metric of the server, defined once on a registry passed in (no globals).

Names are part of the contract (DESIGN section 5). The ``vllm:*`` families carry vLLM 0.32's names, types,
label names and bucket boundaries (its ``vllm/v1/metrics/loggers.py``), so its Grafana dashboards, the
inference gateway / llm-d router and autoscalers read them unchanged; where a vLLM feature does not exist
here yet (prefix cache, preemption, sleep mode) the family exists, stays at its idle value, and its help
text says so. ``loraserve_*`` are our own. Per-adapter label values are bounded: ``AdapterLabels`` keeps
the most requested adapters and folds the rest into ``other``.

The engine reports through a few calls (``on_first_token``, ``on_next_token``, ``on_step``,
``on_finished``, ``on_rejected``, ``set_scheduler_state``); the adapter store through its observer
protocol; start-up wiring through ``set_cache_config``, ``set_max_gpu_lora_adapters`` and
``set_rank_lookup``. The data they pass are the small dataclasses below, so this module imports nothing
of ours.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

ENGINE = "0"  # vLLM's ``engine`` label: the engine core's index; one engine per loraserve process

# ---- vLLM 0.32's bucket boundaries (loggers.py), so its dashboards' quantiles mean the same here
TTFT_BUCKETS: tuple[float, ...] = (
    *(0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75),
    *(1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0),
)
TOKEN_LATENCY_BUCKETS: tuple[float, ...] = (  # inter-token latency and time per output token
    *(0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75),
    *(1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0),
)
REQUEST_LATENCY_BUCKETS: tuple[float, ...] = (  # e2e, queue and phase times
    *(0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0),
    *(30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0),
)
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
PARAMS_N_BUCKETS = (1, 2, 5, 10, 20)
PREEMPTION_BUCKETS = (1, 2, 3, 4, 5, 10, 20)
# ---- ours
LOAD_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# ---- vLLM's label values
WAITING_REASONS = ("capacity", "deferred")
SLEEP_STATES = ("awake", "weights_offloaded", "discard_all")
PROMPT_TOKEN_SOURCES = ("local_compute", "local_cache_hit", "external_kv_transfer")
CACHE_HIT_SOURCES = ("device", "host", "p2p", "disk", "external_unspecified")
# our refusal code (EngineError.code) -> vLLM's admission-rejection reason: the cap on queued requests
ADMISSION_REASONS = {"queue_full": "max_num_queued_reqs"}
FINISHED_REASONS = ("stop", "length", "abort", "error")


def buckets_1_2_5(max_value: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to ``max_value``: vLLM's token-count buckets (``build_1_2_5_buckets``)."""
    out: list[int] = []
    scale = 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_value:
                return tuple(out)
            out.append(mantissa * scale)
        scale *= 10


# ----------------------------------------------------------------------------------- what is recorded


@dataclass(slots=True, frozen=True)
class SchedulerState:
    """The scheduler after one engine iteration. ``waiting_deferred`` of the ``waiting`` requests were
    passed over for a transient reason (adapter still loading, the step's adapter budget); the rest wait
    for a free slot, KV blocks or the step's token budget."""

    running: int
    waiting: int
    waiting_deferred: int
    kv_cache_usage: float
    max_lora: int
    running_adapters: frozenset[str]
    waiting_adapters: frozenset[str]


@dataclass(slots=True, frozen=True)
class FinishedRequest:
    """One request as it left the engine. Times are ``time.monotonic()`` seconds; ``scheduled`` is None
    for a request never admitted, ``first_token`` None for one that produced no token."""

    model_name: str
    finished_reason: str
    arrival: float
    scheduled: float | None
    first_token: float | None
    last_token: float | None
    finished: float
    prompt_tokens: int
    generation_tokens: int
    max_tokens: int
    prefill_computed_tokens: int  # prompt tokens whose KV this request's prefill computed
    n: int = 1
    num_preemptions: int = 0


@dataclass(slots=True, frozen=True)
class CacheConfig:
    """The KV memory's geometry as ``vllm:cache_config_info`` reports it: ``num_blocks`` paged blocks of
    ``block_size`` tokens each, so ``num_blocks * block_size`` is the KV capacity in tokens, as routers
    compute it."""

    LABELS: ClassVar[tuple[str, ...]] = (
        *("block_size", "cache_dtype", "enable_prefix_caching", "engine", "kv_cache_memory_bytes"),
        *("kv_cache_size_tokens", "num_cpu_blocks", "num_gpu_blocks"),
    )

    block_size: int
    num_blocks: int
    cache_dtype: str
    kv_cache_memory_bytes: int
    enable_prefix_caching: bool = False

    def labels(self) -> dict[str, str]:
        return {
            "block_size": str(self.block_size),
            "cache_dtype": self.cache_dtype,
            "enable_prefix_caching": str(self.enable_prefix_caching),
            "engine": ENGINE,
            "kv_cache_memory_bytes": str(self.kv_cache_memory_bytes),
            "kv_cache_size_tokens": str(self.block_size * self.num_blocks),
            "num_cpu_blocks": "None",
            "num_gpu_blocks": str(self.num_blocks),
        }


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


class LoraResidency:
    """``vllm:lora_adapter_loaded{adapter_name,level,pinned,rank}``: one series at 1 per adapter and tier
    holding it, kept from the store's residency events and the scheduler's running set (an adapter a
    running request uses is pinned: it cannot be evicted now). Series change only when residency,
    pinning or rank change, never at scrape time, so a scrape never waits on the store."""

    def __init__(self, gauge: Gauge) -> None:
        self._gauge = gauge
        self._tiers: dict[str, set[str]] = {}
        self._ranks: dict[str, str] = {}
        self._pinned: frozenset[str] = frozenset()
        self._series: set[tuple[str, str, str, str]] = set()
        self._rank_of: Callable[[str], int | None] = lambda _: None
        self._lock = threading.Lock()

    def set_rank_lookup(self, rank_of: Callable[[str], int | None]) -> None:
        with self._lock:
            self._rank_of = rank_of

    def resident(self, adapter: str, tier: str, resident: bool) -> None:
        with self._lock:
            tiers = self._tiers.setdefault(adapter, set())
            if resident:
                tiers.add(tier)
                rank = self._rank_of(adapter)
                if rank is not None:
                    self._ranks[adapter] = str(rank)
            else:
                tiers.discard(tier)
                if not tiers:
                    del self._tiers[adapter]
                    self._ranks.pop(adapter, None)
            self._apply()

    def pinned(self, adapters: frozenset[str]) -> None:
        with self._lock:
            if adapters != self._pinned:
                self._pinned = adapters
                self._apply()

    def _apply(self) -> None:
        wanted = {
            (name, tier, "true" if name in self._pinned else "false", self._ranks.get(name, "0"))
            for name, tiers in self._tiers.items()
            for tier in tiers
        }
        for labels in self._series - wanted:
            with contextlib.suppress(KeyError):
                self._gauge.remove(*labels)
        for labels in wanted - self._series:
            self._gauge.labels(*labels).set(1)
        self._series = wanted


# ----------------------------------------------------------------------------------------- the metrics


class Metrics:
    """All metrics, on ``registry``. Attribute names follow the metric names. ``max_model_len`` sizes the
    token-count histograms' buckets as vLLM does (1-2-5 steps up to the context length)."""

    def __init__(
        self, registry: CollectorRegistry, *, max_model_len: int = 2048, adapter_label_limit: int = 32
    ) -> None:
        self.registry = registry
        self.adapter_label = AdapterLabels(adapter_label_limit)
        m = ["model_name", "engine"]
        tokens = buckets_1_2_5(max_model_len)

        def gauge(name: str, doc: str, labels: list[str]) -> Gauge:
            return Gauge(name, doc, labels, registry=registry)

        def counter(name: str, doc: str, labels: list[str]) -> Counter:
            return Counter(name, doc, labels, registry=registry)

        def histogram(name: str, doc: str, labels: list[str], buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=registry)

        # ---- vLLM: scheduler state (model_name is the base model id)
        self.num_requests_running = gauge(
            "vllm:num_requests_running", "Number of requests in model execution batches.", m
        )
        self.num_requests_waiting = gauge(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed.", m
        )
        self.num_requests_waiting_by_reason = gauge(
            "vllm:num_requests_waiting_by_reason",
            "Number of waiting requests by reason: capacity = waiting for a free slot, KV blocks or the step's token "
            "budget; deferred = passed over for a transient constraint (its adapter still loading, the "
            "step's --max-loras-per-batch budget). Sums to vllm:num_requests_waiting.",
            [*m, "reason"],
        )
        self.engine_sleep_state = gauge(
            "vllm:engine_sleep_state",
            "Engine sleep state: awake = 1 while the engine is awake. loraserve has no sleep mode, so it "
            "is always awake (weights_offloaded and discard_all stay 0).",
            [*m, "sleep_state"],
        )
        self.kv_cache_usage_perc = gauge(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage: the fraction of KV blocks held by running requests "
            "(free blocks still holding a cached prefix count as free).",
            m,
        )
        self.cache_config_info = gauge(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig (value 1): the paged KV memory's block_size in tokens, "
            "num_gpu_blocks, kv_cache_size_tokens = their product, whether prefix caching is on; no CPU "
            "blocks.",
            [*CacheConfig.LABELS],
        )
        self.lora_requests_info = Gauge(
            "vllm:lora_requests_info",
            "Running stats on lora requests: adapters of running and of waiting requests, as distinct "
            "comma-separated sets, max_lora = --max-loras-per-batch; value = when they last changed.",
            ["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
            registry=registry,
        )
        self.lora_adapter_loaded = gauge(
            "vllm:lora_adapter_loaded",
            "1 per adapter and tier holding it (level = gpu: the model's adapter tier, on the device the "
            "model runs on; cpu: host memory); pinned = a running request uses it; rank = its LoRA rank.",
            ["adapter_name", "level", "pinned", "rank"],
        )
        self.max_gpu_lora_adapters = gauge(
            "vllm:max_gpu_lora_adapters", "Adapters the gpu tier holds at most (--max-gpu-adapters).", m
        )

        # ---- vLLM: engine counters (prefix cache, preemption: engine v2, issue 13)
        self.prefix_cache_queries_total = counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens (prompt tokens looked up at "
            "admission).",
            m,
        )
        self.prefix_cache_hits_total = counter(
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            m,
        )
        self.num_preemptions_total = counter(
            "vllm:num_preemptions",
            "Cumulative number of preemption from the engine (a running request's KV blocks were freed for "
            "others; it recomputes them when readmitted).",
            m,
        )
        self.admission_rejections_total = counter(
            "vllm:admission_rejections",
            "Requests refused at admission, by the limit that refused them: max_num_queued_reqs = "
            "--max-queue requests were already waiting (HTTP 429).",
            ["model_name", "reason"],
        )

        # ---- vLLM: token counters (model_name is the request's adapter id, the base id for base requests)
        self.prompt_tokens_total = counter("vllm:prompt_tokens", "Number of prefill tokens processed.", m)
        self.prompt_tokens_by_source_total = counter(
            "vllm:prompt_tokens_by_source",
            "Number of prompt tokens by source: local_compute = prefilled here; local_cache_hit = from the "
            "prefix cache; external_kv_transfer stays 0 (no KV connector).",
            [*m, "source"],
        )
        self.prompt_tokens_cached_total = counter(
            "vllm:prompt_tokens_cached",
            "Number of cached prompt tokens (local + external).",
            m,
        )
        self.prompt_tokens_cached_by_source_total = counter(
            "vllm:prompt_tokens_cached_by_source",
            "Number of cached prompt tokens by the tier their KV came from (device: the paged KV memory).",
            [*m, "source"],
        )
        self.generation_tokens_total = counter(
            "vllm:generation_tokens", "Number of generation tokens processed.", m
        )
        self.request_success_total = counter(
            "vllm:request_success",
            "Count of successfully processed requests, by finish reason.",
            [*m, "finished_reason"],
        )

        # ---- vLLM: histograms of counts
        self.iteration_tokens_total = histogram(
            "vllm:iteration_tokens_total",
            "Histogram of number of tokens per engine_step (prompt tokens prefilled plus tokens sampled).",
            m,
            ITERATION_TOKENS_BUCKETS,
        )
        self.request_prompt_tokens = histogram(
            "vllm:request_prompt_tokens", "Number of prefill tokens processed.", m, tokens
        )
        self.request_generation_tokens = histogram(
            "vllm:request_generation_tokens", "Number of generation tokens processed.", m, tokens
        )
        self.request_max_num_generation_tokens = histogram(
            "vllm:request_max_num_generation_tokens",
            "Histogram of maximum number of requested generation tokens (the most any of a request's n "
            "completions generated; n is 1 here).",
            m,
            tokens,
        )
        self.request_params_n = histogram(
            "vllm:request_params_n", "Histogram of the n request parameter.", m, PARAMS_N_BUCKETS
        )
        self.request_params_max_tokens = histogram(
            "vllm:request_params_max_tokens", "Histogram of the max_tokens request parameter.", m, tokens
        )
        self.request_prefill_kv_computed_tokens = histogram(
            "vllm:request_prefill_kv_computed_tokens",
            "Histogram of new KV tokens computed during prefill (excluding cached tokens).",
            m,
            tokens,
        )
        self.request_num_preemptions = histogram(
            "vllm:request_num_preemptions",
            "Histogram of preemptions per finished request. Every request observes 0: no preemption yet.",
            m,
            PREEMPTION_BUCKETS,
        )

        # ---- vLLM: histograms of times
        self.time_to_first_token_seconds = histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            m,
            TTFT_BUCKETS,
        )
        self.inter_token_latency_seconds = histogram(
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            m,
            TOKEN_LATENCY_BUCKETS,
        )
        self.request_time_per_output_token_seconds = histogram(
            "vllm:request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request (decode time over tokens after the "
            "first).",
            m,
            TOKEN_LATENCY_BUCKETS,
        )
        self.e2e_request_latency_seconds = histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            m,
            REQUEST_LATENCY_BUCKETS,
        )
        self.request_queue_time_seconds = histogram(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request (arrival to its admission).",
            m,
            REQUEST_LATENCY_BUCKETS,
        )
        self.request_inference_time_seconds = histogram(
            "vllm:request_inference_time_seconds",
            "Histogram of time spent in RUNNING phase for request (admission to last token).",
            m,
            REQUEST_LATENCY_BUCKETS,
        )
        self.request_prefill_time_seconds = histogram(
            "vllm:request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request (admission to first token).",
            m,
            REQUEST_LATENCY_BUCKETS,
        )
        self.request_decode_time_seconds = histogram(
            "vllm:request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request (first token to last token).",
            m,
            REQUEST_LATENCY_BUCKETS,
        )

        # ---- our own
        self.adapter_resident = gauge(
            "loraserve_adapter_resident", "1 when the adapter is resident in the tier", ["adapter", "tier"]
        )
        self.adapter_loads_total = counter("loraserve_adapter_loads", "Adapter loads into a tier", ["tier"])
        self.adapter_evictions_total = counter(
            "loraserve_adapter_evictions", "Adapter evictions from a tier", ["tier"]
        )
        self.adapter_load_seconds = histogram(
            "loraserve_adapter_load_seconds", "Time to load an adapter into a tier", ["tier"], LOAD_BUCKETS
        )
        self.adapter_requests_total = counter(
            "loraserve_adapter_requests", "Requests per adapter", ["adapter"]
        )
        self.snapshot_active = gauge(
            "loraserve_snapshot_active", "1 while a merged snapshot serves the adapter", ["adapter"]
        )
        self.requests_rejected_total = counter(
            "loraserve_requests_rejected", "Requests refused before admission", ["reason"]
        )
        self.requests_aborted_total = counter(
            "loraserve_requests_aborted", "Requests aborted while queued or running", ["reason"]
        )

        self._lora = LoraResidency(self.lora_adapter_loaded)
        self._last_lora_info: tuple[str, str, str] | None = None

    # ------------------------------------------------------------------------------ start-up wiring

    def seed(self, model_name: str) -> None:
        """Create the engine-wide series of ``model_name`` (the base model id) at their idle values, so
        dashboards and rate() see them before the first event; sleep state: awake."""
        for reason in WAITING_REASONS:
            self.num_requests_waiting_by_reason.labels(model_name, ENGINE, reason).set(0)
        for state in SLEEP_STATES:
            self.engine_sleep_state.labels(model_name, ENGINE, state).set(1 if state == "awake" else 0)
        for series in (
            self.num_requests_running,
            self.num_requests_waiting,
            self.kv_cache_usage_perc,
            self.prefix_cache_queries_total,
            self.prefix_cache_hits_total,
            self.num_preemptions_total,
            self.prompt_tokens_total,
            self.prompt_tokens_cached_total,
            self.generation_tokens_total,
        ):
            series.labels(model_name, ENGINE)
        for source in PROMPT_TOKEN_SOURCES:
            self.prompt_tokens_by_source_total.labels(model_name, ENGINE, source)
        for source in CACHE_HIT_SOURCES:
            self.prompt_tokens_cached_by_source_total.labels(model_name, ENGINE, source)
        for reason in ADMISSION_REASONS.values():
            self.admission_rejections_total.labels(model_name, reason)
        for finished in FINISHED_REASONS:
            self.request_success_total.labels(model_name, ENGINE, finished)

    def set_cache_config(self, config: CacheConfig) -> None:
        self.cache_config_info.clear()
        self.cache_config_info.labels(**config.labels()).set(1)

    def set_max_gpu_lora_adapters(self, model_name: str, count: int) -> None:
        self.max_gpu_lora_adapters.labels(model_name, ENGINE).set(count)

    def set_rank_lookup(self, rank_of: Callable[[str], int | None]) -> None:
        """Where ``vllm:lora_adapter_loaded`` finds an adapter's rank (the registry; any thread)."""
        self._lora.set_rank_lookup(rank_of)

    # ------------------------------------------------------------------------- the engine's reports

    def on_first_token(self, model_name: str, ttft_s: float, prompt_tokens: int, computed: int) -> None:
        """A request's prefill produced its first token: ``computed`` of its ``prompt_tokens`` were
        prefilled, the rest came from a cache."""
        self.time_to_first_token_seconds.labels(model_name, ENGINE).observe(ttft_s)
        self.prompt_tokens_total.labels(model_name, ENGINE).inc(prompt_tokens)
        self.prompt_tokens_by_source_total.labels(model_name, ENGINE, "local_compute").inc(computed)
        cached = prompt_tokens - computed
        if cached:
            self.prompt_tokens_by_source_total.labels(model_name, ENGINE, "local_cache_hit").inc(cached)
            self.prompt_tokens_cached_total.labels(model_name, ENGINE).inc(cached)
            self.prompt_tokens_cached_by_source_total.labels(model_name, ENGINE, "device").inc(cached)
        self.generation_tokens_total.labels(model_name, ENGINE).inc()

    def on_next_token(self, model_name: str, itl_s: float) -> None:
        self.inter_token_latency_seconds.labels(model_name, ENGINE).observe(itl_s)
        self.generation_tokens_total.labels(model_name, ENGINE).inc()

    def on_engine_counters(self, model_name: str, queries: int, hits: int, preemptions: int) -> None:
        """Prefix-cache tokens queried and hit, and preemptions, since the last report."""
        labels = (model_name, ENGINE)
        if queries:
            self.prefix_cache_queries_total.labels(*labels).inc(queries)
        if hits:
            self.prefix_cache_hits_total.labels(*labels).inc(hits)
        if preemptions:
            self.num_preemptions_total.labels(*labels).inc(preemptions)

    def on_step(self, model_name: str, num_tokens: int) -> None:
        """One engine step ran: ``num_tokens`` = prompt tokens prefilled plus tokens sampled."""
        self.iteration_tokens_total.labels(model_name, ENGINE).observe(num_tokens)

    def on_finished(self, request: FinishedRequest) -> None:
        """Request-level histograms, in vLLM's phases: queued (arrival -> admission), prefill (-> first
        token), decode (first -> last token), inference (admission -> last token)."""
        r, labels = request, (request.model_name, ENGINE)
        self.e2e_request_latency_seconds.labels(*labels).observe(r.finished - r.arrival)
        self.request_success_total.labels(*labels, r.finished_reason).inc()
        self.request_prompt_tokens.labels(*labels).observe(r.prompt_tokens)
        self.request_generation_tokens.labels(*labels).observe(r.generation_tokens)
        self.request_max_num_generation_tokens.labels(*labels).observe(r.generation_tokens)
        self.request_params_n.labels(*labels).observe(r.n)
        self.request_params_max_tokens.labels(*labels).observe(r.max_tokens)
        self.request_num_preemptions.labels(*labels).observe(r.num_preemptions)
        if r.scheduled is None:
            return
        self.request_queue_time_seconds.labels(*labels).observe(r.scheduled - r.arrival)
        if r.first_token is None or r.last_token is None:
            return
        self.request_prefill_kv_computed_tokens.labels(*labels).observe(r.prefill_computed_tokens)
        self.request_prefill_time_seconds.labels(*labels).observe(r.first_token - r.scheduled)
        self.request_inference_time_seconds.labels(*labels).observe(r.last_token - r.scheduled)
        decode = r.last_token - r.first_token
        self.request_decode_time_seconds.labels(*labels).observe(decode)
        if r.generation_tokens > 1:
            self.request_time_per_output_token_seconds.labels(*labels).observe(
                decode / (r.generation_tokens - 1)
            )

    def on_rejected(self, code: str, model_name: str) -> None:
        """The engine refused a request before admitting it (``code``: its ``EngineError.code``)."""
        self.requests_rejected_total.labels(reason=code).inc()
        reason = ADMISSION_REASONS.get(code)
        if reason is not None:
            self.admission_rejections_total.labels(model_name, reason).inc()

    def set_scheduler_state(self, model_name: str, state: SchedulerState, now: float) -> None:
        """After each engine iteration. ``now`` is wall-clock time (``time.time()``), the value of
        ``vllm:lora_requests_info`` when its adapter sets change."""
        labels = (model_name, ENGINE)
        self.num_requests_running.labels(*labels).set(state.running)
        self.num_requests_waiting.labels(*labels).set(state.waiting)
        deferred = state.waiting_deferred
        self.num_requests_waiting_by_reason.labels(*labels, "capacity").set(state.waiting - deferred)
        self.num_requests_waiting_by_reason.labels(*labels, "deferred").set(deferred)
        self.kv_cache_usage_perc.labels(*labels).set(state.kv_cache_usage)
        info = (
            str(state.max_lora),
            ",".join(sorted(state.running_adapters)),
            ",".join(sorted(state.waiting_adapters)),
        )
        if info != self._last_lora_info:
            self._last_lora_info = info
            self.lora_requests_info.clear()
            self.lora_requests_info.labels(*info).set(now)
        self._lora.pinned(state.running_adapters)

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
        self._lora.resident(adapter, tier, resident)

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
