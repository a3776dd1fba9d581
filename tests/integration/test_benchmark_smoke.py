"""The benchmarks run end to end on the CPU with tiny sizes (``--shape demo``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import adapter_load, logprobs_cost
from benchmarks.engine_vs_naive import main


# slot LoRA on: the CUDA path's routing and its naive fallback; --cold --preload: adapters start in host memory
@pytest.mark.parametrize(("slot_lora", "extra"), [("off", ""), ("on", " --cold --preload")])
def test_engine_vs_naive_demo_writes_json_and_plot(tmp_path: Path, slot_lora: str, extra: str) -> None:
    out = tmp_path / "bench.json"
    args = "--shape demo --device cpu --streams 1 2 --adapters 1 2 --prompt-tokens 6 --new-tokens 4" + extra
    main(
        [
            *args.split(),
            "--naive-tokens",
            "3",
            "--naive-requests",
            "1",
            "--slot-lora",
            slot_lora,
            "--out",
            str(out),
        ]
    )
    data = json.loads(out.read_text())
    assert data["slot_lora"] == (slot_lora == "on")
    assert out.with_suffix(".png").stat().st_size > 0
    assert [(r["streams"], r["adapters"]) for r in data["engine"]] == [(1, 1), (2, 1), (2, 2)]
    for r in data["engine"]:
        assert r["output_tokens"] == 4 * r["streams"]
        assert r["tokens_per_s"] > 0 and r["naive_tokens_per_s"] > 0 and r["ratio"] > 0
    assert data["machine"] and data["naive"].keys() == {"adapters1", "adapters2"}


def test_adapter_load_demo_measures_the_promotion_stall(tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    assert adapter_load.main(["--shape", "demo", "--repeats", "1", "--no-snapshot", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["device"] == "cpu" and data["adapters"]
    for figures in data["adapters"].values():
        for mode in ("peft", "slots"):
            assert figures[mode].keys() == {"disk_to_gpu_ms", "cpu_to_gpu_ms", "engine_stall_ms"}
            assert all(v > 0 for v in figures[mode].values())
        assert figures["engine_stall_peft_over_slots"] > 0 and "snapshot_build_s" not in figures


def test_logprobs_cost_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "logprobs.json"
    logprobs_cost.main(["--requests", "2", "--max-tokens", "3", "--rounds", "1", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["tokens_per_s"].keys() == {"without", "all_with", "half_with"}
    assert all(v > 0 for v in data["tokens_per_s"].values())
    # the variants measure what they say: logprobs for every token, half of them, none
    assert data["tokens_with_logprobs"] == {"without": 0, "all_with": 6, "half_with": 3}
