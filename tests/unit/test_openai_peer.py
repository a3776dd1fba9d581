"""The side-by-side benchmark's pure parts: tokens per chunk, per-token gaps, the window's token count, the
server specs and the table of medians and ratios."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from benchmarks.openai_peer import table
from benchmarks.openai_workloads import Chunk, StreamedRequest, _take_chunk, per_token_gaps, summarize_closed
from benchmarks.peer_servers import ServerSpec


def _completion_chunk(
    text: str, token_ids: list[int] | None = None, usage: dict[str, int] | None = None
) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "text": text, "finish_reason": None, "token_ids": token_ids}
    return {"choices": [choice], **({"usage": usage} if usage else {})}


@pytest.mark.parametrize(
    ("chunks", "seen"),
    [
        ([], 0),
        ([_completion_chunk("a")], 1),
        ([_completion_chunk("")], 0),  # no text and no count: carries nothing
        ([_completion_chunk("ab", token_ids=[5, 6])], 2),
        ([_completion_chunk("", token_ids=[7])], 1),  # a held-back token still counts when ids come
        # continuous usage: the growth of completion_tokens, whatever the text
        (
            [
                _completion_chunk("x", usage={"completion_tokens": 1}),
                _completion_chunk("", usage={"completion_tokens": 2}),
                _completion_chunk("yz", usage={"completion_tokens": 4}),
            ],
            4,
        ),
    ],
)
def test_tokens_per_chunk(chunks: list[dict[str, Any]], seen: int) -> None:
    record = StreamedRequest("m", 0.0)
    for i, chunk in enumerate(chunks):
        _take_chunk(chunk, record, float(i))
    assert record.tokens_seen == seen
    assert all(c.tokens > 0 for c in record.chunks)


def test_final_usage_chunk_gives_prompt_completion_and_cached_tokens() -> None:
    record = StreamedRequest("m", 0.0)
    _take_chunk(_completion_chunk("a"), record, 1.0)
    usage = {"prompt_tokens": 40, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 32}}
    _take_chunk({"choices": [], "usage": usage}, record, 2.0)
    assert (record.prompt_tokens, record.completion_tokens, record.cached_tokens) == (40, 2, 32)
    assert record.tokens_seen == 1  # the usage chunk carries no token of its own


def test_chat_delta_content_is_the_text() -> None:
    record = StreamedRequest("m", 0.0)
    _take_chunk({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}, record, 1.0)
    _take_chunk({"choices": [{"index": 0, "delta": {"content": "hi"}}]}, record, 2.0)
    assert record.text == "hi" and record.tokens_seen == 1 and record.ttft == 2.0


@pytest.mark.parametrize(
    ("chunks", "since", "until", "tokens", "gaps"),
    [
        ([], 0.0, 10.0, [], []),
        ([Chunk(1.0, 1)], 0.0, 10.0, [], []),
        ([Chunk(1.0, 1), Chunk(2.0, 1), Chunk(4.0, 2)], 0.0, 10.0, [1.0, 1.0, 1.0], [1.0, 2.0]),
        ([Chunk(1.0, 1), Chunk(2.0, 1), Chunk(4.0, 2)], 3.0, 10.0, [1.0, 1.0], [2.0]),  # only inside
        ([Chunk(1.0, 1), Chunk(2.0, 1), Chunk(4.0, 2)], 0.0, 3.0, [1.0], [1.0]),
    ],
)
def test_per_token_gaps(
    chunks: list[Chunk], since: float, until: float, tokens: list[float], gaps: list[float]
) -> None:
    record = StreamedRequest("m", 0.0, chunks=chunks)
    assert per_token_gaps(record, since, until) == (tokens, gaps)


def test_window_counts_merged_tokens_by_the_final_usage() -> None:
    # finished: 3 chunks seen, usage says 4 (one token was merged); hung up: 2 chunks seen, no usage
    finished = StreamedRequest("m", 0.0, chunks=[Chunk(1.0, 1), Chunk(2.0, 1), Chunk(3.0, 1)])
    finished.completion_tokens = 4
    hung_up = StreamedRequest("m", 0.5, status="hung_up", chunks=[Chunk(1.5, 1), Chunk(2.5, 1)])
    failed = StreamedRequest("m", 0.7, status="429")
    summary = summarize_closed([finished, hung_up, failed], 0.0, 10.0)
    assert summary["output_tokens_seen_per_chunk"] == 5
    assert summary["output_tokens"] == round(4 + 2 * 4 / 3)
    assert summary["tokens_not_seen_per_chunk"] == 1
    assert (summary["requests_started"], summary["requests_finished"], summary["errors"]) == (3, 1, 1)


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("a=loraserve:/v", ServerSpec("a", "loraserve", Path("/v"))),
        (
            "main=loraserve:/w/.venv:--quantization none --dtype bfloat16",
            ServerSpec(
                "main", "loraserve", Path("/w/.venv"), ("--quantization", "none", "--dtype", "bfloat16")
            ),
        ),
        (
            "v=vllm:/x:--no-enable-prefix-caching",
            ServerSpec("v", "vllm", Path("/x"), ("--no-enable-prefix-caching",)),
        ),
        # upper-case NAME=VALUE words are the server's environment
        (
            "v=vllm:/x:VLLM_CPU_OMP_THREADS_BIND=nobind --max-num-seqs 16 LD_PRELOAD=",
            ServerSpec(
                "v",
                "vllm",
                Path("/x"),
                ("--max-num-seqs", "16"),
                (("VLLM_CPU_OMP_THREADS_BIND", "nobind"), ("LD_PRELOAD", "")),
            ),
        ),
    ],
)
def test_server_spec_parse(text: str, spec: ServerSpec) -> None:
    assert ServerSpec.parse(text) == spec


def test_server_spec_anchors_a_relative_venv_where_it_was_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The checkout lookup runs the venv's python from "/", so ".venv" must already name tmp_path/.venv.
    monkeypatch.chdir(tmp_path)
    assert ServerSpec.parse("main=loraserve:.venv").venv == tmp_path / ".venv"


@pytest.mark.parametrize("text", ["", "a", "a=tgi:/v", "=vllm:/v", "a=vllm"])
def test_server_spec_refuses_what_it_cannot_start(text: str) -> None:
    with pytest.raises(ValueError, match="LABEL="):
        ServerSpec.parse(text)


def test_table_takes_medians_over_passes_and_divides_by_the_reference() -> None:
    def closed(tok_s: float) -> dict[str, Any]:
        return {"output_tokens_per_s": tok_s, "itl_p50_ms": 10.0, "itl_p99_ms": None, "ttft_p50_ms": 5.0}

    passes = [
        {"server": "a", "rows": {"r": closed(10.0)}},
        {"server": "b", "rows": {"r": closed(20.0)}},
        {"server": "a", "rows": {"r": closed(14.0)}},
    ]
    out = table(passes, "b")
    assert out["r"]["a"]["output_tokens_per_s"] == {
        "median": 12.0,
        "passes": [10.0, 14.0],
        "vs_reference": 0.6,
    }
    assert out["r"]["b"]["output_tokens_per_s"]["vs_reference"] == 1.0
    assert out["r"]["a"]["itl_p99_ms"] == {"median": None, "passes": [], "vs_reference": None}
