"""Continuous batching, measured: N requests over the demo adapters submitted together, against the same N
submitted one after another, through the same in-process engine (issue 3's figure).

    python benchmarks/engine_concurrency.py --requests 16 --max-tokens 64 --out results.json

Prints tokens/s for both and their ratio; ratios from one run are what to compare across machines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time
import uuid
from pathlib import Path

from server.bootstrap import build_engine
from server.config import Settings
from server.engine.engine import AsyncEngine
from server.engine.types import GenerationRequest, SamplingParams

PROMPTS = ["Tell me about the cat.", "What does the dog eat?", "Hello", "Where does the owl live?"]


def make_requests(engine: AsyncEngine, n: int, max_tokens: int) -> list[GenerationRequest]:
    adapters: list[str | None] = [None, *engine.adapter_names()]
    return [
        GenerationRequest(
            request_id=uuid.uuid4().hex,
            sampling=SamplingParams(max_tokens=max_tokens, temperature=0.7, seed=i, ignore_eos=True),
            prompt=PROMPTS[i % len(PROMPTS)],
            adapter=adapters[i % len(adapters)],
        )
        for i in range(n)
    ]


async def run_one(engine: AsyncEngine, request: GenerationRequest) -> int:
    tokens = 0
    async for event in engine.submit(request):
        tokens += len(event.token_ids)
    return tokens


async def measure(engine: AsyncEngine, n: int, max_tokens: int) -> dict[str, object]:
    await run_one(engine, make_requests(engine, 1, 4)[0])  # warm-up: loads adapters, first kernels
    for adapter_request in make_requests(engine, len(engine.adapter_names()) + 1, 2):
        await run_one(engine, adapter_request)
    started = time.perf_counter()
    together = sum(await asyncio.gather(*(run_one(engine, r) for r in make_requests(engine, n, max_tokens))))
    concurrent_s = time.perf_counter() - started
    started = time.perf_counter()
    alone = 0
    for request in make_requests(engine, n, max_tokens):
        alone += await run_one(engine, request)
    sequential_s = time.perf_counter() - started
    return {
        "requests": n,
        "max_tokens": max_tokens,
        "concurrent_tokens_per_s": together / concurrent_s,
        "sequential_tokens_per_s": alone / sequential_s,
        "ratio": (together / concurrent_s) / (alone / sequential_s),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--model", default=None, help="base model folder (default: the demo bundle)")
    parser.add_argument("--adapter-dir", type=Path, default=None)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    settings = Settings(
        model=args.model, adapter_dir=args.adapter_dir, device=args.device, max_num_seqs=max(args.requests, 1)
    )
    engine, store = build_engine(settings)
    engine.start()
    try:
        result = asyncio.run(measure(engine, args.requests, args.max_tokens))
    finally:
        engine.stop()
        getattr(store, "close", lambda: None)()
    result["machine"] = f"{platform.machine()} {platform.processor() or ''}".strip()
    result["device"] = str(getattr(engine.runner, "device", "?"))
    print(json.dumps(result, indent=2))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
