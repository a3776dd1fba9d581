"""The model families users bring, each as a tiny random model built here, with an adapter on that family's
usual target names, under NF4, int8 and no quantization: the engine's greedy tokens for the base and the
adapter, alone and batched together, equal a plain forward loop over a freshly loaded model (PEFT-wrapped
before any forward, transformers' own masks and attention).

Mistral's window (8) is shorter than the test's sequences; Gemma-2 alternates sliding and full layers and
soft-caps its logits (eager attention)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    Gemma2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Phi3Config,
    PretrainedConfig,
    Qwen2Config,
)

from server.bootstrap import build_engine
from server.config import Settings
from server.engine.engine import AsyncEngine
from server.engine.types import GenerationRequest, SamplingParams
from server.runtime.varlen import VARLEN
from tests.integration.store_helpers import one_torch_thread

N_NEW = 12
# token ids of the demo tokenizer; with N_NEW new tokens the longest passes Mistral's window of 8 twice
PROMPTS = [[0, 17, 42, 99, 3], [0, 200, 5, 6, 7, 8, 9, 10, 11, 12, 13], [0, 33]]
SMALL = {"vocab_size": 716, "max_position_embeddings": 256, "bos_token_id": 0, "eos_token_id": 1}
ATTN = {"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128, "num_hidden_layers": 2}
LLAMA_LIKE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

FAMILIES: dict[str, tuple[Callable[[], PretrainedConfig], Any]] = {
    "llama": (lambda: LlamaConfig(**SMALL, **ATTN, num_key_value_heads=2), list(LLAMA_LIKE)),
    "qwen2": (lambda: Qwen2Config(**SMALL, **ATTN, num_key_value_heads=2), "all-linear"),
    "mistral": (
        lambda: MistralConfig(**SMALL, **ATTN, num_key_value_heads=2, sliding_window=8),
        ["q_proj", "k_proj", "v_proj", "o_proj"],
    ),
    "gemma2": (
        lambda: Gemma2Config(
            **SMALL,
            **{**ATTN, "num_hidden_layers": 4},
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=8,
            query_pre_attn_scalar=16,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            pad_token_id=2,
        ),
        list(LLAMA_LIKE),
    ),
    "phi3": (
        lambda: Phi3Config(**SMALL, **ATTN, num_key_value_heads=2, pad_token_id=2),
        ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    ),
    "gpt_neox": (
        lambda: GPTNeoXConfig(**SMALL, **ATTN, rotary_pct=0.5),
        ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    ),
    "opt": (
        lambda: OPTConfig(
            vocab_size=716,
            max_position_embeddings=256,
            hidden_size=64,
            ffn_dim=128,
            num_attention_heads=4,
            num_hidden_layers=2,
            word_embed_proj_dim=64,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=2,
        ),
        ["q_proj", "k_proj", "v_proj", "out_proj"],  # fc1/fc2 are refused: see test_opt_refuses_fc_adapters
    ),
}
QUANTIZATIONS = ["nf4", "int8", "none"]


def quantization_config(quantization: str) -> BitsAndBytesConfig | None:
    if quantization == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0) if quantization == "int8" else None


def build_family(root: Path, family: str, tokenizer_dir: Path) -> tuple[Path, Path]:
    """(base folder, adapter folder) of a tiny random ``family`` model with the demo tokenizer."""
    make_config, targets = FAMILIES[family]
    torch.manual_seed(0)
    config = make_config()
    config.initializer_range = 0.2  # peaked logits: greedy choices are not near-ties
    base = root / family / "base"
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(base)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, base / name)
    torch.manual_seed(1)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    adapter = root / family / "adapters" / "tenant"
    get_peft_model(model, lora).save_pretrained(adapter)
    config_path = adapter / "adapter_config.json"
    data = json.loads(config_path.read_text())
    data["base_model_name_or_path"] = str(base)
    config_path.write_text(json.dumps(data))
    return base, adapter


@torch.inference_mode()
def reference(base: Path, adapter: Path | None, quantization: str) -> list[list[int]]:
    """Greedy tokens of a fresh model: full forward per token (no cache), transformers' defaults."""
    model = AutoModelForCausalLM.from_pretrained(
        base, quantization_config=quantization_config(quantization), dtype=torch.float32, device_map="cpu"
    )
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    outs = []
    for prompt in PROMPTS:
        ids = list(prompt)
        for _ in range(N_NEW):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        outs.append(ids[len(prompt) :])
    return outs


def served(engine: AsyncEngine, adapter: str | None, beside: tuple[str | None, ...] = ()) -> list[list[int]]:
    """The engine's greedy tokens for PROMPTS on ``adapter`` (None: the base): one request at a time, or,
    ``beside`` other models, all at once with the same prompts on each of those (rows share steps)."""

    def request(prompt: list[int], model: str | None) -> GenerationRequest:
        sampling = SamplingParams(max_tokens=N_NEW, temperature=0.0, ignore_eos=True)
        return GenerationRequest(uuid.uuid4().hex, sampling, prompt=prompt, adapter=model)

    async def collect(r: GenerationRequest) -> list[int]:
        tokens: list[int] = []
        async for event in engine.submit(r):
            tokens.extend(event.token_ids)
        return tokens

    async def alone() -> list[list[int]]:
        return [await collect(request(p, adapter)) for p in PROMPTS]

    async def together() -> list[list[int]]:
        reqs = [request(p, model) for model in (adapter, *beside) for p in PROMPTS]
        return list(await asyncio.gather(*(collect(r) for r in reqs)))[: len(PROMPTS)]

    return asyncio.run(together() if beside else alone())


def served_in_every_order(engine: AsyncEngine) -> list[list[list[int]]]:
    """The tokens of the base alone, the adapter ``tenant`` alone, the adapter batched with the base and
    the base batched with the adapter: for comparing two engines with each other."""
    return [
        served(engine, None),
        served(engine, "tenant"),
        served(engine, "tenant", beside=(None,)),
        served(engine, None, beside=("tenant",)),
    ]


def assert_served_in_every_order(
    engine: AsyncEngine, want_base: list[list[int]], want_adapter: list[list[int]]
) -> None:
    """The engine serves ``want_base`` and the adapter ``tenant`` serves ``want_adapter``: each alone, then
    each batched with the other."""
    assert served(engine, None) == want_base, "base alone"
    assert served(engine, "tenant") == want_adapter, "adapter alone"
    assert served(engine, "tenant", beside=(None,)) == want_adapter, "adapter batched with the base"
    assert served(engine, None, beside=("tenant",)) == want_base, "base batched with the adapter"


@contextlib.contextmanager
def started(base: Path, adapter: Path, **flags: Any) -> Iterator[AsyncEngine]:
    """A started engine over ``base`` and its adapter folder, on the CPU, with ``flags`` (Settings fields)."""
    settings = Settings(
        device="cpu",
        model=str(base),
        adapter_dir=adapter.parent,
        max_num_seqs=8,
        max_model_len=128,
        max_gpu_adapters=2,
        **flags,
    )
    engine, store = build_engine(settings)
    engine.start()
    try:
        yield engine
    finally:
        engine.stop()
        store.close()


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory, demo_bundle) -> dict[str, tuple[Path, Path]]:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("families")
    with one_torch_thread():
        return {f: build_family(root, f, demo_bundle.base) for f in FAMILIES}


@pytest.mark.slow
@pytest.mark.parametrize("quantization", QUANTIZATIONS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_base_and_adapter_equal_a_fresh_model(families, family: str, quantization: str) -> None:  # type: ignore[no-untyped-def]
    base, adapter = families[family]
    with one_torch_thread():
        want_base = reference(base, None, quantization)
        want_adapter = reference(base, adapter, quantization)
        with started(base, adapter, quantization=quantization) as engine:
            # the base runs first (its 4-bit layers pack on AVX512-BF16 CPUs), then the adapter is injected
            assert_served_in_every_order(engine, want_base, want_adapter)
            # packed steps attended per sequence (server.runtime.varlen), but where SDPA cannot run
            attention = engine.runner.base_model.config._attn_implementation
            assert attention == ("eager" if family == "gemma2" else VARLEN)


def test_opt_refuses_adapters_on_its_flattened_layers(families, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """OPT runs fc1/fc2 on flattened tokens, where per-row adapter routing cannot work: an adapter on them
    is refused with a 422 naming target_modules (never served wrong), and the others keep serving."""
    from adapter_store import AdapterRefusedError, AdapterRegistry
    from server.runtime.loader import ModelSpec, load_model, target_module_names, unservable_modules

    base, good = families["opt"]
    model = load_model(ModelSpec(source=str(base), quantization="none"))
    adapters = tmp_path / "adapters"
    shutil.copytree(good, adapters / "good")
    for name, targets in {"mlp": ["q_proj", "fc1"], "everything": "all-linear", "regex": r".*fc2"}.items():
        shutil.copytree(good, adapters / name)
        config = json.loads((adapters / name / "adapter_config.json").read_text())
        config["target_modules"] = targets
        (adapters / name / "adapter_config.json").write_text(json.dumps(config))
    registry = AdapterRegistry(
        [adapters],
        adapter_dir=adapters,
        base_model_ids=[str(base)],
        base_module_names=target_module_names(model),
        max_lora_rank=16,
        unservable_modules=unservable_modules(model),
    )
    refusals = registry.scan()
    assert sorted(registry.names()) == ["good"]
    assert len(refusals) == 3
    for refusal in refusals:
        assert isinstance(refusal, AdapterRefusedError) and refusal.status == 422
        assert "target_modules" in str(refusal) and "flattened" in str(refusal)


def test_an_unproven_architecture_is_refused_at_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from server.cli import main

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)).save_pretrained(folder)
    assert main(["serve", "--model", str(folder), "--device", "cpu", "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert "GPT2LMHeadModel" in err and "'gpt2'" in err and "not served" in err


@pytest.mark.slow
def test_bf16_prepacked_linears_serve_the_tokens_of_plain_ones(families) -> None:  # type: ignore[no-untyped-def]
    """bf16 without quantization: the runner packs the base's linears for oneDNN (server/runtime/prepack.py),
    bit-identical to ``F.linear``, so the engine's tokens for the base and the adapter alone are those of the
    same engine with packing off (bf16 rounding keeps both from a full-forward reference); batched, within
    bf16 rounding of a fresh float32 model's (``assert_batched_within_rounding``)."""
    from server.runtime.prepack import PACKED, supported

    if not supported(torch.device("cpu")):
        pytest.skip("no oneDNN bf16 on this CPU")
    base, adapter = families["llama"]
    tokens: dict[str, list[list[list[int]]]] = {}
    with one_torch_thread():
        for mode in ("off", "on"):
            with started(base, adapter, quantization="none", dtype="bfloat16", cpu_prepack=mode) as engine:
                model = engine.runner.base_model
                assert any(hasattr(m, PACKED) for m in model.modules()) == (mode == "on")
                tokens[mode] = served_in_every_order(engine)
        assert_batched_within_rounding(base, adapter, tokens["on"])
    assert tokens["on"][:2] == tokens["off"][:2]  # alone: the same steps on both sides
    assert tokens["on"][0] != tokens["on"][1]  # the adapter changes the tokens: its rows really ran


@pytest.mark.slow
def test_widened_bf16_linears_serve_the_tokens_of_plain_ones(families, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """bf16 where oneDNN has no bf16 kernels (injected on any CPU; real on AVX2 CPUs such as the Zen 3): the
    runner widens the base's linears to float32 copies (packing on), and slot LoRA's wide forwards and the
    decode mirror's attention run in float32 (either way). Within a bf16 rounding step of torch's own bf16
    ops, not bit-identical, so against the same engine with packing off on this family's peaked logits: the
    base and the adapter alone; batched, within bf16 rounding of a fresh float32 model's
    (``assert_batched_within_rounding``)."""
    from server.runtime import prepack

    monkeypatch.setattr(prepack, "supported", lambda device: False)
    base, adapter = families["llama"]
    tokens: dict[str, list[list[list[int]]]] = {}
    with one_torch_thread():
        for mode in ("off", "on"):
            with started(base, adapter, quantization="none", dtype="bfloat16", cpu_prepack=mode) as engine:
                runner = engine.runner
                linears = [getattr(m, prepack.PACKED, None) for m in runner.base_model.modules()]
                assert any(p is not None and p.widened for p in linears) == (mode == "on")
                assert runner.slot_lora is not None and runner.slot_lora.wide_dtype == torch.float32
                assert runner.mirror is not None and runner.mirror.dtype == torch.float32
                tokens[mode] = served_in_every_order(engine)
        assert_batched_within_rounding(base, adapter, tokens["on"])
    assert tokens["on"][:2] == tokens["off"][:2]  # alone: the same steps on both sides
    assert tokens["on"][0] != tokens["on"][1]  # the adapter changes the tokens: its rows really ran


# bf16 against float32: a served token may be a near-tie's other side, never further from the reference's
# best than this share of the position's largest |logit| (measured at most 0.0153 over every family; a
# row routed to the wrong model is off by 0.02-1.5 at most positions)
BF16_LOGIT_SLACK = 2**-5


@torch.inference_mode()
def logit_gaps(base: Path, adapter: Path | None, outputs: list[list[int]]) -> list[float]:
    """For each token of ``outputs`` (one continuation per prompt of PROMPTS), how far its logit lies below
    the best one at that position, over the position's largest |logit|, in a fresh float32 model (PEFT for
    the adapter) fed the prompt and the served tokens before it (teacher-forced: a near-tie taken the other
    way is checked on from there, not compared with another continuation)."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, device_map="cpu")
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    gaps = []
    for prompt, out in zip(PROMPTS, outputs, strict=True):
        logits = model(input_ids=torch.tensor([prompt + out])).logits[0, len(prompt) - 1 : -1]  # [N, V]
        best = logits.max(-1).values
        chosen = logits.gather(-1, torch.tensor(out)[:, None])[:, 0]
        gaps += ((best - chosen) / logits.abs().max(-1).values).tolist()
    return gaps


def assert_batched_within_rounding(base: Path, adapter: Path, orders: list[list[list[int]]]) -> None:
    """The batched orders of ``served_in_every_order`` (adapter beside the base, base beside the adapter) are
    a fresh float32 model's best tokens or within bf16 rounding of them. Two bf16 engines are compared token
    for token only alone: batched, which rows share a step follows when the engine thread picks the
    requests up, and bf16 rounds a row otherwise beside other rows (seen: one engine took a near-tie the
    other way in 3 of 30 rounds of the four orders)."""
    _, _, batched_adapter, batched_base = orders
    gaps = logit_gaps(base, adapter, batched_adapter) + logit_gaps(base, None, batched_base)
    assert max(gaps) <= BF16_LOGIT_SLACK
    assert sum(g == 0 for g in gaps) >= 0.75 * len(gaps)  # near-ties are the exception


@pytest.mark.slow
@pytest.mark.parametrize("kernels", ["this cpu", "none"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_bf16_serves_a_fresh_float32_models_tokens_up_to_rounding(  # type: ignore[no-untyped-def]
    families, family: str, kernels: str, monkeypatch
) -> None:
    """bf16 without quantization, end to end: every token the engine picks for the base and the adapter,
    alone and batched, is the fresh float32 model's best or within bf16 rounding of it
    (``BF16_LOGIT_SLACK``), and most are its best. ``kernels`` "none" injects a CPU without oneDNN bf16
    kernels (real on AVX2 CPUs such as the Zen 3): widened linears, float32 slot LoRA and decode mirror."""
    from server.runtime import prepack

    if kernels == "none":
        monkeypatch.setattr(prepack, "supported", lambda device: False)
    base, adapter = families[family]
    with one_torch_thread():
        with started(base, adapter, quantization="none", dtype="bfloat16", cpu_prepack="on") as engine:
            alone_base, alone_adapter, batched_adapter, batched_base = served_in_every_order(engine)
        gaps = {
            "base alone": logit_gaps(base, None, alone_base),
            "adapter alone": logit_gaps(base, adapter, alone_adapter),
            "adapter batched with the base": logit_gaps(base, adapter, batched_adapter),
            "base batched with the adapter": logit_gaps(base, None, batched_base),
        }
    for order, values in gaps.items():
        assert max(values) <= BF16_LOGIT_SLACK, order
        assert sum(g == 0 for g in values) >= 0.75 * len(values), order  # near-ties are the exception


@pytest.mark.slow
def test_float32_prepacked_linears_serve_the_tokens_of_a_fresh_model(families) -> None:  # type: ignore[no-untyped-def]
    """float32 without quantization, packed for oneDNN (``--cpu-prepack on``; ``auto`` leaves models this
    small on ``F.linear``): not bit-identical to ``F.linear``, so the tokens are checked against a fresh
    model's, for the base and the adapter, alone and batched."""
    from server.runtime.prepack import PACKED

    if not torch.backends.mkldnn.is_available():
        pytest.skip("torch without oneDNN")
    base, adapter = families["llama"]
    with one_torch_thread():
        want_base = reference(base, None, "none")
        want_adapter = reference(base, adapter, "none")
        with started(base, adapter, quantization="none", dtype="float32", cpu_prepack="on") as engine:
            assert any(hasattr(m, PACKED) for m in engine.runner.base_model.modules())
            assert_served_in_every_order(engine, want_base, want_adapter)


@pytest.mark.slow
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "gemma2"])  # gemma2 attends eagerly
def test_matmul_decode_attention_serves_the_tokens_of_a_fresh_model(families, family: str) -> None:  # type: ignore[no-untyped-def]
    """``--decode-attention matmul`` (what ``auto`` picks where SDPA times slower, as on Zen 4 in bf16):
    decode rows attend through the matmuls over whole mirror rows; float32, so against a fresh model's
    tokens, for the base and the adapter, alone and batched."""
    base, adapter = families[family]
    with one_torch_thread():
        want_base = reference(base, None, "none")
        want_adapter = reference(base, adapter, "none")
        with started(
            base, adapter, quantization="none", dtype="float32", decode_attention="matmul"
        ) as engine:
            runner = engine.runner
            assert runner.decode_kernel == "matmul"
            assert runner.mirror is not None and runner.mirror.whole_rows
            assert_served_in_every_order(engine, want_base, want_adapter)
            assert runner.mirror.shape[0] > 0  # decode rows were read from the mirror


@pytest.mark.slow
@pytest.mark.parametrize("decode_attention", ["sdpa", "matmul"])
def test_rows_after_a_long_one_keep_a_fresh_models_tokens_through_a_shrunk_mirror(
    families, decode_attention: str
) -> None:  # type: ignore[no-untyped-def]
    """After a long request the decode mirror is a whole context wide; the short rows that follow drop it
    (here after 2 steps that need under a quarter of it, not 64) and grow it again to their size, filled
    from their blocks: their tokens, alone and batched, are still a fresh model's."""
    base, adapter = families["llama"]
    with one_torch_thread():
        want_base = reference(base, None, "none")
        want_adapter = reference(base, adapter, "none")
        with started(
            base, adapter, quantization="none", dtype="float32", decode_attention=decode_attention
        ) as engine:
            mirror = engine.runner.mirror
            assert mirror is not None
            mirror.shrink_after = 2

            async def long_request() -> None:
                sampling = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
                prompt = [0, *range(3, 122)]  # 120 tokens: with 4 more, 8 blocks of 16
                async for _ in engine.submit(GenerationRequest(uuid.uuid4().hex, sampling, prompt=prompt)):
                    pass

            asyncio.run(long_request())
            wide = mirror.shape[1]
            assert wide == 128
            assert_served_in_every_order(engine, want_base, want_adapter)
            assert 0 < mirror.shape[1] < wide  # dropped, and grown again to the short rows
