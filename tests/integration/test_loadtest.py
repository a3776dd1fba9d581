"""``loadtests/run.py`` against the real server on the demo bundle: a few seconds of streamed load, some
clients hanging up mid-stream, then the JSON keys, zero errors and the plot. Plus its pure helpers."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.integration.api_server import ServerProcess, start_server

RUN_PY = Path(__file__).parents[2] / "loadtests" / "run.py"
REQUIRED_KEYS = {
    "requests",
    "errors",
    "ttft_p50_s",
    "ttft_p99_s",
    "itl_p50_s",
    "output_tokens_per_s",
    "request_throughput",
    "per_adapter",
}


def _load_run_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("loadtest_run", RUN_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


run = _load_run_module()


# ------------------------------------------------------------------------------------------ pure helpers


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([], 50, None),
        ([3.0], 99, 3.0),
        ([1.0, 2.0, 3.0], 50, 2.0),
        ([1.0, 2.0, 3.0, 4.0], 50, 2.5),
        ([4.0, 1.0, 3.0, 2.0], 100, 4.0),
        ([1.0, 2.0], 0, 1.0),
    ],
)
def test_percentile(values: list[float], q: float, expected: float | None) -> None:
    assert run.percentile(values, q) == expected


@pytest.mark.parametrize(
    ("count", "skew", "first", "last"),
    [(1, 1.0, 1.0, 1.0), (4, 0.0, 0.25, 0.25), (2, 1.0, 2 / 3, 1 / 3), (3, 2.0, 36 / 49, 4 / 49)],
)
def test_adapter_weights_are_zipf(count: int, skew: float, first: float, last: float) -> None:
    weights = run.adapter_weights(count, skew)
    assert sum(weights) == pytest.approx(1.0)
    assert (weights[0], weights[-1]) == (pytest.approx(first), pytest.approx(last))


@pytest.mark.parametrize(("text", "low", "high"), [("8", 8, 8), ("4:16", 4, 16), ("1:1", 1, 1)])
def test_int_range_parses(text: str, low: int, high: int) -> None:
    value = run.IntRange.parse(text)
    assert (value.low, value.high) == (low, high)


@pytest.mark.parametrize("text", ["", "0:4", "9:3", "a:b", "-1"])
def test_int_range_refuses(text: str) -> None:
    with pytest.raises(Exception, match="MIN"):
        run.IntRange.parse(text)


def test_summary_counts_failures_apart_from_cancellations() -> None:
    ok = run.RequestResult("a", 0.0, 8, 4, ttft=0.1, e2e=0.4, output_tokens=4, itls=[0.1, 0.1, 0.1])
    cancelled = run.RequestResult("a", 0.0, 8, 4, status="cancelled", ttft=0.2, output_tokens=1)
    failed = run.RequestResult("b", 0.0, 8, 4, status="429")
    summary = run.summarize([ok, cancelled, failed], wall_s=2.0)
    assert (summary["requests"], summary["errors"], summary["cancelled"]) == (1, 1, 1)
    assert summary["errors_by_status"] == {"429": 1}
    assert summary["output_tokens_per_s"] == pytest.approx(2.5)
    assert summary["tpot_p50_s"] == pytest.approx(0.1)


# ------------------------------------------------------------------------------------------ real server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = start_server(tmp_path_factory.mktemp("loadtest-server"), ["--max-num-seqs", "8"])
    try:
        yield process
    finally:
        process.terminate()


def _run_load(server: ServerProcess, out: Path, *extra: str) -> dict[str, Any]:
    command = [sys.executable, str(RUN_PY), "--url", server.base_url, "--out", str(out), *extra]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{server.log_tail()}"
    assert "| requests |" in done.stdout  # the table
    document: dict[str, Any] = json.loads(out.read_text())
    assert set(document) >= REQUIRED_KEYS, sorted(REQUIRED_KEYS - set(document))
    assert out.with_suffix(".png").stat().st_size > 1000
    return document


def test_closed_loop_with_disconnects(server: ServerProcess, tmp_path: Path) -> None:
    out = tmp_path / "closed.json"
    document = _run_load(
        server,
        out,
        *("--duration", "3", "--concurrency", "4", "--skew", "1.0"),
        *("--prompt-tokens", "4:16", "--max-tokens", "4:12", "--cancel-fraction", "0.25"),
    )
    assert document["errors"] == 0, document["errors_sample"]
    assert document["requests"] > 0
    assert document["ttft_p50_s"] > 0 and document["itl_p50_s"] > 0
    assert document["output_tokens_per_s"] > 0 and document["request_throughput"] > 0
    assert len(document["per_adapter"]) >= 2  # adapters discovered via /v1/models, spread by the skew
    with server.http() as client:  # the server is still healthy after the disconnects
        assert client.get("/health").status_code == 200


def test_open_loop_chat(server: ServerProcess, tmp_path: Path) -> None:
    with server.http() as client:
        adapter = next(m["id"] for m in client.get("/v1/models").json()["data"] if m.get("parent"))
    document = _run_load(
        server,
        tmp_path / "open.json",
        *("--duration", "2", "--concurrency", "4", "--rate", "4", "--chat", "--adapters", adapter),
        *("--prompt-tokens", "4:8", "--max-tokens", "4:8"),
    )
    assert document["errors"] == 0, document["errors_sample"]
    assert document["requests"] > 0
    assert list(document["per_adapter"]) == [adapter]
