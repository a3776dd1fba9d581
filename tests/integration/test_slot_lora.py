"""The engine with slot LoRA routing on (forced on the CPU) against the engine on PEFT's mixed-batch forward
(the reference path): greedy tokens must be identical, for mixed batches and across slot reuse.

Both engines run the demo bundle (NF4, float32 compute on the CPU); the demo's greedy margins are wide, so
the slot path's different float32 summation order (differences ~1e-6 in the logits) never flips a token.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import pytest

from server.bootstrap import build_engine
from server.config import Settings
from server.engine.engine import AsyncEngine
from server.engine.types import GenerationRequest, SamplingParams
from server.runtime import model_runner

PROMPTS = ["Tell me about the cat.", "What does the dog eat?", "Hello", "Where does the owl live?"]


def _engine(
    demo_bundle, *, slot_lora: bool, max_gpu_adapters: int, **more: object
) -> tuple[AsyncEngine, object]:  # type: ignore[no-untyped-def]
    settings = Settings(
        device="cpu",
        demo_dir=demo_bundle.root.parent,
        max_num_seqs=8,
        max_model_len=256,
        max_gpu_adapters=max_gpu_adapters,
        max_loras_per_batch=max_gpu_adapters,
        **more,  # type: ignore[arg-type]
    )
    plain = model_runner.ModelRunner

    class Runner(plain):  # type: ignore[misc,valid-type]
        def __init__(self, **kwargs: object) -> None:
            super().__init__(**kwargs, slot_lora=slot_lora)  # type: ignore[arg-type]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(model_runner, "ModelRunner", Runner)
        return build_engine(settings)


@pytest.fixture(scope="module")
def engines(demo_bundle) -> Iterator[tuple[AsyncEngine, AsyncEngine]]:  # type: ignore[no-untyped-def]
    slot, slot_store = _engine(demo_bundle, slot_lora=True, max_gpu_adapters=2)
    peft, peft_store = _engine(demo_bundle, slot_lora=False, max_gpu_adapters=8)
    slot.start()
    peft.start()
    yield slot, peft
    for engine, store in ((slot, slot_store), (peft, peft_store)):
        engine.stop()
        store.close()  # type: ignore[attr-defined]


def _request(prompt: str, adapter: str | None, max_tokens: int) -> GenerationRequest:
    return GenerationRequest(
        request_id=uuid.uuid4().hex,
        sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0),
        prompt=prompt,
        adapter=adapter,
    )


def _run(engine: AsyncEngine, reqs: list[tuple[str, str | None, int]]) -> list[list[int]]:
    async def one(req: GenerationRequest) -> list[int]:
        tokens: list[int] = []
        async for event in engine.submit(req):
            tokens.extend(event.token_ids)
        return tokens

    async def main() -> list[list[int]]:
        return list(await asyncio.gather(*(one(_request(*r)) for r in reqs)))

    return asyncio.run(main())


def test_runner_uses_slot_lora(engines) -> None:  # type: ignore[no-untyped-def]
    slot, peft = engines
    assert slot.runner.slot_lora is not None and slot.runner.slot_lora.enabled
    assert peft.runner.slot_lora is None


def test_mixed_batch_equals_peft_reference(engines, demo_bundle) -> None:  # type: ignore[no-untyped-def]
    slot, peft = engines
    adapters = [None, *demo_bundle.adapter_names[:2]]  # two adapters: both fit the two GPU slots
    reqs = [(PROMPTS[i % len(PROMPTS)], adapters[i % len(adapters)], 6 + 2 * i) for i in range(6)]
    assert _run(slot, reqs) == _run(peft, reqs)


def test_slot_reuse_after_eviction(engines, demo_bundle) -> None:  # type: ignore[no-untyped-def]
    """More adapters than the two GPU slots, one after another: each eviction zeroes a slot and the next
    adapter takes it; every output still equals the reference."""
    slot, peft = engines
    names = list(demo_bundle.adapter_names)
    assert len(names) >= 3
    for name in [*names, names[0]]:
        reqs = [(PROMPTS[0], name, 8), (PROMPTS[2], None, 8)]
        assert _run(slot, reqs) == _run(peft, reqs), name
    store = slot.runner.store
    assert store is not None
    resident = [a.name for a in store.adapters() if a.tier == "gpu"]  # type: ignore[attr-defined]
    assert len(resident) <= 2


def test_decode_graph_step_equals_eager_decode(engines, demo_bundle) -> None:  # type: ignore[no-untyped-def]
    """The graph step's buffers and tensor work (run eagerly on the CPU: no capture there) give the same
    greedy tokens as the runner's eager decode, for a batch with holes (free slots) and mixed adapters."""
    slot, peft = engines
    runner = slot.runner
    before = _run(slot, [(PROMPTS[1], None, 12), (PROMPTS[3], demo_bundle.adapter_names[0], 12)])
    runner.graphs = runner.new_decode_graphs()
    try:
        reqs = [(PROMPTS[i % 4], [None, demo_bundle.adapter_names[0]][i % 2], 6 + 3 * i) for i in range(5)]
        together = _run(slot, reqs)
        assert runner.graphs.num_graphs > 0
        after = _run(slot, [(PROMPTS[1], None, 12), (PROMPTS[3], demo_bundle.adapter_names[0], 12)])
    finally:
        runner.graphs = None
    assert after == before
    assert together == _run(peft, reqs)


def test_preloaded_adapters_wait_in_the_cpu_tier_in_slot_form(engines, demo_bundle) -> None:  # type: ignore[no-untyped-def]
    from server.runtime.slot_lora import SlotWeights

    _, peft = engines
    engine, store = _engine(demo_bundle, slot_lora=True, max_gpu_adapters=2, preload_adapters=True)
    engine.start()
    try:
        deadline = time.monotonic() + 60
        while {a.tier for a in store.adapters()} != {"cpu"}:  # type: ignore[attr-defined]
            assert time.monotonic() < deadline, "preload never finished"
            time.sleep(0.05)
        assert all(isinstance(a.prepared, SlotWeights) for a in store._cpu.values())  # type: ignore[attr-defined]
        reqs = [(PROMPTS[0], demo_bundle.adapter_names[1], 8), (PROMPTS[1], None, 8)]
        assert _run(engine, reqs) == _run(peft, reqs)
    finally:
        engine.stop()
        store.close()  # type: ignore[attr-defined]


def test_concurrent_requests_over_more_adapters_than_slots(engines, demo_bundle) -> None:  # type: ignore[no-untyped-def]
    """Three adapters and the base at once through two GPU slots: the third adapter waits, then takes a slot
    freed mid-run while other rows keep decoding. Every output equals the reference."""
    slot, peft = engines
    names = [None, *demo_bundle.adapter_names]
    reqs = [(PROMPTS[i % len(PROMPTS)], names[i % len(names)], 5 + 3 * (i % 3)) for i in range(10)]
    assert _run(slot, reqs) == _run(peft, reqs)
