"""server.metrics without a server: vLLM's bucket rule, request phases from timestamps, the scheduler gauges
(waiting reasons, lora_requests_info), rejections, and adapter residency with pinning and rank."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from server.metrics import ENGINE, CacheConfig, FinishedRequest, Metrics, SchedulerState, buckets_1_2_5

BASE = "base"


@pytest.fixture
def metrics() -> Metrics:
    m = Metrics(CollectorRegistry(), max_model_len=256)
    m.seed(BASE)
    return m


def value(m: Metrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def state(
    running: int = 0,
    waiting: int = 0,
    deferred: int = 0,
    run: frozenset[str] = frozenset(),
    wait: frozenset[str] = frozenset(),
) -> SchedulerState:
    return SchedulerState(running, waiting, deferred, running / 4, 2, run, wait)


@pytest.mark.parametrize(
    ("max_value", "expected"),
    [
        (0, ()),
        (1, (1,)),
        (4, (1, 2)),
        (5, (1, 2, 5)),
        (256, (1, 2, 5, 10, 20, 50, 100, 200)),
        (2048, (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)),
    ],
)
def test_token_buckets_follow_vllms_1_2_5_rule(max_value: int, expected: tuple[int, ...]) -> None:
    assert buckets_1_2_5(max_value) == expected


def test_seed_creates_idle_engine_series_and_awake_state(metrics: Metrics) -> None:
    base = {"model_name": BASE, "engine": ENGINE}
    assert value(metrics, "vllm:engine_sleep_state", **base, sleep_state="awake") == 1
    assert value(metrics, "vllm:engine_sleep_state", **base, sleep_state="weights_offloaded") == 0
    assert value(metrics, "vllm:engine_sleep_state", **base, sleep_state="discard_all") == 0
    for name in (
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:num_preemptions_total",
    ):
        assert value(metrics, name, **base) == 0
    for source in ("device", "host", "p2p", "disk", "external_unspecified"):
        assert value(metrics, "vllm:prompt_tokens_cached_by_source_total", **base, source=source) == 0
    assert (
        value(metrics, "vllm:admission_rejections_total", model_name=BASE, reason="max_num_queued_reqs") == 0
    )


def test_finished_request_phases_come_from_its_timestamps(metrics: Metrics) -> None:
    metrics.on_finished(
        FinishedRequest(
            model_name="a",
            finished_reason="length",
            arrival=10.0,
            scheduled=10.5,
            first_token=11.0,
            last_token=14.0,
            finished=14.25,
            prompt_tokens=7,
            generation_tokens=4,
            max_tokens=4,
            prefill_computed_tokens=7,
        )
    )
    a = {"model_name": "a", "engine": ENGINE}
    expected = {
        "vllm:e2e_request_latency_seconds_sum": 4.25,
        "vllm:request_queue_time_seconds_sum": 0.5,
        "vllm:request_prefill_time_seconds_sum": 0.5,
        "vllm:request_decode_time_seconds_sum": 3.0,
        "vllm:request_inference_time_seconds_sum": 3.5,
        "vllm:request_time_per_output_token_seconds_sum": 1.0,  # 3 s over the 3 tokens after the first
        "vllm:request_prompt_tokens_sum": 7,
        "vllm:request_generation_tokens_sum": 4,
        "vllm:request_max_num_generation_tokens_sum": 4,
        "vllm:request_params_n_sum": 1,
        "vllm:request_params_max_tokens_sum": 4,
        "vllm:request_prefill_kv_computed_tokens_sum": 7,
        "vllm:request_num_preemptions_sum": 0,
        "vllm:request_num_preemptions_count": 1,
    }
    for name, want in expected.items():
        assert value(metrics, name, **a) == pytest.approx(want), name
    assert value(metrics, "vllm:request_success_total", **a, finished_reason="length") == 1
    assert value(metrics, "vllm:request_time_per_output_token_seconds_bucket", **a, le="1.0") == 1
    assert value(metrics, "vllm:request_time_per_output_token_seconds_bucket", **a, le="0.75") == 0


def test_a_request_that_never_ran_records_no_phase_times(metrics: Metrics) -> None:
    metrics.on_finished(
        FinishedRequest("a", "abort", 1.0, None, None, None, 3.0, 5, 0, 16, prefill_computed_tokens=0)
    )
    a = {"model_name": "a", "engine": ENGINE}
    assert value(metrics, "vllm:e2e_request_latency_seconds_count", **a) == 1
    for phase in ("queue", "prefill", "decode", "inference"):
        assert value(metrics, f"vllm:request_{phase}_time_seconds_count", **a) in (None, 0), phase
    assert value(metrics, "vllm:request_prefill_kv_computed_tokens_count", **a) in (None, 0)


def test_a_single_token_request_has_no_time_per_output_token(metrics: Metrics) -> None:
    metrics.on_finished(FinishedRequest("a", "stop", 0.0, 0.1, 0.2, 0.2, 0.2, 3, 1, 8, 3))
    a = {"model_name": "a", "engine": ENGINE}
    assert value(metrics, "vllm:request_decode_time_seconds_count", **a) == 1
    assert value(metrics, "vllm:request_time_per_output_token_seconds_count", **a) in (None, 0)


def test_tokens_count_as_prefilled_and_sampled(metrics: Metrics) -> None:
    metrics.on_first_token("a", 0.2, prompt_tokens=9, computed=9)
    metrics.on_next_token("a", 0.01)
    metrics.on_next_token("a", 0.02)
    metrics.on_step(BASE, 9 + 1)
    a = {"model_name": "a", "engine": ENGINE}
    assert value(metrics, "vllm:prompt_tokens_total", **a) == 9
    assert value(metrics, "vllm:prompt_tokens_by_source_total", **a, source="local_compute") == 9
    assert value(metrics, "vllm:prompt_tokens_by_source_total", **a, source="local_cache_hit") is None
    assert value(metrics, "vllm:generation_tokens_total", **a) == 3
    assert value(metrics, "vllm:inter_token_latency_seconds_count", **a) == 2
    assert value(metrics, "vllm:time_to_first_token_seconds_count", **a) == 1
    assert value(metrics, "vllm:iteration_tokens_total_sum", model_name=BASE, engine=ENGINE) == 10


def test_queue_full_is_an_admission_rejection_and_other_refusals_are_not(metrics: Metrics) -> None:
    metrics.on_rejected("queue_full", BASE)
    metrics.on_rejected("context_length_exceeded", BASE)
    assert (
        value(metrics, "vllm:admission_rejections_total", model_name=BASE, reason="max_num_queued_reqs") == 1
    )
    assert value(metrics, "loraserve_requests_rejected_total", reason="queue_full") == 1
    assert value(metrics, "loraserve_requests_rejected_total", reason="context_length_exceeded") == 1


def test_waiting_reasons_sum_to_waiting(metrics: Metrics) -> None:
    metrics.set_scheduler_state(BASE, state(running=4, waiting=5, deferred=2), now=100.0)
    base = {"model_name": BASE, "engine": ENGINE}
    assert value(metrics, "vllm:num_requests_waiting", **base) == 5
    assert value(metrics, "vllm:num_requests_waiting_by_reason", **base, reason="capacity") == 3
    assert value(metrics, "vllm:num_requests_waiting_by_reason", **base, reason="deferred") == 2
    assert value(metrics, "vllm:kv_cache_usage_perc", **base) == 1.0


def test_lora_requests_info_keeps_distinct_sets_and_stamps_only_changes(metrics: Metrics) -> None:
    metrics.set_scheduler_state(
        BASE, state(1, 2, run=frozenset({"b", "a"}), wait=frozenset({"c"})), now=100.0
    )
    info = {"max_lora": "2", "running_lora_adapters": "a,b", "waiting_lora_adapters": "c"}
    assert value(metrics, "vllm:lora_requests_info", **info) == 100.0
    metrics.set_scheduler_state(
        BASE, state(1, 2, run=frozenset({"a", "b"}), wait=frozenset({"c"})), now=200.0
    )
    assert value(metrics, "vllm:lora_requests_info", **info) == 100.0  # nothing changed: same stamp
    metrics.set_scheduler_state(BASE, state(), now=300.0)
    assert value(metrics, "vllm:lora_requests_info", **info) is None  # one series at a time
    idle = {"max_lora": "2", "running_lora_adapters": "", "waiting_lora_adapters": ""}
    assert value(metrics, "vllm:lora_requests_info", **idle) == 300.0


def test_lora_adapter_loaded_follows_residency_pinning_and_rank(metrics: Metrics) -> None:
    ranks = {"a": 8, "b": 16}
    metrics.set_rank_lookup(ranks.get)
    metrics.on_adapter_resident("a", "cpu", True)
    metrics.on_adapter_resident("a", "gpu", True)
    metrics.on_adapter_resident("b", "cpu", True)

    def loaded() -> dict[tuple[str, str, str, str], float]:
        family = next(f for f in metrics.registry.collect() if f.name == "vllm:lora_adapter_loaded")
        return {
            (s.labels["adapter_name"], s.labels["level"], s.labels["pinned"], s.labels["rank"]): s.value
            for s in family.samples
        }

    assert loaded() == {
        ("a", "cpu", "false", "8"): 1,
        ("a", "gpu", "false", "8"): 1,
        ("b", "cpu", "false", "16"): 1,
    }
    metrics.set_scheduler_state(BASE, state(1, 0, run=frozenset({"a"})), now=1.0)
    assert loaded() == {
        ("a", "cpu", "true", "8"): 1,
        ("a", "gpu", "true", "8"): 1,
        ("b", "cpu", "false", "16"): 1,
    }
    metrics.on_adapter_resident("a", "gpu", False)
    metrics.set_scheduler_state(BASE, state(), now=2.0)
    metrics.on_adapter_resident("b", "cpu", False)
    assert loaded() == {("a", "cpu", "false", "8"): 1}


def test_cache_config_info_reports_the_slot_geometry(metrics: Metrics) -> None:
    metrics.set_cache_config(
        CacheConfig(block_size=256, num_blocks=4, cache_dtype="bfloat16", kv_cache_memory_bytes=4096)
    )
    family = next(f for f in metrics.registry.collect() if f.name == "vllm:cache_config_info")
    (sample,) = family.samples
    assert sample.value == 1
    assert sample.labels["block_size"] == "256"
    assert sample.labels["num_gpu_blocks"] == "4"
    assert sample.labels["kv_cache_size_tokens"] == "1024"
    assert sample.labels["engine"] == ENGINE
    assert sample.labels["enable_prefix_caching"] == "False"
    assert "model_name" not in sample.labels  # as vLLM: cache_config_info carries engine, not model_name
