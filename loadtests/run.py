"""Load generator for any OpenAI-compatible completions server (loraserve, vLLM, ...).

Streams requests over SSE from many concurrent clients, spreading them over LoRA adapters with a power-law
popularity, and measures time to first token, inter-token latency, end-to-end latency, output tokens/s,
request throughput and errors by status. Prints a table, writes JSON to ``--out`` and a PNG of the latency
distributions next to it.

    python loadtests/run.py --url http://127.0.0.1:8000 --duration 15 --concurrency 8 --out out/load.json

Closed loop by default: ``--concurrency`` clients each send their next request when the last one ends. With
``--rate R`` it is an open loop: arrivals follow a Poisson process of ``R`` requests/s, at most
``--concurrency`` in flight (an arrival that finds every client busy waits; its wait is reported as
``arrival_delay`` and is not part of the latencies). The run is bounded: no request starts after
``--duration`` seconds or ``--max-requests`` requests, and requests still running ``--grace`` seconds later
are cancelled and counted as errors (``timeout``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

_FILLER = (
    "the adapter serves a tenant while the base model stays resident and every request may name its own "
    "weights so that many small fine tunes share one large model on one accelerator with low latency and "
    "high throughput under load from clients that stream tokens back over server sent events"
)
WORDS = _FILLER.split()


# ------------------------------------------------------------------------------------------ options


@dataclass(slots=True, frozen=True)
class IntRange:
    """An inclusive ``MIN:MAX`` range of token counts (``N`` alone means ``N:N``)."""

    low: int
    high: int

    @classmethod
    def parse(cls, text: str) -> IntRange:
        low, _, high = text.partition(":")
        try:
            value = cls(int(low), int(high or low))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected MIN:MAX or N, got {text!r}") from None
        if value.low < 1 or value.high < value.low:
            raise argparse.ArgumentTypeError(f"need 1 <= MIN <= MAX, got {text!r}")
        return value

    def draw(self, rng: random.Random) -> int:
        return rng.randint(self.low, self.high)

    def __str__(self) -> str:
        return f"{self.low}:{self.high}"


@dataclass(slots=True)
class LoadConfig:
    """What to send, how often and for how long."""

    url: str
    duration: float
    concurrency: int
    rate: float | None = None
    max_requests: int | None = None
    adapters: list[str] = field(default_factory=list)
    skew: float = 0.0
    prompt_tokens: IntRange = field(default_factory=lambda: IntRange(32, 128))
    max_tokens: IntRange = field(default_factory=lambda: IntRange(16, 64))
    cancel_fraction: float = 0.0
    api_key: str | None = None
    chat: bool = False
    temperature: float = 0.0
    ignore_eos: bool = True
    grace: float = 60.0
    timeout: float = 120.0
    seed: int = 0


# ------------------------------------------------------------------------------------------ results


@dataclass(slots=True)
class RequestResult:
    """One request as the client saw it. Times are seconds since the run started or durations in seconds."""

    adapter: str
    start: float
    prompt_words: int
    max_tokens: int
    status: str = "ok"  # "ok", "cancelled" (the client hung up on purpose), or the error: "429", "timeout"...
    ttft: float | None = None
    e2e: float | None = None
    output_tokens: int = 0
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    itls: list[float] = field(default_factory=list)
    arrival_delay: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def adapter_weights(count: int, skew: float) -> list[float]:
    """Zipf popularity: the ``i``-th adapter (0-based) is chosen with weight ``1 / (i + 1) ** skew``
    (``skew`` 0: uniform; 1: classic Zipf; larger: one hot adapter)."""
    raw = [1.0 / (i + 1) ** skew for i in range(count)]
    total = sum(raw)
    return [w / total for w in raw]


def make_prompt(words: int, rng: random.Random) -> str:
    """``words`` random words of filler text."""
    return " ".join(rng.choice(WORDS) for _ in range(words))


@dataclass(slots=True)
class TokensPerWord:
    """How many prompt tokens the server counts per word of filler, learnt from the ``usage`` it reports,
    so that ``--prompt-tokens`` means tokens whatever the server's tokenizer."""

    words: int = 0
    tokens: int = 0
    prior: float = 1.3  # English text under a typical BPE vocabulary, until the server says otherwise

    def observe(self, result: RequestResult) -> None:
        if result.prompt_tokens:
            self.words += result.prompt_words
            self.tokens += result.prompt_tokens

    def words_for(self, tokens: int) -> int:
        ratio = self.tokens / self.words if self.words else self.prior
        return max(1, round(tokens / ratio))


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated ``q``-th percentile (0..100), ``None`` for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(rank), math.ceil(rank)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def summarize(results: Sequence[RequestResult], wall_s: float) -> dict[str, Any]:
    """The headline numbers of ``results`` over a run of ``wall_s`` seconds."""
    ok = [r for r in results if r.ok]
    cancelled = [r for r in results if r.status == "cancelled"]
    failed = [r for r in results if r.status not in ("ok", "cancelled")]
    streamed = [*ok, *cancelled]
    ttft = [r.ttft for r in streamed if r.ttft is not None]
    itl = [gap for r in streamed for gap in r.itls]
    e2e = [r.e2e for r in ok if r.e2e is not None]
    tpot = [
        (r.e2e - r.ttft) / (r.output_tokens - 1)
        for r in ok
        if r.e2e is not None and r.ttft is not None and r.output_tokens > 1
    ]
    output_tokens = sum(r.output_tokens for r in streamed)
    prompt_tokens = sum(r.prompt_tokens or 0 for r in ok)
    wall = max(wall_s, 1e-9)
    summary: dict[str, Any] = {
        "requests": len(ok),
        "errors": len(failed),
        "cancelled": len(cancelled),
        "attempted": len(results),
        "errors_by_status": dict(sorted(Counter(r.status for r in failed).items())),
        "duration_s": round(wall_s, 3),
        "request_throughput": round(len(ok) / wall, 4),
        "output_tokens": output_tokens,
        "prompt_tokens": prompt_tokens,
        "output_tokens_per_s": round(output_tokens / wall, 3),
        "mean_prompt_tokens": _round(_mean([r.prompt_tokens for r in ok if r.prompt_tokens]), 2),
        "mean_output_tokens": _round(_mean([r.output_tokens for r in ok]), 2),
    }
    for name, values in (("ttft", ttft), ("itl", itl), ("tpot", tpot), ("e2e", e2e)):
        summary[f"{name}_mean_s"] = _round(_mean(values))
        for q in (50, 90, 99):
            summary[f"{name}_p{q}_s"] = _round(percentile(values, q))
    delays = [r.arrival_delay for r in results]
    summary["arrival_delay_p99_s"] = _round(percentile(delays, 99))
    return summary


def per_adapter(results: Sequence[RequestResult], wall_s: float) -> dict[str, dict[str, Any]]:
    by_adapter: dict[str, list[RequestResult]] = {}
    for r in results:
        by_adapter.setdefault(r.adapter, []).append(r)
    keys = (
        "requests",
        "errors",
        "cancelled",
        "request_throughput",
        "output_tokens_per_s",
        "ttft_p50_s",
        "ttft_p99_s",
        "itl_p50_s",
        "e2e_p50_s",
        "e2e_p99_s",
    )
    out = {}
    for name in sorted(by_adapter, key=lambda a: -len(by_adapter[a])):
        s = summarize(by_adapter[name], wall_s)
        out[name] = {k: s[k] for k in keys}
    return out


# ------------------------------------------------------------------------------------------ one request


def _body(cfg: LoadConfig, adapter: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": adapter,
        "max_tokens": max_tokens,
        "temperature": cfg.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    if cfg.chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


def _chunk_text(chunk: dict[str, Any], chat: bool) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    if chat:
        return str((choices[0].get("delta") or {}).get("content") or "")
    return str(choices[0].get("text") or "")


async def send_one(
    client: httpx.AsyncClient,
    cfg: LoadConfig,
    result: RequestResult,
    prompt: str,
    t0: float,
    cancel_after: int | None,
) -> None:
    """Send one streamed request and fill ``result``. ``cancel_after``: hang up after that many content
    chunks (a client that goes away mid-stream)."""
    path = "/v1/chat/completions" if cfg.chat else "/v1/completions"
    body = _body(cfg, result.adapter, prompt, result.max_tokens)
    sent = time.perf_counter()
    last: float | None = None
    chunks = 0
    done = False
    try:
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                result.status = str(response.status_code)
                text = (await response.aread()).decode(errors="replace")
                result.error = text[:300]
                return
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.status = "stream_error"
                    result.error = str(chunk["error"])[:300]
                    return
                usage = chunk.get("usage")
                if usage:
                    result.output_tokens = int(usage.get("completion_tokens") or 0)
                    result.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                choices = chunk.get("choices") or []
                if choices and choices[0].get("finish_reason"):
                    result.finish_reason = str(choices[0]["finish_reason"])
                if not _chunk_text(chunk, cfg.chat):
                    continue
                now = time.perf_counter()
                if last is None:
                    result.ttft = now - sent
                else:
                    result.itls.append(now - last)
                last = now
                chunks += 1
                if cancel_after is not None and chunks >= cancel_after:
                    result.status = "cancelled"
                    result.output_tokens = chunks
                    return  # leaving the ``async with`` closes the connection: the server sees a disconnect
    except asyncio.CancelledError:
        result.status = "timeout"  # still running at the end of the grace period
        raise
    except httpx.TimeoutException:
        result.status = "timeout"
        return
    except httpx.TransportError as e:
        result.status = type(e).__name__
        result.error = str(e)[:300]
        return
    except json.JSONDecodeError as e:
        result.status = "bad_chunk"
        result.error = str(e)[:300]
        return
    finally:
        result.e2e = time.perf_counter() - sent
        result.start = sent - t0
    if not done:
        result.status = "no_done"
    elif result.output_tokens == 0:
        result.output_tokens = chunks  # no usage chunk: one token per content chunk


# ------------------------------------------------------------------------------------------ the run


async def discover_adapters(client: httpx.AsyncClient) -> list[str]:
    """Adapters listed by ``GET /v1/models`` (entries with a ``parent``); the base if there are none."""
    response = await client.get("/v1/models")
    response.raise_for_status()
    models = response.json().get("data", [])
    adapters = [m["id"] for m in models if m.get("parent")]
    return adapters or [m["id"] for m in models[:1]]


async def run_load(cfg: LoadConfig) -> tuple[list[RequestResult], float]:
    """Run the load described by ``cfg``; return every request's result and the wall time in seconds."""
    rng = random.Random(cfg.seed)
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=cfg.concurrency + 4, max_keepalive_connections=cfg.concurrency)
    async with httpx.AsyncClient(
        base_url=cfg.url.rstrip("/"), headers=headers, timeout=cfg.timeout, limits=limits
    ) as client:
        if not cfg.adapters:
            cfg.adapters = await discover_adapters(client)
        if not cfg.adapters:
            raise SystemExit("no models to send requests to (GET /v1/models listed none)")
        weights = adapter_weights(len(cfg.adapters), cfg.skew)
        results: list[RequestResult] = []
        calibration = TokensPerWord()
        t0 = time.perf_counter()
        deadline = t0 + cfg.duration

        def budget_left() -> bool:
            in_time = time.perf_counter() < deadline
            return in_time and (cfg.max_requests is None or len(results) < cfg.max_requests)

        async def one(arrival: float | None) -> None:
            adapter = rng.choices(cfg.adapters, weights)[0]
            words = calibration.words_for(cfg.prompt_tokens.draw(rng))
            result = RequestResult(adapter, 0.0, words, cfg.max_tokens.draw(rng))
            if arrival is not None:
                result.arrival_delay = max(0.0, time.perf_counter() - arrival)
            cancel_after = None
            if rng.random() < cfg.cancel_fraction:
                cancel_after = rng.randint(1, max(1, result.max_tokens // 2))
            results.append(result)
            await send_one(client, cfg, result, make_prompt(words, rng), t0, cancel_after)
            calibration.observe(result)

        tasks: set[asyncio.Task[None]] = set()
        if cfg.rate is None:

            async def closed_loop_client() -> None:
                while budget_left():
                    await one(None)

            tasks = {asyncio.create_task(closed_loop_client()) for _ in range(cfg.concurrency)}
        else:
            slots = asyncio.Semaphore(cfg.concurrency)

            async def open_loop_request(arrival: float) -> None:
                async with slots:
                    await one(arrival)

            next_arrival = t0
            while True:
                next_arrival += rng.expovariate(cfg.rate)
                await asyncio.sleep(max(0.0, next_arrival - time.perf_counter()))
                if time.perf_counter() >= deadline:
                    break
                if cfg.max_requests is not None and len(tasks) >= cfg.max_requests:
                    break
                task = asyncio.create_task(open_loop_request(next_arrival))
                tasks.add(task)
        remaining = max(0.0, deadline - time.perf_counter()) + cfg.grace
        _, pending = await asyncio.wait(tasks, timeout=remaining) if tasks else (set(), set())
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        wall = time.perf_counter() - t0
    return results, wall


# ------------------------------------------------------------------------------------------ reporting


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def format_table(summary: dict[str, Any], adapters: dict[str, dict[str, Any]]) -> str:
    """The run's headline table and a per-adapter table, as Markdown."""
    lines = [
        "| requests | errors | cancelled | req/s | output tok/s | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) "
        "| E2E p50 / p99 (ms) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {summary['requests']} | {summary['errors']} | {summary['cancelled']} "
        f"| {summary['request_throughput']:.2f} | {summary['output_tokens_per_s']:.1f} "
        f"| {_ms(summary['ttft_p50_s'])} / {_ms(summary['ttft_p99_s'])} "
        f"| {_ms(summary['itl_p50_s'])} / {_ms(summary['itl_p99_s'])} "
        f"| {_ms(summary['e2e_p50_s'])} / {_ms(summary['e2e_p99_s'])} |",
    ]
    if summary["errors_by_status"]:
        lines.append("")
        lines.append(
            "errors by status: " + ", ".join(f"{k}: {v}" for k, v in summary["errors_by_status"].items())
        )
    lines += [
        "",
        "| adapter | requests | errors | req/s | output tok/s | TTFT p50 (ms) | ITL p50 (ms) | E2E p50 (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in adapters.items():
        lines.append(
            f"| {name} | {s['requests']} | {s['errors']} | {s['request_throughput']:.2f} "
            f"| {s['output_tokens_per_s']:.1f} | {_ms(s['ttft_p50_s'])} | {_ms(s['itl_p50_s'])} "
            f"| {_ms(s['e2e_p50_s'])} |"
        )
    return "\n".join(lines)


def write_plot(results: Sequence[RequestResult], path: Path, title: str) -> None:
    """Histograms of TTFT, inter-token latency and end-to-end latency (ms), with p50/p99 marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    streamed = [r for r in results if r.status in ("ok", "cancelled")]
    series = {
        "time to first token": [r.ttft * 1000 for r in streamed if r.ttft is not None],
        "inter-token latency": [g * 1000 for r in streamed for g in r.itls],
        "end-to-end latency": [r.e2e * 1000 for r in results if r.ok and r.e2e is not None],
    }
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (name, values) in zip(axes, series.items(), strict=True):
        ax.set_title(name)
        ax.set_xlabel("ms")
        if not values:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
            continue
        ax.hist(values, bins=min(50, max(5, len(values) // 4)), color="tab:blue", alpha=0.8)
        for q, style in ((50, "--"), (99, ":")):
            value = percentile(values, q)
            if value is not None:
                ax.axvline(value, color="black", linestyle=style, label=f"p{q} {value:.1f} ms")
        ax.legend()
    axes[0].set_ylabel("count")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(cfg: LoadConfig, results: list[RequestResult], wall: float, out: Path) -> dict[str, Any]:
    """Write ``out`` (JSON) and ``out`` with ``.png`` (plot); return the JSON document."""
    summary = summarize(results, wall)
    adapters = per_adapter(results, wall)
    config = asdict(cfg)
    config["prompt_tokens"] = str(cfg.prompt_tokens)
    config["max_tokens"] = str(cfg.max_tokens)
    config.pop("api_key")
    document = {
        **summary,
        "per_adapter": adapters,
        "config": config,
        "errors_sample": [
            {"status": r.status, "adapter": r.adapter, "error": r.error} for r in results if r.error
        ][:10],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=2) + "\n")
    mode = f"rate {cfg.rate}/s" if cfg.rate else "closed loop"
    title = f"{cfg.url}: {summary['requests']} requests, concurrency {cfg.concurrency}, {mode}"
    write_plot(results, out.with_suffix(".png"), title)
    return document


# ------------------------------------------------------------------------------------------ command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--duration", type=float, default=15.0, help="seconds during which requests start")
    p.add_argument("--concurrency", type=int, default=8, help="clients (most requests in flight)")
    p.add_argument("--out", type=Path, required=True, help="JSON result file; the plot goes next to it")
    p.add_argument("--rate", type=float, default=None, help="open loop: Poisson arrivals per second")
    p.add_argument("--max-requests", type=int, default=None, help="stop starting requests after this many")
    p.add_argument("--adapters", default=None, help="comma-separated model ids (default: GET /v1/models)")
    p.add_argument("--skew", type=float, default=0.0, help="Zipf exponent over adapters (0: uniform)")
    p.add_argument("--prompt-tokens", type=IntRange.parse, default=IntRange(32, 128), help="MIN:MAX tokens")
    p.add_argument("--max-tokens", type=IntRange.parse, default=IntRange(16, 64), help="MIN:MAX tokens")
    p.add_argument("--cancel-fraction", type=float, default=0.0, help="share of clients that hang up early")
    p.add_argument("--api-key", default=None, help="bearer key")
    p.add_argument("--chat", action="store_true", help="use /v1/chat/completions")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ask for exactly max_tokens (vLLM extension field ignore_eos)",
    )
    p.add_argument(
        "--grace", type=float, default=60.0, help="seconds to let requests finish after --duration"
    )
    p.add_argument("--timeout", type=float, default=120.0, help="per-request HTTP timeout (s)")
    p.add_argument("--seed", type=int, default=0)
    return p


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    if args.concurrency < 1 or args.duration <= 0:
        raise SystemExit("--concurrency must be >= 1 and --duration > 0")
    if args.rate is not None and args.rate <= 0:
        raise SystemExit("--rate must be > 0")
    if not 0.0 <= args.cancel_fraction <= 1.0:
        raise SystemExit("--cancel-fraction must be within [0, 1]")
    adapters = [a.strip() for a in args.adapters.split(",") if a.strip()] if args.adapters else []
    return LoadConfig(
        url=args.url,
        duration=args.duration,
        concurrency=args.concurrency,
        rate=args.rate,
        max_requests=args.max_requests,
        adapters=adapters,
        skew=args.skew,
        prompt_tokens=args.prompt_tokens,
        max_tokens=args.max_tokens,
        cancel_fraction=args.cancel_fraction,
        api_key=args.api_key,
        chat=args.chat,
        temperature=args.temperature,
        ignore_eos=args.ignore_eos,
        grace=args.grace,
        timeout=args.timeout,
        seed=args.seed,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    results, wall = asyncio.run(run_load(cfg))
    document = report(cfg, results, wall, args.out)
    print(format_table(document, document["per_adapter"]))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}")
    return 0 if document["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
