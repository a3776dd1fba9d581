"""vLLM 0.32's metric families on the real server (demo bundle, CPU): after traffic, /metrics parsed with
prometheus_client's own parser holds every family issue 18 lists with vLLM's type, label names and bucket
boundaries (the tables below are vLLM's, from its vllm/v1/metrics/loggers.py), and each counter moved by
what happened: tokens as the API's usage reports them, one admission rejection per 429, request
histograms once per finished request. A second server holds one adapter per step, so a request for a
second adapter waits "deferred" while the first runs "pinned". The traffic server runs with
``--no-prefix-caching`` and one sequence at a time, so the prefix-cache and preemption families exist and
stay 0 there, and every prompt token is computed (tests/integration/test_prefix_cache.py counts hits)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.api_server import ServerProcess, sse_data, start_server

pytestmark = pytest.mark.slow

MAX_MODEL_LEN = 256
MAX_GPU_ADAPTERS = 2
ADAPTER = "pirate"
M = frozenset({"model_name", "engine"})

# vLLM's boundaries (loggers.py); token-count histograms use build_1_2_5_buckets(max_model_len)
TOKENS = (1, 2, 5, 10, 20, 50, 100, 200)
TTFT = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
)
TTFT += (80.0, 160.0, 640.0, 2560.0)
ITL = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
LATENCY = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0)
LATENCY += (480.0, 960.0, 1920.0, 7680.0)

# family (as the parser names it: counters without _total) -> (type, label names, buckets)
FAMILIES: dict[str, tuple[str, frozenset[str], tuple[float, ...] | None]] = {
    "vllm:num_requests_running": ("gauge", M, None),
    "vllm:num_requests_waiting": ("gauge", M, None),
    "vllm:num_requests_waiting_by_reason": ("gauge", M | {"reason"}, None),
    "vllm:engine_sleep_state": ("gauge", M | {"sleep_state"}, None),
    "vllm:kv_cache_usage_perc": ("gauge", M, None),
    "vllm:lora_requests_info": (
        "gauge",
        frozenset({"max_lora", "running_lora_adapters", "waiting_lora_adapters"}),
        None,
    ),
    "vllm:lora_adapter_loaded": ("gauge", frozenset({"adapter_name", "level", "pinned", "rank"}), None),
    "vllm:max_gpu_lora_adapters": ("gauge", M, None),
    "vllm:prefix_cache_queries": ("counter", M, None),
    "vllm:prefix_cache_hits": ("counter", M, None),
    "vllm:num_preemptions": ("counter", M, None),
    "vllm:admission_rejections": ("counter", frozenset({"model_name", "reason"}), None),
    "vllm:prompt_tokens": ("counter", M, None),
    "vllm:prompt_tokens_by_source": ("counter", M | {"source"}, None),
    "vllm:prompt_tokens_cached": ("counter", M, None),
    "vllm:prompt_tokens_cached_by_source": ("counter", M | {"source"}, None),
    "vllm:generation_tokens": ("counter", M, None),
    "vllm:request_success": ("counter", M | {"finished_reason"}, None),
    "vllm:iteration_tokens_total": (
        "histogram",
        M,
        (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384),
    ),
    "vllm:request_prompt_tokens": ("histogram", M, TOKENS),
    "vllm:request_generation_tokens": ("histogram", M, TOKENS),
    "vllm:request_max_num_generation_tokens": ("histogram", M, TOKENS),
    "vllm:request_params_n": ("histogram", M, (1, 2, 5, 10, 20)),
    "vllm:request_params_max_tokens": ("histogram", M, TOKENS),
    "vllm:request_prefill_kv_computed_tokens": ("histogram", M, TOKENS),
    "vllm:request_num_preemptions": ("histogram", M, (1, 2, 3, 4, 5, 10, 20)),
    "vllm:time_to_first_token_seconds": ("histogram", M, TTFT),
    "vllm:inter_token_latency_seconds": ("histogram", M, ITL),
    "vllm:request_time_per_output_token_seconds": ("histogram", M, ITL),
    "vllm:e2e_request_latency_seconds": ("histogram", M, LATENCY),
    "vllm:request_queue_time_seconds": ("histogram", M, LATENCY),
    "vllm:request_inference_time_seconds": ("histogram", M, LATENCY),
    "vllm:request_prefill_time_seconds": ("histogram", M, LATENCY),
    "vllm:request_decode_time_seconds": ("histogram", M, LATENCY),
}
# vLLM's cache_config_info carries the engine and the CacheConfig fields, not model_name
CACHE_CONFIG_LABELS = frozenset(
    {"engine", "block_size", "num_gpu_blocks", "cache_dtype", "enable_prefix_caching"}
)


@dataclass
class Family:
    type: str
    labels: frozenset[str]
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = field(default_factory=dict)

    def value(self, sample: str, **labels: str) -> float:
        """The sum over the series of ``sample`` whose labels include ``labels`` (0 when none)."""
        want = set(labels.items())
        return sum(v for (name, got), v in self.samples.items() if name == sample and want <= got)


def scrape(http: httpx.Client) -> dict[str, Family]:
    response = http.get("/metrics")
    assert response.status_code == 200
    families: dict[str, Family] = {}
    for metric in text_string_to_metric_families(response.text):
        labels = frozenset(k for s in metric.samples for k in s.labels if k != "le")
        family = families.setdefault(metric.name, Family(metric.type, labels))
        for s in metric.samples:
            family.samples[(s.name, frozenset(s.labels.items()))] = s.value
    return families


@dataclass
class Traffic:
    """What was sent and what the API answered, between two scrapes."""

    before: dict[str, Family]
    after: dict[str, Family]
    base_id: str
    started: float  # time.time() when the traffic began
    finished: dict[str, int] = field(default_factory=dict)  # model label -> requests answered 200
    prompt_tokens: dict[str, int] = field(default_factory=dict)  # from the responses' usage
    completion_tokens: dict[str, int] = field(default_factory=dict)
    max_tokens: dict[str, int] = field(default_factory=dict)
    rejected_429: int = 0
    rejected_400: int = 0

    def count(self, model: str, usage: dict[str, Any], max_tokens: int) -> None:
        self.finished[model] = self.finished.get(model, 0) + 1
        self.prompt_tokens[model] = self.prompt_tokens.get(model, 0) + usage["prompt_tokens"]
        self.completion_tokens[model] = self.completion_tokens.get(model, 0) + usage["completion_tokens"]
        self.max_tokens[model] = self.max_tokens.get(model, 0) + max_tokens

    def delta(self, family: str, sample: str, **labels: str) -> float:
        after = self.after[family].value(sample, **labels)
        before = self.before[family].value(sample, **labels) if family in self.before else 0.0
        return after - before


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = start_server(
        tmp_path_factory.mktemp("metrics"),
        [
            *("--max-num-seqs", "1", "--max-queue", "1", "--no-prefix-caching"),
            *("--max-model-len", str(MAX_MODEL_LEN), "--max-gpu-adapters", str(MAX_GPU_ADAPTERS)),
        ],
    )
    yield process
    assert process.terminate() == 0, process.log_tail()


@pytest.fixture(scope="module")
def traffic(server: ServerProcess, http: httpx.Client, base_id: str) -> Traffic:
    t = Traffic(before=scrape(http), after={}, base_id=base_id, started=time.time())
    plain = {"model": base_id, "prompt": "The cat is", "max_tokens": 5, "ignore_eos": True, "temperature": 0}
    response = http.post("/v1/completions", json=plain)
    assert response.status_code == 200, response.text
    t.count(base_id, response.json()["usage"], 5)

    chat = {
        "model": ADAPTER,
        "messages": [{"role": "user", "content": "Ahoy?"}],
        "max_tokens": 4,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with http.stream("POST", "/v1/chat/completions", json=chat) as streamed:
        assert streamed.status_code == 200
        chunks = [json.loads(d) for d in sse_data(streamed.iter_lines()) if d != "[DONE]"]
    t.count(ADAPTER, chunks[-1]["usage"], 4)

    # one KV slot and a queue of one: of eight at once, one runs, one waits, the rest are refused (429)
    burst = {"model": base_id, "prompt": [5, 6, 7], "max_tokens": 24, "ignore_eos": True, "temperature": 0}

    def post(_: int) -> httpx.Response:
        with server.http() as client:
            return client.post("/v1/completions", json=burst)

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(post, range(8)))
    for r in responses:
        assert r.status_code in (200, 429), r.text
        if r.status_code == 200:
            t.count(base_id, r.json()["usage"], 24)
    t.rejected_429 = sum(r.status_code == 429 for r in responses)
    assert t.rejected_429 >= 1

    # a prompt over the context is a 400 (vLLM's validation error), not an admission rejection
    too_long = {"model": base_id, "prompt": [5] * (MAX_MODEL_LEN + 1), "max_tokens": 1}
    assert http.post("/v1/completions", json=too_long).status_code == 400
    t.rejected_400 = 1
    t.after = scrape(http)
    return t


# --------------------------------------------------------------------------------------- the families


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_has_vllms_type_labels_and_buckets(traffic: Traffic, name: str) -> None:
    kind, labels, buckets = FAMILIES[name]
    family = traffic.after.get(name)
    assert family is not None, f"{name} is missing from /metrics"
    assert family.type == kind
    assert family.labels == labels
    if buckets is not None:
        bounds = sorted(
            {float(dict(got)["le"]) for (sample, got) in family.samples if sample.endswith("_bucket")}
        )
        assert bounds == [*map(float, buckets), float("inf")]


def test_cache_config_info_carries_the_paged_kv_geometry(traffic: Traffic) -> None:
    family = traffic.after["vllm:cache_config_info"]
    assert family.type == "gauge"
    assert family.labels >= CACHE_CONFIG_LABELS and "model_name" not in family.labels
    ((_, labels), value), *others = family.samples.items()
    assert not others and value == 1
    info = dict(labels)
    # paged blocks of 16 tokens; on the CPU the default budget is --max-num-seqs (1) whole contexts
    assert info["block_size"] == "16"
    assert info["num_gpu_blocks"] == str(MAX_MODEL_LEN // 16)
    assert info["kv_cache_size_tokens"] == str(MAX_MODEL_LEN)
    assert int(info["kv_cache_memory_bytes"]) > 0
    assert info["enable_prefix_caching"] == "False" and info["engine"] == "0"


def test_engine_is_awake_and_idle_after_traffic(traffic: Traffic, http: httpx.Client) -> None:
    sleep = traffic.after["vllm:engine_sleep_state"]
    assert sleep.value("vllm:engine_sleep_state", sleep_state="awake") == 1
    assert sleep.value("vllm:engine_sleep_state", sleep_state="weights_offloaded") == 0
    assert sleep.value("vllm:engine_sleep_state", sleep_state="discard_all") == 0
    now = scrape(http)
    waiting = now["vllm:num_requests_waiting"].value("vllm:num_requests_waiting", model_name=traffic.base_id)
    by_reason = now["vllm:num_requests_waiting_by_reason"]
    assert {r for (_, got) in by_reason.samples for k, r in got if k == "reason"} == {"capacity", "deferred"}
    assert by_reason.value("vllm:num_requests_waiting_by_reason", model_name=traffic.base_id) == waiting == 0


# ------------------------------------------------------------------------------- counters that move


def test_tokens_match_the_apis_usage(traffic: Traffic) -> None:
    for model in (traffic.base_id, ADAPTER):
        prompt, completion = traffic.prompt_tokens[model], traffic.completion_tokens[model]
        assert traffic.delta("vllm:prompt_tokens", "vllm:prompt_tokens_total", model_name=model) == prompt
        computed = traffic.delta(
            "vllm:prompt_tokens_by_source",
            "vllm:prompt_tokens_by_source_total",
            model_name=model,
            source="local_compute",
        )
        assert computed == prompt
        assert (
            traffic.delta("vllm:generation_tokens", "vllm:generation_tokens_total", model_name=model)
            == completion
        )
    # every step counts the prompt tokens it prefilled and the tokens it sampled; nothing else ran
    all_tokens = sum(traffic.prompt_tokens.values()) + sum(traffic.completion_tokens.values())
    assert traffic.delta("vllm:iteration_tokens_total", "vllm:iteration_tokens_total_sum") == all_tokens


def test_each_429_is_one_admission_rejection(traffic: Traffic) -> None:
    rejected = traffic.delta(
        "vllm:admission_rejections",
        "vllm:admission_rejections_total",
        model_name=traffic.base_id,
        reason="max_num_queued_reqs",
    )
    assert rejected == traffic.rejected_429  # the 400 for the long prompt is not one
    assert (
        traffic.delta("vllm:admission_rejections", "vllm:admission_rejections_total") == traffic.rejected_429
    )


@pytest.mark.parametrize(
    "histogram",
    [
        "vllm:e2e_request_latency_seconds",
        "vllm:request_queue_time_seconds",
        "vllm:request_prefill_time_seconds",
        "vllm:request_decode_time_seconds",
        "vllm:request_inference_time_seconds",
        "vllm:request_time_per_output_token_seconds",
        "vllm:time_to_first_token_seconds",
        "vllm:request_prompt_tokens",
        "vllm:request_generation_tokens",
        "vllm:request_max_num_generation_tokens",
        "vllm:request_params_n",
        "vllm:request_params_max_tokens",
        "vllm:request_prefill_kv_computed_tokens",
        "vllm:request_num_preemptions",
    ],
)
def test_request_histograms_observe_each_finished_request_once(traffic: Traffic, histogram: str) -> None:
    for model, finished in traffic.finished.items():
        assert traffic.delta(histogram, f"{histogram}_count", model_name=model) == finished, model


def test_request_histogram_sums_match_what_was_sent_and_answered(traffic: Traffic) -> None:
    for model, finished in traffic.finished.items():

        def total(name: str) -> float:
            return traffic.delta(name, f"{name}_sum", model_name=model)  # noqa: B023

        assert total("vllm:request_prompt_tokens") == traffic.prompt_tokens[model]
        assert total("vllm:request_prefill_kv_computed_tokens") == traffic.prompt_tokens[model]
        assert total("vllm:request_generation_tokens") == traffic.completion_tokens[model]
        assert total("vllm:request_max_num_generation_tokens") == traffic.completion_tokens[model]
        assert total("vllm:request_params_max_tokens") == traffic.max_tokens[model]
        assert total("vllm:request_params_n") == finished
        success = traffic.delta("vllm:request_success", "vllm:request_success_total", model_name=model)
        assert success == finished


# -------------------------------------------------------------- prefix cache off, one sequence at a time


@pytest.mark.parametrize(
    ("family", "sample"),
    [
        ("vllm:prefix_cache_queries", "vllm:prefix_cache_queries_total"),
        ("vllm:prefix_cache_hits", "vllm:prefix_cache_hits_total"),
        ("vllm:num_preemptions", "vllm:num_preemptions_total"),
        ("vllm:prompt_tokens_cached", "vllm:prompt_tokens_cached_total"),
        ("vllm:prompt_tokens_cached_by_source", "vllm:prompt_tokens_cached_by_source_total"),
        ("vllm:request_num_preemptions", "vllm:request_num_preemptions_sum"),
    ],
)
def test_with_prefix_caching_off_and_no_preemption_these_stay_zero(
    traffic: Traffic, family: str, sample: str
) -> None:
    assert traffic.after[family].samples, f"{family} has no series"
    assert traffic.after[family].value(sample) == 0


def test_cached_token_sources_are_vllms(traffic: Traffic) -> None:
    family = traffic.after["vllm:prompt_tokens_cached_by_source"]
    sources = {
        v for (name, got) in family.samples if name.endswith("_total") for k, v in got if k == "source"
    }
    assert sources == {"device", "host", "p2p", "disk", "external_unspecified"}
    by_source = traffic.after["vllm:prompt_tokens_by_source"]
    sources = {
        v for (name, got) in by_source.samples if name.endswith("_total") for k, v in got if k == "source"
    }
    assert sources == {"local_compute", "local_cache_hit", "external_kv_transfer"}
    for source in ("local_cache_hit", "external_kv_transfer"):
        assert by_source.value("vllm:prompt_tokens_by_source_total", source=source) == 0


# ------------------------------------------------------------------------------------- LoRA residency


def test_adapter_residency_matches_the_store(traffic: Traffic, http: httpx.Client) -> None:
    adapters = {a["id"]: a for a in http.get("/v1/adapters").json()["data"]}
    assert adapters[ADAPTER]["tier"] == "gpu"
    loaded = scrape(http)["vllm:lora_adapter_loaded"]
    series = [dict(labels) for (_, labels), value in loaded.samples.items() if value == 1]
    assert len(series) == len(loaded.samples)  # a series exists only while its adapter is loaded
    gpu = {s["adapter_name"]: s for s in series if s["level"] == "gpu"}
    assert set(gpu) == {name for name, info in adapters.items() if info["tier"] == "gpu"}
    assert len(gpu) <= MAX_GPU_ADAPTERS
    assert gpu[ADAPTER]["pinned"] == "false"  # nothing runs now
    assert gpu[ADAPTER]["rank"] == str(adapters[ADAPTER]["rank"])
    assert {s["adapter_name"] for s in series} <= {n for n, a in adapters.items() if a["tier"] != "disk"}
    slots = traffic.after["vllm:max_gpu_lora_adapters"]
    assert slots.value("vllm:max_gpu_lora_adapters", model_name=traffic.base_id) == MAX_GPU_ADAPTERS


def test_lora_requests_info_is_a_timestamp_with_empty_sets_when_idle(
    traffic: Traffic, http: httpx.Client
) -> None:
    info = scrape(http)["vllm:lora_requests_info"]
    ((_, labels), stamp), *others = info.samples.items()
    assert not others
    assert dict(labels) == {"max_lora": "8", "running_lora_adapters": "", "waiting_lora_adapters": ""}
    assert (
        traffic.started <= stamp <= time.time()
    )  # a wall-clock stamp of the last change, as routers read it


# ---------------------------------------------------------------- waiting reasons and pinning, live


@pytest.fixture(scope="module")
def lora_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Two KV slots but one adapter per step: a request for a second adapter waits, deferred."""
    process = start_server(
        tmp_path_factory.mktemp("metrics-lora"),
        ["--max-num-seqs", "2", "--max-loras-per-batch", "1", "--max-model-len", "2048"],
    )
    yield process
    assert process.terminate() == 0, process.log_tail()


def post(server: ServerProcess, body: dict[str, Any]) -> int:
    with server.http() as client:
        return client.post("/v1/completions", json=body).status_code


def test_a_second_adapter_waits_deferred_while_the_first_runs_pinned(lora_server: ServerProcess) -> None:
    long = {"prompt": [5, 6, 7], "max_tokens": 2000, "ignore_eos": True, "temperature": 0}
    with lora_server.http() as http, ThreadPoolExecutor(1) as pool:
        base_id = http.get("/v1/models").json()["data"][0]["id"]
        with http.stream(
            "POST", "/v1/completions", json={"model": "shout", "stream": True, **long}
        ) as running:
            assert running.status_code == 200
            chunks = sse_data(running.iter_lines())
            next(chunks), next(chunks)  # shout is generating
            waiter = pool.submit(post, lora_server, {"model": "digits", **long, "max_tokens": 2})

            def deferred() -> float:
                by_reason = scrape(http)["vllm:num_requests_waiting_by_reason"]
                return by_reason.value(
                    "vllm:num_requests_waiting_by_reason", model_name=base_id, reason="deferred"
                )

            deadline = time.monotonic() + 30
            while deferred() < 1:  # digits arrives, is passed over for the step's one adapter
                assert time.monotonic() < deadline, "digits never showed as deferred"
                time.sleep(0.02)
            now = scrape(http)
            by_reason = now["vllm:num_requests_waiting_by_reason"]
            assert (
                by_reason.value("vllm:num_requests_waiting_by_reason", reason="capacity") == 0
            )  # a slot is free
            info = dict(next(iter(now["vllm:lora_requests_info"].samples))[1])
            assert (info["running_lora_adapters"], info["waiting_lora_adapters"]) == ("shout", "digits")
            loaded = [dict(labels) for (_, labels) in now["vllm:lora_adapter_loaded"].samples]
            assert {(s["level"], s["pinned"]) for s in loaded if s["adapter_name"] == "shout"} >= {
                ("gpu", "true")
            }
        # leaving the stream aborts shout; digits then runs and finishes
        assert waiter.result(timeout=60) == 200
