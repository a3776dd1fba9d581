"""Prefix caching and chunked prefill on the demo bundle (NF4 on the CPU), against plain PEFT ``generate`` on
a freshly loaded model: a repeated prompt hits the cache and still gives the reference tokens; two adapters
never share blocks; an adapter reloaded with new weights under the same name misses; ``cached_tokens``
reaches the OpenAI usage object and the vLLM metrics count queries and hits."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from server.bootstrap import build_engine
from server.config import Settings
from server.engine.engine import AsyncEngine
from server.engine.types import GenerationRequest, SamplingParams, TokenEvent
from server.runtime.loader import ModelSpec, load_model
from tests.integration.api_server import ServerProcess, start_server

BLOCK = 16
# long enough for several full blocks of the demo tokenizer
SYSTEM = "The owl lives in the barn. The cow lives in the field. The pig is pink and the dog barks. " * 3


@pytest.fixture(scope="module")
def engine(demo_bundle) -> Iterator[AsyncEngine]:  # type: ignore[no-untyped-def]
    settings = Settings(
        device="cpu",
        model=str(demo_bundle.base),
        adapter_dir=demo_bundle.adapters,
        max_num_seqs=8,
        max_model_len=512,
        max_num_batched_tokens=32,  # small: long prompts run in chunks next to decode rows
    )
    engine, store = build_engine(settings)
    engine.start()
    yield engine
    engine.stop()
    store.close()  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def reference(demo_bundle):  # type: ignore[no-untyped-def]
    base = load_model(ModelSpec(source=str(demo_bundle.base)))
    names = list(demo_bundle.adapter_names)
    model = PeftModel.from_pretrained(base, str(demo_bundle.adapters / names[0]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(demo_bundle.adapters / name), adapter_name=name)
    model.eval()
    return model


def generate(reference, engine: AsyncEngine, prompt: str, adapter: str | None, n: int) -> list[int]:  # type: ignore[no-untyped-def]
    ids = torch.tensor([engine.runner.tokenizer.encode(prompt)])
    with torch.inference_mode():
        if adapter is None:
            with reference.disable_adapter():
                out = reference.generate(ids, max_new_tokens=n, do_sample=False)
        else:
            reference.set_adapter(adapter)
            out = reference.generate(ids, max_new_tokens=n, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


def request(prompt: str, adapter: str | None = None, max_tokens: int = 12) -> GenerationRequest:
    return GenerationRequest(
        request_id=uuid.uuid4().hex,
        sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
        prompt=prompt,
        adapter=adapter,
    )


async def _collect(engine: AsyncEngine, req: GenerationRequest) -> tuple[list[int], TokenEvent]:
    tokens: list[int] = []
    last = None
    async for event in engine.submit(req):
        tokens.extend(event.token_ids)
        last = event
    assert last is not None and last.error is None
    return tokens, last


def run(engine: AsyncEngine, *reqs: GenerationRequest) -> list[tuple[list[int], TokenEvent]]:
    async def main() -> list[tuple[list[int], TokenEvent]]:
        return list(await asyncio.gather(*(_collect(engine, r) for r in reqs)))

    return asyncio.run(main())


def full_blocks(engine: AsyncEngine, prompt: str) -> int:
    """Tokens of the prompt's full blocks that a hit reuses (at least one token is always computed)."""
    n = len(engine.runner.tokenizer.encode(prompt))
    return (n - 1) // BLOCK * BLOCK


def test_a_repeated_prompt_hits_and_matches_generate(engine, reference) -> None:  # type: ignore[no-untyped-def]
    prompt = SYSTEM + " Question one:"
    want = generate(reference, engine, prompt, None, 12)
    ((first, first_end),) = run(engine, request(prompt))
    ((again, again_end),) = run(engine, request(prompt))
    assert first_end.cached_tokens == 0
    assert again_end.cached_tokens == full_blocks(engine, prompt) > 0
    assert first == want and again == want


def test_a_shared_prefix_hits_for_a_different_question(engine, reference, demo_bundle) -> None:  # type: ignore[no-untyped-def]
    adapter = demo_bundle.adapter_names[0]
    run(engine, request(SYSTEM + " Tell me about the owl.", adapter))
    prompt = SYSTEM + " Tell me about the pig, please."
    ((got, end),) = run(engine, request(prompt, adapter))
    assert end.cached_tokens > 0
    assert got == generate(reference, engine, prompt, adapter, 12)


def test_two_adapters_with_the_same_prompt_never_share_blocks(engine, reference, demo_bundle) -> None:  # type: ignore[no-untyped-def]
    a, b = demo_bundle.adapter_names[:2]
    prompt = "Two adapters read this. " + SYSTEM  # a first block no other test sent
    ((got_a, end_a),) = run(engine, request(prompt, a))
    ((got_b, end_b),) = run(engine, request(prompt, b))
    ((got_base, end_base),) = run(engine, request(prompt))
    assert (end_a.cached_tokens, end_b.cached_tokens, end_base.cached_tokens) == (0, 0, 0)
    assert got_a == generate(reference, engine, prompt, a, 12)
    assert got_b == generate(reference, engine, prompt, b, 12)
    assert got_base == generate(reference, engine, prompt, None, 12)
    ((_, again_b),) = run(engine, request(prompt, b))
    assert again_b.cached_tokens > 0


def test_concurrent_chunked_prompts_match_generate(engine, reference, demo_bundle) -> None:  # type: ignore[no-untyped-def]
    names = [None, *demo_bundle.adapter_names[:2]]
    prompts = [f"Variant {i}. " + SYSTEM for i in range(3)]
    reqs = [request(p, a, 10) for p in prompts for a in names]
    results = run(engine, *reqs)
    for req, (tokens, _) in zip(reqs, results, strict=True):
        assert isinstance(req.prompt, str)
        assert tokens == generate(reference, engine, req.prompt, req.adapter, 10)


# ------------------------------------------------------------------ an adapter reloaded under the same name


def _perturbed_copy(src: Path, dst: Path) -> None:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    weights = load_file(str(dst / "adapter_model.safetensors"))
    save_file({k: v * 3.0 + 0.01 for k, v in weights.items()}, str(dst / "adapter_model.safetensors"))


def test_reloading_an_adapter_with_new_weights_misses(demo_bundle, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    name = demo_bundle.adapter_names[0]
    shutil.copytree(demo_bundle.adapters / name, tmp_path / "adapters" / "tenant")
    settings = Settings(
        device="cpu", model=str(demo_bundle.base), adapter_dir=tmp_path / "adapters", max_model_len=512
    )
    engine, store = build_engine(settings)
    engine.start()
    try:
        prompt = SYSTEM + " Reload:"
        ((old, _),) = run(engine, request(prompt, "tenant"))
        ((_, hit),) = run(engine, request(prompt, "tenant"))
        assert hit.cached_tokens > 0
        shutil.rmtree(tmp_path / "adapters" / "tenant")
        _perturbed_copy(demo_bundle.adapters / name, tmp_path / "adapters" / "tenant")
        store.load("tenant", tmp_path / "adapters" / "tenant")  # type: ignore[attr-defined]
        ((new, miss),) = run(engine, request(prompt, "tenant"))
        assert miss.cached_tokens == 0
        assert new != old  # the new weights ran, not the old version's KV
        reference = PeftModel.from_pretrained(
            load_model(ModelSpec(source=str(demo_bundle.base))), str(tmp_path / "adapters" / "tenant")
        ).eval()
        ids = torch.tensor([engine.runner.tokenizer.encode(prompt)])
        with torch.inference_mode():
            want = reference.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1] :].tolist()
        assert new == want
    finally:
        engine.stop()
        store.close()  # type: ignore[attr-defined]


# ------------------------------------------------------------------ over HTTP: usage and metrics


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = start_server(tmp_path_factory.mktemp("prefix"), ["--max-model-len", "512"])
    yield srv
    srv.terminate()


def _base_id(server: ServerProcess) -> str:
    with server.http() as http:
        models = http.get("/v1/models").json()["data"]
    return str(next(m["id"] for m in models if m.get("parent") is None))


def _metric(text: str, name: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


def test_usage_reports_cached_tokens_and_metrics_count_them(server: ServerProcess) -> None:
    client = server.openai()
    base = _base_id(server)
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Which animal is pink?"},
    ]
    with server.http() as http:
        before = http.get("/metrics").text
    first = client.chat.completions.create(model=base, messages=messages, max_tokens=4)  # type: ignore[arg-type]
    second = client.chat.completions.create(model=base, messages=messages, max_tokens=4)  # type: ignore[arg-type]
    assert first.usage is not None and second.usage is not None
    assert first.usage.prompt_tokens_details is not None and second.usage.prompt_tokens_details is not None
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached == (second.usage.prompt_tokens - 1) // BLOCK * BLOCK > 0
    stream = client.completions.create(
        model=base, prompt=SYSTEM, max_tokens=2, stream=True, stream_options={"include_usage": True}
    )
    usage = [chunk.usage for chunk in stream if chunk.usage is not None]
    assert len(usage) == 1 and usage[0].prompt_tokens_details is not None
    with server.http() as http:
        after = http.get("/metrics").text
    queries = _metric(after, "vllm:prefix_cache_queries_total") - _metric(
        before, "vllm:prefix_cache_queries_total"
    )
    hits = _metric(after, "vllm:prefix_cache_hits_total") - _metric(before, "vllm:prefix_cache_hits_total")
    assert queries >= first.usage.prompt_tokens + second.usage.prompt_tokens
    assert hits >= cached


def test_no_prefix_caching_flag_turns_it_off(tmp_path: Path) -> None:
    srv = start_server(tmp_path, ["--max-model-len", "512", "--no-prefix-caching"])
    try:
        client = srv.openai()
        base = _base_id(srv)
        for _ in range(2):
            out = client.completions.create(model=base, prompt=SYSTEM, max_tokens=2)
            assert out.usage is not None and out.usage.prompt_tokens_details is not None
            assert out.usage.prompt_tokens_details.cached_tokens == 0
        with srv.http() as http:
            text = http.get("/metrics").text
        assert _metric(text, "vllm:prefix_cache_queries_total") == 0
        assert 'enable_prefix_caching="False"' in text
    finally:
        srv.terminate()


# ------------------------------------------------------------------ chunked prefill keeps streams going


def test_a_long_prompt_is_chunked_and_a_running_stream_decodes_in_every_chunk_step(engine) -> None:  # type: ignore[no-untyped-def]
    """Budget 32 tokens per step: a prompt of a few hundred tokens takes many steps, and the stream already
    running gets a token in each of them (decode rows first), instead of waiting out one long prefill."""
    long_prompt = "A long prompt arrives. " + SYSTEM + SYSTEM
    n_long = len(engine.runner.tokenizer.encode(long_prompt))
    order: list[str] = []

    async def stream(req: GenerationRequest, name: str, started: asyncio.Event | None) -> None:
        async for event in engine.submit(req):
            if event.token_ids:
                order.append(name)
                if started is not None:
                    started.set()

    async def main() -> None:
        started = asyncio.Event()
        running = asyncio.create_task(stream(request("Hello", max_tokens=120), "running", started))
        await started.wait()
        order.append("submitted")
        await stream(request(long_prompt, max_tokens=1), "long", None)
        await running

    asyncio.run(main())
    between = order[order.index("submitted") : order.index("long")]
    # the long prompt needs about n_long / 31 steps (one budget token goes to the running row each step)
    assert between.count("running") >= n_long // 32 - 1 > 3
