"""Paged KV capacity on the demo bundle: the KV budget of 32 whole-context slots at ``--max-model-len 2048``
(what the static slot cache reserved) runs at least 4x as many 256-token sequences at once, and every one
of them finishes with its full output."""

from __future__ import annotations

import asyncio
import uuid

from server.bootstrap import build_engine
from server.config import Settings
from server.engine.engine import AsyncEngine
from server.engine.types import FinishReason, GenerationRequest, SamplingParams

SLOTS_BEFORE = 32
CONTEXT = 2048
PROMPT, OUTPUT = 200, 56  # 256-token sequences
REQUESTS = 4 * SLOTS_BEFORE + 8


def _settings(demo_bundle, **extra: object) -> Settings:  # type: ignore[no-untyped-def]
    return Settings(
        device="cpu",
        model=str(demo_bundle.base),
        adapter_dir=demo_bundle.adapters,
        max_model_len=CONTEXT,
        **extra,  # type: ignore[arg-type]
    )


async def _run(
    engine: AsyncEngine, requests: list[GenerationRequest]
) -> tuple[list[FinishReason | None], int]:
    peak = 0
    done = asyncio.Event()

    async def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, len(engine.scheduler.running))
            await asyncio.sleep(0.005)

    async def one(req: GenerationRequest) -> FinishReason | None:
        reason = None
        async for event in engine.submit(req):
            reason = event.finish_reason
        return reason

    watcher = asyncio.create_task(watch())
    reasons = await asyncio.gather(*(one(r) for r in requests))
    done.set()
    await watcher
    return list(reasons), peak


def test_the_slot_caches_budget_runs_four_times_more_256_token_sequences(demo_bundle) -> None:  # type: ignore[no-untyped-def]
    sizing, sizing_store = build_engine(_settings(demo_bundle, max_num_seqs=SLOTS_BEFORE))
    per_token = sizing.runner.kv.geometry.bytes_per_token  # type: ignore[attr-defined]
    sizing_store.close()  # type: ignore[attr-defined]
    budget = SLOTS_BEFORE * CONTEXT * per_token  # the static cache: 32 slots of the whole context
    engine, store = build_engine(
        # prompts admitted as fast as the budget allows (no cap beside decode rows, which trades the ramp-up
        # for inter-token latency): what is measured is how many sequences the KV memory holds
        _settings(
            demo_bundle,
            max_num_seqs=256,
            kv_cache_memory=budget,
            max_num_batched_tokens=2048,
            prefill_beside_decode=2048,
        )
    )
    assert engine.runner.kv.nbytes <= budget + 2 * engine.runner.kv.block_size * per_token  # type: ignore[attr-defined]
    engine.start()
    try:
        vocab = engine.runner.tokenizer.num_ids  # type: ignore[attr-defined]
        requests = [
            GenerationRequest(
                request_id=uuid.uuid4().hex,
                sampling=SamplingParams(max_tokens=OUTPUT, temperature=0.0, ignore_eos=True),
                prompt=[(7 * i + j) % (vocab - 1) + 1 for j in range(PROMPT)],  # distinct: no shared prefix
            )
            for i in range(REQUESTS)
        ]
        reasons, peak = asyncio.run(_run(engine, requests))
    finally:
        engine.stop()
        store.close()  # type: ignore[attr-defined]
    assert reasons == [FinishReason.LENGTH] * REQUESTS
    assert peak >= 4 * SLOTS_BEFORE


def test_preempted_sequences_recompute_and_still_match_generate(demo_bundle) -> None:  # type: ignore[no-untyped-def]
    """A pool of one 128-token context for four 70-token requests: running ones are preempted (newest
    first) and recomputed, and each one's greedy tokens still equal plain PEFT ``generate``."""
    import torch
    from peft import PeftModel

    from server.runtime.loader import ModelSpec, load_model

    engine, store = build_engine(
        Settings(
            device="cpu",
            model=str(demo_bundle.base),
            adapter_dir=demo_bundle.adapters,
            max_model_len=128,
            max_num_seqs=4,
            kv_cache_memory=1,  # the floor: one whole context (8 blocks of 16)
            prefix_caching=False,
        )
    )
    adapters = [None, *demo_bundle.adapter_names[:1]]
    prompts = ["The cat sat on the mat and the dog", "Hello there, my friend", "The owl lives", "Where is it"]
    requests = [
        GenerationRequest(
            request_id=uuid.uuid4().hex,
            sampling=SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True),
            prompt=p,
            adapter=adapters[i % 2],
        )
        for i, p in enumerate(prompts)
    ]

    async def collect(req: GenerationRequest) -> list[int]:
        tokens: list[int] = []
        async for event in engine.submit(req):
            tokens.extend(event.token_ids)
        return tokens

    async def main() -> list[list[int]]:
        return list(await asyncio.gather(*(collect(r) for r in requests)))

    engine.start()
    try:
        got = asyncio.run(main())
        preemptions = engine.scheduler.num_preemptions
        tokenizer = engine.runner.tokenizer
    finally:
        engine.stop()
        store.close()  # type: ignore[attr-defined]
    assert preemptions > 0
    base = load_model(ModelSpec(source=str(demo_bundle.base)))
    name = demo_bundle.adapter_names[0]
    reference = PeftModel.from_pretrained(base, str(demo_bundle.adapters / name), adapter_name=name).eval()
    for req, tokens in zip(requests, got, strict=True):
        assert isinstance(req.prompt, str)
        ids = torch.tensor([tokenizer.encode(req.prompt)])
        with torch.inference_mode():
            if req.adapter is None:
                with reference.disable_adapter():
                    out = reference.generate(ids, max_new_tokens=50, do_sample=False)
            else:
                out = reference.generate(ids, max_new_tokens=50, do_sample=False)
        want = out[0, ids.shape[1] :].tolist()  # generate stops at EOS; the engine ignores it
        assert tokens[: len(want)] == want, req.prompt
