"""The served greedy tokens equal plain PEFT ``generate`` on a freshly loaded model, for the base and every
demo adapter, whatever the order of requests: base first, adapters first, interleaved, all at once, and
after adapters were evicted and read again from disk.

The reference is independent of the server: for each adapter its own NF4 base, loaded fresh and wrapped by
``PeftModel.from_pretrained`` before any forward, through transformers' own ``generate``. A mismatch reports
the reference's logit margin (top-1 minus top-2) at the first differing token, so an NF4 near-tie is told
apart from a wrong token. Measured on the demo bundle: the smallest reference margin is 0.012 (``shout``
on the long owl prompt), and the server matches there too: the paths run the same kernels."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from tests.integration.api_server import ServerProcess, start_server

MAX_TOKENS = 16
PROMPTS = [
    "The cat",
    "The dog says",
    "Hello",
    "Where does the duck live?",
    "The owl lives in the barn. The cow lives in the field. The pig is pink and the dog",
    "What color is the cat?",
    "The cow",
    "Once upon a time",
]


@dataclass(frozen=True, slots=True)
class Expected:
    token_ids: list[int]
    text: str
    margins: list[float]  # top-1 minus top-2 logit of the reference at each generated token


@pytest.fixture(scope="module")
def references(demo_bundle) -> dict[tuple[str | None, str], Expected]:  # type: ignore[no-untyped-def]
    tokenizer = AutoTokenizer.from_pretrained(demo_bundle.base)
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    out: dict[tuple[str | None, str], Expected] = {}
    for adapter in [None, *demo_bundle.adapter_names]:
        model = AutoModelForCausalLM.from_pretrained(
            demo_bundle.base, quantization_config=quant, dtype=torch.float32, device_map={"": "cpu"}
        )
        if adapter is not None:  # wrapped before any forward: plain PEFT as a user would run it
            model = PeftModel.from_pretrained(model, demo_bundle.adapters / adapter)
        model.eval()
        for prompt in PROMPTS:
            ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=True)])
            with torch.inference_mode():
                gen = model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=MAX_TOKENS,
                    do_sample=False,
                    output_scores=True,
                    return_dict_in_generate=True,
                )
            tokens = gen.sequences[0, ids.shape[1] :].tolist()
            margins = [float(s[0].topk(2).values.diff().abs()) for s in gen.scores]
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            out[(adapter, prompt)] = Expected(tokens, text, margins)
    return out


def _server(tmp_path_factory: pytest.TempPathFactory, *flags: str) -> Iterator[ServerProcess]:
    server = start_server(
        tmp_path_factory.mktemp("parity"), ["--max-model-len", "256", "--max-num-seqs", "8", *flags]
    )
    try:
        yield server
    finally:
        server.terminate()


@pytest.fixture(scope="module")
def resident_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Every adapter fits on the GPU tier: requests of different adapters share decode steps."""
    yield from _server(tmp_path_factory, "--max-gpu-adapters", "4")


@pytest.fixture(scope="module")
def evicting_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One GPU-tier adapter and no CPU tier: every change of adapter evicts one and reads one from disk."""
    yield from _server(tmp_path_factory, "--max-gpu-adapters", "1", "--max-cpu-adapters", "0")


def base_id(server: ServerProcess) -> str:
    with server.http() as http:
        models = http.get("/v1/models").json()["data"]
    return str(next(m["id"] for m in models if m.get("parent") is None))


def complete(server: ServerProcess, model: str, prompt: str) -> str:
    with server.http(timeout=300) as http:
        response = http.post(
            "/v1/completions",
            json={"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0},
        )
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["text"])


def check(
    server: ServerProcess,
    references: dict[tuple[str | None, str], Expected],
    order: list[tuple[str | None, str]],
    *,
    concurrent: bool = False,
) -> None:
    """Send ``order``'s requests (one after another, or all at once) and compare each with its reference."""
    base = base_id(server)

    def run(item: tuple[str | None, str]) -> str:
        adapter, prompt = item
        return complete(server, adapter or base, prompt)

    if concurrent:
        with ThreadPoolExecutor(len(order)) as pool:
            texts = list(pool.map(run, order))
    else:
        texts = [run(item) for item in order]
    wrong = []
    for item, text in zip(order, texts, strict=True):
        want = references[item]
        if text != want.text:
            # the first differing character's token position, roughly: report the smallest margin up to it
            prefix = next((i for i, (a, b) in enumerate(zip(text, want.text, strict=False)) if a != b), None)
            wrong.append(
                f"{item}: got {text!r}, want {want.text!r} (diverges at char {prefix}; "
                f"reference margins {[round(m, 2) for m in want.margins]})"
            )
    assert not wrong, f"{len(wrong)} of {len(order)} differ:\n" + "\n".join(wrong)


def pairs(adapters: list[str | None]) -> list[tuple[str | None, str]]:
    return [(a, p) for a in adapters for p in PROMPTS]


@pytest.fixture(scope="module")
def adapters(demo_bundle) -> list[str]:  # type: ignore[no-untyped-def]
    return list(demo_bundle.adapter_names)


def test_base_first_then_each_adapter(resident_server, references, adapters) -> None:  # type: ignore[no-untyped-def]
    check(resident_server, references, pairs([None, *adapters, None]))


def test_adapters_first_then_the_base(evicting_server, references, adapters) -> None:  # type: ignore[no-untyped-def]
    check(evicting_server, references, pairs([*adapters, None]))


def test_interleaved(evicting_server, references, adapters) -> None:  # type: ignore[no-untyped-def]
    order = [(a, p) for p in PROMPTS for a in [*adapters, None]]  # the adapter changes at every request
    check(evicting_server, references, order)


def test_all_at_once_in_one_batch(resident_server, references, adapters) -> None:  # type: ignore[no-untyped-def]
    check(resident_server, references, pairs([None, *adapters]), concurrent=True)


def test_all_at_once_over_more_adapters_than_the_gpu_tier(evicting_server, references, adapters) -> None:  # type: ignore[no-untyped-def]
    check(evicting_server, references, pairs([None, *adapters]), concurrent=True)


def test_after_an_admin_unload_and_reload(resident_server, references, adapters, demo_bundle) -> None:  # type: ignore[no-untyped-def]
    with resident_server.http() as http:
        for name in adapters:
            assert http.post("/v1/unload_lora_adapter", json={"lora_name": name}).status_code == 200
            path = str(Path(demo_bundle.adapters) / name)
            response = http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})
            assert response.status_code == 200, response.text
    check(resident_server, references, pairs([*reversed(adapters), None]))


def test_the_parity_suite_can_fail(resident_server, references) -> None:  # type: ignore[no-untyped-def]
    """Guards the comparison itself: a base request compared with an adapter's reference must differ."""
    with pytest.raises(AssertionError):
        base = base_id(resident_server)
        text = complete(resident_server, base, PROMPTS[0])
        pirate = next(k for k in references if k[0] == "pirate" and k[1] == PROMPTS[0])
        assert text == references[pirate].text
