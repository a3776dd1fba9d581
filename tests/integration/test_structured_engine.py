"""Constrained decoding in the engine (demo bundle, unquantized, CPU) against an independent reference: a
plain PEFT forward loop on a freshly loaded model whose logits are masked by llguidance's own torch helpers
(``llguidance.torch``) driven by a separate matcher. Greedy constrained rows of the base and every adapter,
batched with unconstrained rows, give the reference's tokens; unconstrained rows give their plain tokens."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from typing import Any

import llguidance
import llguidance.hf
import llguidance.torch
import pytest
import torch
from peft import PeftModel

from server.bootstrap import build_engine
from server.config import Settings
from server.engine.engine import AsyncEngine
from server.engine.types import FinishReason, GenerationRequest, SamplingParams
from server.runtime.loader import ModelSpec, load_model
from server.runtime.tokenizer import HFTokenizer
from server.structured.grammar import GrammarCompiler, GrammarSpec

pytestmark = pytest.mark.slow

SCHEMA = {
    "type": "object",
    "properties": {
        "animal": {"enum": ["cat", "dog", "owl"]},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["animal", "n"],
    "additionalProperties": False,
}
PROMPTS = ["The cat", "Hello", "The owl lives in the"]
NEW = 40


@pytest.fixture(scope="module")
def engine(demo_bundle: Any) -> Iterator[AsyncEngine]:
    settings = Settings(
        device="cpu",
        model=str(demo_bundle.base),
        adapter_dir=demo_bundle.adapters,
        quantization="none",
        max_num_seqs=8,
        max_model_len=256,
    )
    engine, store = build_engine(settings)
    engine.start()
    yield engine
    engine.stop()
    store.close()  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def compiler(engine: AsyncEngine) -> GrammarCompiler:
    tokenizer = engine.runner.tokenizer
    assert isinstance(tokenizer, HFTokenizer)
    return GrammarCompiler(
        tokenizer.hf, vocab_size=engine.runner.vocab_size, eos_token_ids=sorted(tokenizer.eos_token_ids)
    )


def reference(
    demo_bundle: Any, adapter: str | None, prompt_ids: list[int], vocab: int, constrained: bool
) -> list[int]:
    """Greedy tokens of a fresh PEFT model, masked by a separate llguidance matcher when ``constrained``."""
    model = load_model(
        ModelSpec(
            source=str(demo_bundle.base), quantization="none", dtype=torch.float32, device=torch.device("cpu")
        )
    )
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(demo_bundle.adapters / adapter))
    model.eval()
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(demo_bundle.base)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(
        json.dumps(SCHEMA), overrides={"whitespace_flexible": False}
    )
    matcher = llguidance.LLMatcher(llguidance.hf.from_tokenizer(hf, n_vocab=vocab), grammar)
    bitmask = llguidance.torch.allocate_token_bitmask(1, vocab)
    ids = list(prompt_ids)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(NEW):
            logits = model(torch.tensor([ids])).logits[0, -1:].float()  # [1, V]
            if constrained:
                llguidance.torch.fill_next_token_bitmask(matcher, bitmask)
                llguidance.torch.apply_token_bitmask_inplace(logits, bitmask)
            token = int(torch.argmax(logits, dim=-1))
            out.append(token)
            ids.append(token)
            if token == hf.eos_token_id:
                break
            if constrained:
                assert matcher.consume_token(token)
                if matcher.is_stopped():
                    break
    return out


async def run_all(
    engine: AsyncEngine, requests: list[GenerationRequest]
) -> dict[str, tuple[list[int], str, FinishReason | None]]:
    results: dict[str, tuple[list[int], str, FinishReason | None]] = {
        r.request_id: ([], "", None) for r in requests
    }
    async for event in engine.submit_many(requests):
        tokens, text, _ = results[event.request_id]
        results[event.request_id] = (tokens + list(event.token_ids), text + event.text, event.finish_reason)
    return results


def test_constrained_rows_match_the_masked_reference_in_mixed_batches(
    engine: AsyncEngine, compiler: GrammarCompiler, demo_bundle: Any
) -> None:
    spec = GrammarSpec.json_schema(SCHEMA, "response_format")
    models: list[str | None] = [None, *sorted(engine.adapter_names())]
    requests = []
    for i, model in enumerate(models):
        for j, constrained in enumerate((True, False)):
            requests.append(
                GenerationRequest(
                    request_id=uuid.uuid4().hex,
                    sampling=SamplingParams(max_tokens=NEW, temperature=0.0),
                    prompt=PROMPTS[(i + j) % len(PROMPTS)],
                    adapter=model,
                    constraint=compiler.compile(spec) if constrained else None,
                )
            )
    results = asyncio.run(run_all(engine, requests))
    vocab = engine.runner.vocab_size
    for request in requests:
        tokens, text, reason = results[request.request_id]
        prompt_ids = engine.tokenize(str(request.prompt))
        expected = reference(demo_bundle, request.adapter, prompt_ids, vocab, request.constraint is not None)
        assert tokens == expected, (request.adapter, request.constraint is not None)
        if request.constraint is not None:
            assert reason is FinishReason.STOP
            value = json.loads(text)
            assert value["animal"] in ("cat", "dog", "owl") and 0 <= value["n"] <= 99
