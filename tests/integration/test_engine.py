"""The engine on the demo bundle (NF4 on the CPU), against plain ``generate`` on the same PEFT model."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from peft import PeftModel

from server.bootstrap import build_engine
from server.config import Settings
from server.engine.engine import AsyncEngine
from server.engine.step_cost import StepCost
from server.engine.types import (
    ChatMessage,
    FinishReason,
    GenerationRequest,
    InvalidSamplingParamsError,
    PromptTooLongError,
    SamplingParams,
    UnknownModelError,
)
from server.runtime.loader import ModelSpec, load_model

PROMPTS = [
    "The cat",
    "The dog says",
    "Hello",
    "The owl lives in the barn. The cow lives in the field. The pig is pink and the dog",
]


@dataclass
class Result:
    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None
    first_token_at: float
    finished_at: float


@pytest.fixture(scope="module")
def engine(demo_bundle) -> Iterator[AsyncEngine]:  # type: ignore[no-untyped-def]
    settings = Settings(
        device="cpu",
        model=str(demo_bundle.base),
        adapter_dir=demo_bundle.adapters,
        max_num_seqs=16,
        max_model_len=512,
        max_gpu_adapters=8,
    )
    engine, store = build_engine(settings)
    engine.start()
    yield engine
    engine.stop()
    store.close()  # type: ignore[attr-defined]


def request(prompt: str, adapter: str | None = None, **sampling: object) -> GenerationRequest:
    params = {"max_tokens": 16, "temperature": 0.0, **sampling}
    return GenerationRequest(
        request_id=uuid.uuid4().hex, sampling=SamplingParams(**params), prompt=prompt, adapter=adapter
    )


async def collect(engine: AsyncEngine, req: GenerationRequest) -> Result:
    stream = engine.submit(req)
    tokens: list[int] = []
    text = ""
    first = 0.0
    reason = None
    async for event in stream:
        if event.token_ids and not tokens:
            first = time.monotonic()
        tokens.extend(event.token_ids)
        text += event.text
        reason = event.finish_reason
    return Result(tokens, text, reason, first, time.monotonic())


def run_all(engine: AsyncEngine, reqs: list[GenerationRequest]) -> list[Result]:
    async def main() -> list[Result]:
        return list(await asyncio.gather(*(collect(engine, r) for r in reqs)))

    return asyncio.run(main())


@pytest.fixture(scope="module")
def reference(demo_bundle):  # type: ignore[no-untyped-def]
    """A separate NF4 copy of the base with every demo adapter, for ``generate``."""
    base = load_model(ModelSpec(source=str(demo_bundle.base)))
    names = list(demo_bundle.adapter_names)
    model = PeftModel.from_pretrained(base, str(demo_bundle.adapters / names[0]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(demo_bundle.adapters / name), adapter_name=name)
    model.eval()
    return model


def generate(reference, engine: AsyncEngine, prompt: str, adapter: str | None, max_tokens: int) -> list[int]:  # type: ignore[no-untyped-def]
    ids = torch.tensor([engine.runner.tokenizer.encode(prompt)])
    with torch.inference_mode():
        if adapter is None:
            with reference.disable_adapter():
                out = reference.generate(ids, max_new_tokens=max_tokens, do_sample=False)
        else:
            reference.set_adapter(adapter)
            out = reference.generate(ids, max_new_tokens=max_tokens, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


def test_greedy_matches_generate_for_base_and_each_adapter(engine, reference, demo_bundle) -> None:  # type: ignore[no-untyped-def]
    for adapter in [None, *demo_bundle.adapter_names]:
        for prompt in PROMPTS[:2]:
            (got,) = run_all(engine, [request(prompt, adapter, max_tokens=24)])
            want = generate(reference, engine, prompt, adapter, 24)
            assert got.token_ids == want, f"adapter={adapter} prompt={prompt!r}"


def test_adapters_change_chat_output(engine, demo_bundle) -> None:  # type: ignore[no-untyped-def]
    names = [None, *demo_bundle.adapter_names]
    question = [ChatMessage(role="user", content="Tell me about the cat.")]
    reqs = [
        GenerationRequest(
            uuid.uuid4().hex, SamplingParams(max_tokens=24, temperature=0.0), messages=question, adapter=a
        )
        for a in names
    ]
    texts = [r.text for r in run_all(engine, reqs)]
    assert all(texts), texts
    assert len(set(texts)) == len(texts), texts


def test_twelve_concurrent_mixed_requests_equal_each_alone(engine, demo_bundle) -> None:  # type: ignore[no-untyped-def]
    adapters = [None, *demo_bundle.adapter_names[:3]]
    reqs = [
        request(PROMPTS[i % len(PROMPTS)] + " " * (i % 3), adapters[i % len(adapters)], max_tokens=4 + 3 * i)
        for i in range(12)
    ]
    together = run_all(engine, reqs)
    alone = [
        run_all(engine, [request(r.prompt, r.adapter, max_tokens=r.sampling.max_tokens)])[0] for r in reqs
    ]  # type: ignore[arg-type]
    for i, (t, a) in enumerate(zip(together, alone, strict=True)):
        assert t.token_ids == a.token_ids, f"request {i} ({reqs[i].adapter})"
        assert t.finish_reason == a.finish_reason


def test_late_arrival_starts_before_running_requests_finish(engine) -> None:  # type: ignore[no-untyped-def]
    """Ordered by events, not timed: the late request is submitted once every long one has a token, and
    must finish while each long one still has most of its tokens to go."""

    async def main() -> tuple[list[int], list[int], int]:
        counts = [0, 0, 0]
        started = asyncio.Event()

        async def long_one(i: int, prompt: str) -> None:
            async for event in engine.submit(request(prompt, max_tokens=120, ignore_eos=True)):
                counts[i] += len(event.token_ids)
                if all(counts):
                    started.set()

        long = [asyncio.ensure_future(long_one(i, p)) for i, p in enumerate(PROMPTS[:3])]
        await started.wait()
        late = await collect(engine, request(PROMPTS[3], max_tokens=2))
        at_late_finish = list(counts)
        await asyncio.gather(*long)
        return at_late_finish, counts, len(late.token_ids)

    at_late_finish, final, late_tokens = asyncio.run(main())
    assert late_tokens == 2
    assert final == [120, 120, 120]
    assert max(at_late_finish) < 60, at_late_finish  # the late one did not wait for them to finish


def test_abort_frees_the_row_at_the_next_step(engine) -> None:  # type: ignore[no-untyped-def]
    async def main() -> Result:
        req = request(PROMPTS[0], max_tokens=400, ignore_eos=True)
        stream = engine.submit(req)
        tokens: list[int] = []
        reason = None
        async for event in stream:
            tokens.extend(event.token_ids)
            if len(tokens) == 3:
                engine.abort(req.request_id, reason="test")
            reason = event.finish_reason
        return Result(tokens, "", reason, 0.0, 0.0)

    result = asyncio.run(main())
    assert result.finish_reason is FinishReason.ABORT
    assert len(result.token_ids) <= 5  # the abort lands within a step or two, not after 400 tokens
    deadline = time.monotonic() + 2
    while engine.scheduler.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.scheduler.num_free_slots == engine.runner.num_slots


def test_seed_reproducible_and_seeds_differ(engine, demo_bundle) -> None:  # type: ignore[no-untyped-def]
    adapter = demo_bundle.adapter_names[0]
    sampled = {"temperature": 1.5, "top_p": 0.95, "max_tokens": 24, "ignore_eos": True}
    a, b, c = run_all(
        engine,
        [
            request(PROMPTS[1], adapter, seed=7, **sampled),
            request(PROMPTS[1], adapter, seed=7, **sampled),
            request(PROMPTS[1], adapter, seed=8, **sampled),
        ],
    )
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids
    (alone,) = run_all(engine, [request(PROMPTS[1], adapter, seed=7, **sampled)])
    assert alone.token_ids == a.token_ids


def test_stop_string_ends_with_stop_and_is_not_emitted(engine) -> None:  # type: ignore[no-untyped-def]
    (free,) = run_all(engine, [request(PROMPTS[0], max_tokens=24)])
    assert len(free.text) > 6
    stop = free.text[3:6]
    (stopped,) = run_all(engine, [request(PROMPTS[0], max_tokens=24, stop=(stop,))])
    assert stopped.finish_reason is FinishReason.STOP
    assert stop not in stopped.text
    assert free.text.startswith(stopped.text)
    assert stopped.text == free.text[: free.text.index(stop)]


def test_length_finish_reason_and_usage(engine) -> None:  # type: ignore[no-untyped-def]
    (r,) = run_all(engine, [request(PROMPTS[0], max_tokens=5, ignore_eos=True)])
    assert r.finish_reason is FinishReason.LENGTH
    assert len(r.token_ids) == 5


def test_bad_requests_are_refused_before_admission(engine) -> None:  # type: ignore[no-untyped-def]
    async def submit(req: GenerationRequest) -> None:
        engine.submit(req)

    with pytest.raises(PromptTooLongError) as too_long:
        asyncio.run(submit(request("word " * 600)))
    assert too_long.value.status == 400
    with pytest.raises(PromptTooLongError) as budget:
        asyncio.run(submit(request(PROMPTS[0], max_tokens=510)))
    assert budget.value.param == "max_tokens"
    with pytest.raises(UnknownModelError):
        asyncio.run(submit(request(PROMPTS[0], adapter="no-such-adapter")))
    for bad in ({"temperature": float("nan")}, {"top_p": 0.0}, {"max_tokens": -1}, {"top_k": 1.5}):
        with pytest.raises(InvalidSamplingParamsError):
            request(PROMPTS[0], **bad)
    (ok,) = run_all(engine, [request(PROMPTS[0], max_tokens=3)])
    assert len(ok.token_ids) == 3


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(engine, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    real_step = engine.runner.step
    calls = {"n": 0}

    def flaky_step(batch):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected fault")
        return real_step(batch)

    monkeypatch.setattr(engine.runner, "step", flaky_step)
    results = run_all(engine, [request(p, max_tokens=8, ignore_eos=True) for p in PROMPTS[:3]])
    failed = [r for r in results if r.finish_reason is FinishReason.ERROR]
    assert failed, "the injected fault failed no request"
    # requests outside the failing step run to the end
    assert all(len(r.token_ids) == 8 for r in results if r.finish_reason is not FinishReason.ERROR)
    monkeypatch.setattr(engine.runner, "step", real_step)
    (after,) = run_all(engine, [request(PROMPTS[0], max_tokens=4, ignore_eos=True)])
    assert after.finish_reason is FinishReason.LENGTH and len(after.token_ids) == 4


class RecordedStepCost(StepCost):
    """The engine's StepCost, recording what it is told."""

    def __init__(self, floor: int, ceiling: int, ratio: float) -> None:
        super().__init__(floor=floor, ceiling=ceiling, ratio=ratio)
        self.observed: list[tuple[int, int]] = []

    def observe(self, decode_rows: int, prompt_tokens: int, seconds: float) -> None:
        assert seconds > 0
        self.observed.append((decode_rows, prompt_tokens))
        super().observe(decode_rows, prompt_tokens, seconds)


def test_on_the_cpu_every_step_feeds_the_measured_cap_the_next_step_keeps(engine, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Step counts and compositions, not times: every step is observed once with its decode rows and
    prompt tokens, the scheduler asks the fit for each step's allowance, and each step's prompt tokens
    beside decode rows stay within the allowance for its decode rows."""
    default = engine.step_cost
    assert default is not None  # the default on the CPU
    assert engine.scheduler.prompt_cap == default.allowance
    cost = RecordedStepCost(default.floor, default.ceiling, default.ratio)
    steps: list[tuple[int, int, int]] = []  # decode rows, prompt tokens, allowance in force
    real_step = engine.runner.step

    def step(batch):  # type: ignore[no-untyped-def]
        rows = sum(1 for i in range(len(batch)) if not batch.is_prefill(i))
        prompt = sum(n for i, n in enumerate(batch.num_new_tokens) if batch.is_prefill(i))
        steps.append((rows, prompt, cost.allowance(rows)))
        return real_step(batch)

    monkeypatch.setattr(engine.runner, "step", step)
    monkeypatch.setattr(engine, "step_cost", cost)
    monkeypatch.setattr(engine.scheduler, "prompt_cap", cost.allowance)

    async def main() -> None:
        counts = [0, 0, 0]
        decoded = asyncio.Event()

        async def decode(i: int, prompt: str) -> None:
            async for event in engine.submit(request(prompt, max_tokens=40, ignore_eos=True)):
                counts[i] += len(event.token_ids)
                if min(counts) >= 4:
                    decoded.set()

        decoding = [asyncio.ensure_future(decode(i, p)) for i, p in enumerate(PROMPTS[:3])]
        await decoded.wait()  # decode steps alone first, then a long prompt beside them
        await collect(engine, request(" ".join(PROMPTS) * 6, max_tokens=2))
        await asyncio.gather(*decoding)

    asyncio.run(main())
    assert cost.observed == [(rows, prompt) for rows, prompt, _ in steps]
    assert any(rows and prompt for rows, prompt, _ in steps), "no step had a prompt chunk beside decode rows"
    for rows, prompt, allowance in steps:
        if rows:
            assert prompt <= allowance, (rows, prompt, allowance)
    assert cost.decode_s(1) is not None and cost.token_s is not None  # both measured
    assert cost.allowance(1) >= cost.floor + 1 == 8 + 1
