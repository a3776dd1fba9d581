"""A model whose embedding is padded past its tokenizer (``config.vocab_size > len(tokenizer)``, as many
checkpoints are, to a multiple of 64): the padded ids decode to nothing and must never be sampled.

The padded rows of ``lm_head`` are made to win the argmax, so an unmasked sampler would pick them; the
reference is plain ``generate`` with those ids suppressed.
"""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from server.bootstrap import build_engine
from server.config import Settings
from server.engine.engine import AsyncEngine
from server.engine.types import GenerationRequest, SamplingParams

PAD_IDS = 52  # 716 real ids -> 768 rows
PROMPTS = ["The cat", "Hello there", "The owl lives in the barn"]


@pytest.fixture(scope="module")
def padded_base(demo_bundle: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("padded") / "base"
    shutil.copytree(demo_bundle.base, folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    real = len(AutoTokenizer.from_pretrained(folder))
    model.resize_token_embeddings(real + PAD_IDS)
    torch.manual_seed(0)
    with torch.no_grad():
        rows = torch.randn(PAD_IDS // 2, model.config.hidden_size) * 50.0
        model.lm_head.weight[real:] = torch.cat([rows, -rows])  # for any hidden state one of ±row wins
    model.save_pretrained(folder)
    assert model.config.vocab_size == real + PAD_IDS
    return folder


@pytest.fixture(scope="module")
def engine(padded_base: Path) -> Iterator[AsyncEngine]:
    settings = Settings(device="cpu", model=str(padded_base), quantization="none", max_model_len=128)
    engine, store = build_engine(settings)
    engine.start()
    yield engine
    engine.stop()
    if store is not None:
        store.close()


async def _tokens(engine: AsyncEngine, prompt: str, temperature: float) -> list[int]:
    req = GenerationRequest(
        request_id=uuid.uuid4().hex,
        sampling=SamplingParams(max_tokens=12, temperature=temperature, seed=7, ignore_eos=True),
        prompt=prompt,
    )
    out: list[int] = []
    async for event in await engine.add_requests([req]):
        out.extend(event.token_ids)
    return out


def test_padded_ids_are_never_sampled_and_greedy_matches_generate(
    engine: AsyncEngine, padded_base: Path
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(padded_base)
    real = len(tokenizer)
    reference = AutoModelForCausalLM.from_pretrained(padded_base).eval()
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer.encode(prompt)])
        with torch.inference_mode():
            unmasked = reference.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None)
            masked = reference.generate(
                ids,
                max_new_tokens=12,
                do_sample=False,
                eos_token_id=None,
                suppress_tokens=list(range(real, real + PAD_IDS)),
            )
        assert (unmasked[0, ids.shape[1] :] >= real).any()  # the padded rows do win without a mask
        greedy = asyncio.run(_tokens(engine, prompt, 0.0))
        assert greedy == masked[0, ids.shape[1] :].tolist()
        sampled = asyncio.run(_tokens(engine, prompt, 1.0))
        assert sampled and max(sampled) < real
