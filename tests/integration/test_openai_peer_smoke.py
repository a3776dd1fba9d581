"""``benchmarks/openai_peer.py`` end to end on the CPU, with a few requests: the ``closed`` and ``chat``
workloads against the real demo server, and ``compare`` starting loraserve (this venv's) twice on a tiny
model from ``benchmarks/build_llama190m.py``. Shapes and counts only, never times."""

from __future__ import annotations

import itertools
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from benchmarks.build_llama190m import Shape, build
from benchmarks.openai_peer import main
from tests.conftest import demo_cache_dir
from tests.integration.api_server import ServerProcess, start_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, demo_bundle: object) -> Iterator[ServerProcess]:
    process = start_server(tmp_path_factory.mktemp("peer-server"))
    yield process
    process.terminate()


@pytest.fixture(scope="module")
def adapter_id(http: httpx.Client) -> str:
    return str(next(m["id"] for m in http.get("/v1/models").json()["data"] if m.get("parent")))


def test_closed_workload_counts_every_request_and_token(
    server: ServerProcess, base_id: str, adapter_id: str, tmp_path: Path
) -> None:
    out = tmp_path / "closed.json"
    args = f"--models {base_id},{adapter_id} --streams 2 --requests 2 --prompt-tokens 12 --max-tokens 5"
    assert main(["closed", "--url", server.base_url, *args.split(), "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["errors"] == 0 and data["requests_finished"] == 4
    assert data["completion_tokens_per_request"] == [5]  # ignore_eos: exactly max_tokens each
    assert data["output_tokens"] == 20
    assert data["output_tokens_seen_per_chunk"] + data["tokens_not_seen_per_chunk"] == 20
    assert data["load"]["models"] == [base_id, adapter_id] and data["mean_prompt_tokens"] > 0
    for key in ("output_tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms"):
        assert data[key] is not None and data[key] > 0
    assert data["machine"]["cores"] >= 1


def test_chat_workload_grows_the_history_turn_by_turn(
    server: ServerProcess, base_id: str, tmp_path: Path
) -> None:
    out = tmp_path / "chat.json"
    args = "--tenants 2 --turns 3 --system-tokens 60 --chat-max-tokens 4 --chat-concurrency 2"
    assert main(["chat", "--url", server.base_url, "--model", base_id, *args.split(), "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["errors"] == 0
    turns = data["turns"]
    assert [t["turn"] for t in turns] == [1, 2, 3] and all(t["requests"] == 2 for t in turns)
    for earlier, later in itertools.pairwise(turns):
        # each turn adds the last answer and a new question to the same conversation
        assert all(b > a for a, b in zip(earlier["prompt_tokens"], later["prompt_tokens"], strict=True))
    assert turns[0]["prompt_tokens"][0] >= 60
    assert all(len(t["ttft_ms"]) == 2 and len(t["cached_tokens"]) == 2 for t in turns)
    assert data["ttft_turn1_mean_ms"] > 0 and data["ttft_later_turns_mean_ms"] > 0


def test_compare_starts_each_pass_and_writes_one_document(tmp_path: Path) -> None:
    model = tmp_path / "model"
    shape = Shape(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    build(model, shape=shape, adapters=2, rank=4, seed=0, demo_cache=demo_cache_dir())
    out = tmp_path / "compare.json"
    flags = "--quantization none --dtype float32"
    args = [
        *("compare", "--model-dir", str(model), "--order", "a,b", "--rows-for", "b=adapter1"),
        *("--server", f"a=loraserve:{sys.prefix}:{flags}", "--server", f"b=loraserve:{sys.prefix}:{flags}"),
        *("--rows", "adapter1,chat", "--requests", "1", "--max-tokens", "3", "--prompt-tokens", "10"),
        *("--tenants", "1", "--turns", "2", "--system-tokens", "30", "--chat-max-tokens", "3"),
        *("--log-dir", str(tmp_path / "logs"), "--out", str(out)),
    ]
    assert main(args) == 0
    data = json.loads(out.read_text())
    assert data["order"] == ["a", "b"] and data["reference"] == "a"  # no vLLM side: the first
    assert data["adapters"] == ["a1", "a2"]
    assert data["servers"]["b"]["checkout_at_start"]["commit"]  # the checkout this venv runs
    assert [p["server"] for p in data["passes"]] == ["a", "b"]
    for p in data["passes"]:
        assert p["exit_code"] == 0 and p["checkout"]["commit"] and p["command"]
    assert data["passes"][0]["rows"].keys() == {"adapter1", "chat"}
    assert data["passes"][1]["rows"].keys() == {"adapter1"}  # --rows-for
    for p in data["passes"]:
        assert p["rows"]["adapter1"]["requests_finished"] == 1
        assert p["rows"]["adapter1"]["load"]["models"] == ["a1"]
    assert [t["requests"] for t in data["passes"][0]["rows"]["chat"]["turns"]] == [1, 1]
    assert data["table"]["adapter1"]["a"]["output_tokens_per_s"]["vs_reference"] == 1.0
    assert data["table"]["adapter1"]["b"]["output_tokens_per_s"]["vs_reference"] > 0
    assert data["table"]["chat"].keys() == {"a"}
    assert data["table"]["chat"]["a"]["ttft_later_turns_mean_ms"]["median"] > 0
