"""What logprobs cost, measured: the same batch of requests over the demo adapters with and without
``logprobs`` (top 5 per token), alternating rounds in one run through the same in-process engine; and a mixed
batch where only half the requests ask, to see what the others pay.

    python -m benchmarks.logprobs_cost --requests 8 --max-tokens 32 --rounds 3 --out results.json

Prints tokens/s of each variant (median over rounds) and their ratio to the batch without logprobs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time
import uuid
from pathlib import Path

from server.bootstrap import build_engine
from server.config import Settings
from server.engine.engine import AsyncEngine
from server.engine.types import GenerationRequest, SamplingParams

PROMPTS = ["Tell me about the cat.", "What does the dog eat?", "Hello", "Where does the owl live?"]
TOP = 5


def make_requests(engine: AsyncEngine, n: int, max_tokens: int, asking: int) -> list[GenerationRequest]:
    """``n`` requests; the first ``asking`` of them ask for logprobs."""
    adapters: list[str | None] = [None, *engine.adapter_names()]
    return [
        GenerationRequest(
            request_id=uuid.uuid4().hex,
            sampling=SamplingParams(
                max_tokens=max_tokens,
                temperature=0.7,
                seed=i,
                ignore_eos=True,
                logprobs=TOP if i < asking else None,
            ),
            prompt=PROMPTS[i % len(PROMPTS)],
            adapter=adapters[i % len(adapters)],
        )
        for i in range(n)
    ]


async def run_batch(engine: AsyncEngine, requests: list[GenerationRequest]) -> tuple[int, int, float]:
    """Output tokens, tokens that came with logprobs, seconds."""
    t0 = time.perf_counter()
    tokens = with_logprobs = 0
    async for event in engine.submit_many(requests):
        tokens += len(event.token_ids)
        with_logprobs += len(event.logprobs)
    return tokens, with_logprobs, time.perf_counter() - t0


async def measure(engine: AsyncEngine, n: int, max_tokens: int, rounds: int) -> dict[str, object]:
    await run_batch(engine, make_requests(engine, len(engine.adapter_names()) + 1, 4, 1))  # warm-up
    variants = {"without": 0, "all_with": n, "half_with": n // 2}
    rates: dict[str, list[float]] = {name: [] for name in variants}
    logprob_tokens = dict.fromkeys(variants, 0)
    for _ in range(rounds):  # alternate, so drift on a shared box hits every variant alike
        for name, asking in variants.items():
            tokens, with_logprobs, seconds = await run_batch(
                engine, make_requests(engine, n, max_tokens, asking)
            )
            rates[name].append(tokens / seconds)
            logprob_tokens[name] += with_logprobs
    best = {name: statistics.median(values) for name, values in rates.items()}
    base = best["without"]
    return {
        "requests": n,
        "max_tokens": max_tokens,
        "top_logprobs": TOP,
        "rounds": rounds,
        "tokens_per_s": {k: round(v, 1) for k, v in best.items()},
        "ratio_to_without": {k: round(v / base, 3) for k, v in best.items()},
        "tokens_with_logprobs": logprob_tokens,
        "machine": platform.processor() or platform.machine(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    settings = Settings(device=args.device, max_num_seqs=max(args.requests, 1), max_model_len=256)
    engine, store = build_engine(settings)
    engine.start()
    try:
        result = asyncio.run(measure(engine, args.requests, args.max_tokens, args.rounds))
    finally:
        engine.stop()
        store.close()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
