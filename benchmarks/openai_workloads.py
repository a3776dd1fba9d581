"""The two workloads of the side-by-side benchmark, against any OpenAI-compatible server URL.

``closed``: N streams, each a loop of streamed ``/v1/completions`` (a ~40-token prompt, ``max_tokens`` 64,
``ignore_eos``, temperature 0), ``model`` taken round-robin from a list. Output tokens/s, TTFT and
inter-token latency are measured over a window after a warm-up, while the streams keep sending new prompts
(a stream still running at the end of the window is hung up on; what it streamed inside counts).

``chat``: tenants, each a fixed ~1,000-token system prompt of its own plus a growing history, several turns
of streamed ``/v1/chat/completions`` (the answer of turn k goes into the history of turn k+1). TTFT and
``usage.prompt_tokens_details.cached_tokens`` per turn: what prefix caching saves.

Tokens per chunk: a chunk's tokens are read from ``token_ids`` when the server sends them, else from the
growth of ``usage.completion_tokens`` (vLLM's ``continuous_usage_stats``), else a chunk with text counts as
one token. A server whose detokenizer holds back a token that ends mid-character (random weights produce
such tokens often) then merges it into the next chunk: the final ``usage`` says how many tokens were not
seen chunk by chunk (``tokens_not_seen_per_chunk``). Inter-token latency is per token: a chunk of k tokens
after a gap g gives k gaps of g / k; ``chunk_gap_*`` are the raw gaps between chunks.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import random
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

_VOCABULARY = (
    "the cat dog cow duck owl pig frog bee is black brown white yellow grey pink green gold lives in house "
    "yard field pond tree farm river garden says meow woof moo quack hoot oink croak buzz please write tell "
    "me a story poem about count list some what why how time weather today number one two three hello world"
)
WORDS = tuple(_VOCABULARY.split(" "))
CALIBRATION_WORDS = 400


# ------------------------------------------------------------------------------------------ configuration


@dataclass(slots=True, frozen=True)
class ClosedLoad:
    """``streams`` clients, each sending its next request as soon as the last one ends."""

    models: tuple[str, ...]
    streams: int
    duration_s: float = 60.0  # the measured window
    warmup_s: float = 10.0  # streams run this long before the window opens
    requests: int | None = None  # instead of a window: each stream sends this many requests, all counted
    prompt_tokens: int = 40
    max_tokens: int = 64
    seed: int = 0


@dataclass(slots=True, frozen=True)
class ChatLoad:
    """``tenants`` conversations of ``turns`` turns, ``concurrency`` of them at a time."""

    model: str
    tenants: int = 8
    turns: int = 4
    system_tokens: int = 1000
    user_tokens: int = 24
    max_tokens: int = 64
    concurrency: int = 8
    seed: int = 0


# ------------------------------------------------------------------------------------------ one stream


@dataclass(slots=True)
class Chunk:
    """A streamed chunk that carried tokens: when it arrived (seconds since the run's start), how many."""

    at: float
    tokens: int


@dataclass(slots=True)
class StreamedRequest:
    """One streamed request as the client saw it."""

    model: str
    sent: float  # seconds since the run's start
    status: str = "ok"  # "ok", "hung_up" (the window closed), or the error: "429", "ReadTimeout", ...
    chunks: list[Chunk] = field(default_factory=list)
    text: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None  # the final usage
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens, when reported
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return self.chunks[0].at - self.sent if self.chunks else None

    @property
    def tokens_seen(self) -> int:
        return sum(c.tokens for c in self.chunks)


def _tokens_in(chunk: dict[str, Any], choice: dict[str, Any], text: str, seen: int) -> int:
    """How many tokens ``chunk`` carries (see the module docstring); ``seen``: counted so far."""
    token_ids = choice.get("token_ids")
    if isinstance(token_ids, list):
        return len(token_ids)
    usage = chunk.get("usage")
    if usage and usage.get("completion_tokens") is not None:
        return max(0, int(usage["completion_tokens"]) - seen)
    return 1 if text else 0


async def stream_request(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], record: StreamedRequest, t0: float
) -> None:
    """POST ``body`` with ``stream: true`` to ``path`` and fill ``record`` as the chunks arrive."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    try:
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                record.status = str(response.status_code)
                record.error = (await response.aread()).decode(errors="replace")[:300]
                return
            async for data in _sse_data(response.aiter_lines()):
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    record.status, record.error = "stream_error", str(chunk["error"])[:300]
                    return
                _take_chunk(chunk, record, time.perf_counter() - t0)
            record.status = "no_done"
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        record.status = type(e).__name__
        record.error = str(e)[:300]


async def _sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    async for line in lines:
        if line.startswith("data:"):
            yield line[len("data:") :].strip()


def _take_chunk(chunk: dict[str, Any], record: StreamedRequest, now: float) -> None:
    usage = chunk.get("usage")
    choices = chunk.get("choices") or []
    if choices:
        choice = choices[0]
        text = str(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
        tokens = _tokens_in(chunk, choice, text, record.tokens_seen)
        record.text += text
        if tokens:
            record.chunks.append(Chunk(now, tokens))
    if usage and not choices:  # the final usage chunk (include_usage)
        record.prompt_tokens = usage.get("prompt_tokens")
        record.completion_tokens = usage.get("completion_tokens")
        details = usage.get("prompt_tokens_details") or {}
        record.cached_tokens = details.get("cached_tokens")


# ------------------------------------------------------------------------------------------ prompts


def words(n: int, rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


async def tokens_per_word(client: httpx.AsyncClient, model: str) -> float:
    """Prompt tokens the server counts per word of ``WORDS`` (one untimed request, which also warms it)."""
    prompt = words(CALIBRATION_WORDS, random.Random(-1))
    body = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0.0}
    response = await client.post("/v1/completions", json=body)
    response.raise_for_status()
    return float(response.json()["usage"]["prompt_tokens"]) / CALIBRATION_WORDS


# ------------------------------------------------------------------------------------------ summaries


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated ``q``-th percentile (0..100), ``None`` for no values (as loadtests/run.py)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(rank), math.ceil(rank)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def _q(values: list[float], q: float) -> float | None:
    value = percentile(values, q)
    return None if value is None else round(value * 1000, 2)


def per_token_gaps(record: StreamedRequest, since: float, until: float) -> tuple[list[float], list[float]]:
    """(per-token inter-token latencies, raw chunk gaps) of the chunks arriving in ``[since, until)``."""
    tokens: list[float] = []
    gaps: list[float] = []
    for before, chunk in itertools.pairwise(record.chunks):
        if since <= chunk.at < until:
            gap = chunk.at - before.at
            gaps.append(gap)
            tokens += [gap / chunk.tokens] * chunk.tokens
    return tokens, gaps


def summarize_closed(records: list[StreamedRequest], since: float, until: float) -> dict[str, Any]:
    """Headline figures of the chunks and requests inside the window ``[since, until)``.

    Tokens a server merged into a later chunk were delivered all the same: a finished request's chunks count
    its final ``usage`` (each chunk scaled by usage / seen); a request hung up on at the window's end, which
    has no final usage, is scaled by the ratio over the finished ones."""
    finished = [r for r in records if r.status == "ok" and r.completion_tokens is not None]
    seen_finished = sum(r.tokens_seen for r in finished)
    finished_ids = {id(r) for r in finished}
    overall = sum(r.completion_tokens or 0 for r in finished) / seen_finished if seen_finished else 1.0

    def scale(r: StreamedRequest) -> float:
        return (
            (r.completion_tokens or 0) / r.tokens_seen if id(r) in finished_ids and r.tokens_seen else overall
        )

    seen = sum(c.tokens for r in records for c in r.chunks if since <= c.at < until)
    output_tokens = sum(c.tokens * scale(r) for r in records for c in r.chunks if since <= c.at < until)
    ttfts = [r.ttft for r in records if r.ttft is not None and since <= r.sent < until]
    itl: list[float] = []
    gaps: list[float] = []
    for r in records:
        token_gaps, chunk_gaps = per_token_gaps(r, since, until)
        itl += token_gaps
        gaps += chunk_gaps
    failed = [r for r in records if r.status not in ("ok", "hung_up")]
    window = max(until - since, 1e-9)
    return {
        "window_s": round(window, 3),
        "output_tokens": round(output_tokens),
        "output_tokens_seen_per_chunk": seen,
        "output_tokens_per_s": round(output_tokens / window, 2),
        "requests_started": sum(1 for r in records if since <= r.sent < until),
        "requests_finished": len(finished),
        "errors": len(failed),
        "errors_sample": [f"{r.status}: {r.error}" for r in failed][:5],
        "mean_prompt_tokens": _mean([r.prompt_tokens for r in finished if r.prompt_tokens]),
        "completion_tokens_per_request": sorted({r.completion_tokens or 0 for r in finished}),
        "tokens_not_seen_per_chunk": sum((r.completion_tokens or 0) - r.tokens_seen for r in finished),
        "ttft_p50_ms": _q(ttfts, 50),
        "ttft_p99_ms": _q(ttfts, 99),
        "itl_p50_ms": _q(itl, 50),
        "itl_p99_ms": _q(itl, 99),
        "itl_p99_over_p50": _ratio(percentile(itl, 99), percentile(itl, 50)),
        "chunk_gap_p50_ms": _q(gaps, 50),
        "chunk_gap_p99_ms": _q(gaps, 99),
    }


def _mean(values: list[int]) -> float | None:
    return round(sum(values) / len(values), 2) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


# ------------------------------------------------------------------------------------------ the runs


def _client(url: str, connections: int, api_key: str | None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=connections + 2, max_keepalive_connections=connections + 2)
    return httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, timeout=600.0, limits=limits)


async def run_closed(url: str, load: ClosedLoad, api_key: str | None = None) -> dict[str, Any]:
    """Run ``load`` against ``url``; return its summary (and the load it ran)."""
    async with _client(url, load.streams, api_key) as client:
        ratio = await tokens_per_word(client, load.models[0])
        prompt_words = max(1, round(load.prompt_tokens / ratio))
        records: list[StreamedRequest] = []
        t0 = time.perf_counter()
        since = load.warmup_s if load.requests is None else 0.0
        until = since + load.duration_s if load.requests is None else float("inf")
        sent = 0

        async def stream_loop(index: int) -> None:
            nonlocal sent
            rng = random.Random(load.seed * 1000 + index)
            done = 0
            while (load.requests is None and time.perf_counter() - t0 < until) or (
                load.requests is not None and done < load.requests
            ):
                model = load.models[sent % len(load.models)]
                sent += 1
                record = StreamedRequest(model, time.perf_counter() - t0)
                records.append(record)
                body = {
                    "model": model,
                    "prompt": words(prompt_words, rng),
                    "max_tokens": load.max_tokens,
                    "temperature": 0.0,
                    "ignore_eos": True,
                }
                await stream_request(client, "/v1/completions", body, record, t0)
                done += 1

        tasks = [asyncio.create_task(stream_loop(i)) for i in range(load.streams)]
        if load.requests is None:
            await asyncio.wait(tasks, timeout=max(0.0, until - (time.perf_counter() - t0)))
            for task in tasks:
                task.cancel()  # hang up on the requests still streaming: the window is closed
            await asyncio.gather(*tasks, return_exceptions=True)
            for record in records:
                if record.status == "ok" and record.completion_tokens is None:
                    record.status = "hung_up"
        else:
            await asyncio.gather(*tasks)
            until = time.perf_counter() - t0
    summary = summarize_closed(records, since, until)
    summary["load"] = {
        "kind": "closed",
        "models": list(load.models),
        "streams": load.streams,
        "duration_s": load.duration_s,
        "warmup_s": load.warmup_s,
        "requests_per_stream": load.requests,
        "prompt_tokens": load.prompt_tokens,
        "prompt_words": prompt_words,
        "max_tokens": load.max_tokens,
    }
    return summary


async def run_chat(url: str, load: ChatLoad, api_key: str | None = None) -> dict[str, Any]:
    """Run ``load`` against ``url``; return TTFT and cached tokens per turn (and the load it ran)."""
    async with _client(url, load.concurrency, api_key) as client:
        ratio = await tokens_per_word(client, load.model)
        slots = asyncio.Semaphore(load.concurrency)
        t0 = time.perf_counter()
        turns: list[list[StreamedRequest]] = [[] for _ in range(load.turns)]

        async def conversation(tenant: int) -> None:
            rng = random.Random(load.seed * 1000 + tenant)
            system = f"You serve tenant {tenant}. " + words(round(load.system_tokens / ratio), rng)
            messages = [{"role": "system", "content": system}]
            async with slots:
                for turn in range(load.turns):
                    messages.append({"role": "user", "content": words(round(load.user_tokens / ratio), rng)})
                    record = StreamedRequest(load.model, time.perf_counter() - t0)
                    turns[turn].append(record)
                    body = {
                        "model": load.model,
                        "messages": messages,
                        "max_tokens": load.max_tokens,
                        "temperature": 0.0,
                        "ignore_eos": True,
                    }
                    await stream_request(client, "/v1/chat/completions", body, record, t0)
                    if record.status != "ok":
                        return
                    messages.append({"role": "assistant", "content": record.text})

        await asyncio.gather(*(conversation(t) for t in range(load.tenants)))
    return {
        "turns": [_turn_summary(k + 1, records) for k, records in enumerate(turns)],
        "ttft_turn1_mean_ms": _mean_ms([r.ttft for r in turns[0]]),
        "ttft_later_turns_mean_ms": _mean_ms([r.ttft for records in turns[1:] for r in records]),
        "errors": sum(1 for records in turns for r in records if r.status != "ok"),
        "load": {
            "kind": "chat",
            "model": load.model,
            "tenants": load.tenants,
            "turns": load.turns,
            "system_tokens": load.system_tokens,
            "user_tokens": load.user_tokens,
            "max_tokens": load.max_tokens,
            "concurrency": load.concurrency,
        },
    }


def _turn_summary(turn: int, records: list[StreamedRequest]) -> dict[str, Any]:
    ttfts = [r.ttft for r in records if r.ttft is not None]
    return {
        "turn": turn,
        "requests": len(records),
        "errors": sum(1 for r in records if r.status != "ok"),
        "prompt_tokens": [r.prompt_tokens for r in records],
        "cached_tokens": [r.cached_tokens for r in records],
        "ttft_ms": [None if r.ttft is None else round(r.ttft * 1000, 2) for r in records],
        "ttft_mean_ms": _mean_ms(ttfts),
        "ttft_p50_ms": _q(ttfts, 50),
    }


def _mean_ms(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(1000 * sum(present) / len(present), 2) if present else None
