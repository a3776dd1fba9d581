"""``benchmarks/engine_vs_naive.py --shape demo`` runs end to end on the CPU with tiny sizes."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.engine_vs_naive import main


def test_engine_vs_naive_demo_writes_json_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = "--shape demo --device cpu --streams 1 2 --adapters 1 2 --prompt-tokens 6 --new-tokens 4"
    main([*args.split(), "--naive-tokens", "3", "--naive-requests", "1", "--out", str(out)])
    data = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    assert [(r["streams"], r["adapters"]) for r in data["engine"]] == [(1, 1), (2, 1), (2, 2)]
    for r in data["engine"]:
        assert r["output_tokens"] == 4 * r["streams"]
        assert r["tokens_per_s"] > 0 and r["naive_tokens_per_s"] > 0 and r["ratio"] > 0
    assert data["machine"] and data["naive"].keys() == {"adapters1", "adapters2"}
