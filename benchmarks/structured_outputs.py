"""What structured outputs cost, measured: the same batch of requests over the demo adapters with no row
constrained and with half the rows constrained by a JSON schema, alternating rounds in one run through the
same in-process engine; and the per-step mask cost (host bitmask fill for the constrained rows, then the
unpack and ``-inf`` fill on the device) at several batch sizes.

The schema (an array of at least ``max_tokens`` digits) cannot complete before ``max_tokens``, so both
variants produce the same number of tokens (every row finishes ``length``).

    python -m benchmarks.structured_outputs --requests 8 --max-tokens 32 --rounds 3 --out results.json
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
from typing import Any

import torch

from server.bootstrap import build_engine
from server.config import Settings
from server.engine.engine import AsyncEngine
from server.engine.types import GenerationRequest, SamplingParams
from server.runtime.token_bitmask import allowed_tokens, fill_token_bitmask
from server.runtime.tokenizer import HFTokenizer
from server.structured.grammar import GrammarCompiler, GrammarSpec

PROMPTS = ["Tell me about the cat.", "What does the dog eat?", "Hello", "Where does the owl live?"]


def digits_schema(max_tokens: int) -> GrammarSpec:
    items = {"type": "integer", "minimum": 0, "maximum": 9}
    return GrammarSpec.json_schema({"type": "array", "items": items, "minItems": max_tokens}, "bench")


def compiler_for(engine: AsyncEngine) -> GrammarCompiler:
    tokenizer = engine.runner.tokenizer
    assert isinstance(tokenizer, HFTokenizer)
    eos = sorted(tokenizer.eos_token_ids)
    return GrammarCompiler(tokenizer.hf, vocab_size=engine.runner.vocab_size, eos_token_ids=eos)


def make_requests(
    engine: AsyncEngine, compiler: GrammarCompiler, n: int, max_tokens: int, constrained: int
) -> list[GenerationRequest]:
    """``n`` requests, adapters round-robin; every other one of the first ``2 * constrained`` is constrained."""
    adapters: list[str | None] = [None, *engine.adapter_names()]
    spec = digits_schema(max_tokens)
    return [
        GenerationRequest(
            request_id=uuid.uuid4().hex,
            sampling=SamplingParams(max_tokens=max_tokens, temperature=0.7, seed=i, ignore_eos=True),
            prompt=PROMPTS[i % len(PROMPTS)],
            adapter=adapters[i % len(adapters)],
            constraint=compiler.compile(spec) if i % 2 == 0 and i // 2 < constrained else None,
        )
        for i in range(n)
    ]


async def run_batch(engine: AsyncEngine, requests: list[GenerationRequest]) -> tuple[int, float]:
    t0 = time.perf_counter()
    tokens = 0
    async for event in engine.submit_many(requests):
        tokens += len(event.token_ids)
    return tokens, time.perf_counter() - t0


def mask_step_ms(
    compiler: GrammarCompiler, vocab: int, rows: int, device: torch.device, repeats: int
) -> dict[str, float]:
    """Median ms of one step's mask work for ``rows`` constrained rows: host fill, and fill + device apply."""
    constraints = [(r, compiler.compile(digits_schema(64))) for r in range(rows)]
    logits = torch.zeros(rows, vocab, device=device)
    fill, total = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        bitmask = fill_token_bitmask(rows, vocab, constraints)
        t1 = time.perf_counter()
        masked = logits.masked_fill(~allowed_tokens(bitmask.to(device), vocab), float("-inf"))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        del masked
        t2 = time.perf_counter()
        fill.append(t1 - t0)
        total.append(t2 - t0)
    return {
        "fill_ms": round(1000 * statistics.median(fill), 4),
        "fill_and_apply_ms": round(1000 * statistics.median(total), 4),
    }


async def measure(engine: AsyncEngine, n: int, max_tokens: int, rounds: int) -> dict[str, Any]:
    compiler = compiler_for(engine)
    t0 = time.perf_counter()
    compiler.compile(digits_schema(max_tokens))
    compile_ms = 1000 * (time.perf_counter() - t0)
    await run_batch(engine, make_requests(engine, compiler, 4, 4, 1))  # warm-up
    variants = {"none_constrained": 0, "half_constrained": n // 2}
    rates: dict[str, list[float]] = {name: [] for name in variants}
    tokens_seen = dict.fromkeys(variants, 0)
    for _ in range(rounds):  # alternate, so drift on a shared box hits every variant alike
        for name, constrained in variants.items():
            tokens, seconds = await run_batch(
                engine, make_requests(engine, compiler, n, max_tokens, constrained)
            )
            rates[name].append(tokens / seconds)
            tokens_seen[name] += tokens
    best = {name: statistics.median(values) for name, values in rates.items()}
    vocab = engine.runner.vocab_size
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    masks = {
        d.type: {str(rows): mask_step_ms(compiler, vocab, rows, d, 50) for rows in (1, 4, 16)}
        for d in devices
    }
    return {
        "requests": n,
        "max_tokens": max_tokens,
        "rounds": rounds,
        "vocab_size": vocab,
        "tokens_per_s": {k: round(v, 1) for k, v in best.items()},
        "ratio_half_to_none": round(best["half_constrained"] / best["none_constrained"], 3),
        "output_tokens": tokens_seen,
        "schema_compile_ms": round(compile_ms, 3),
        "mask_ms_per_step": masks,
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
