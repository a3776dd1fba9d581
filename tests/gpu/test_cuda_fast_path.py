"""On CUDA: decode graphs give the same greedy tokens as eager decode, and slot LoRA equals PEFT's
mixed-batch forward (bf16 tolerance). Skipped without CUDA."""

from __future__ import annotations

import asyncio
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

from adapter_store import AdapterRegistry, AdapterStore  # noqa: E402
from benchmarks.engine_vs_naive import LINEAR, IdTokenizer, build_model, write_adapters  # noqa: E402
from server.engine.engine import AsyncEngine, EngineConfig  # noqa: E402
from server.engine.types import GenerationRequest, SamplingParams  # noqa: E402
from server.runtime.model_runner import ModelRunner  # noqa: E402

DEVICE = torch.device("cuda")


def _engine(folder: Path, *, cuda_graphs: bool, gpu_adapters: int = 4) -> tuple[AsyncEngine, AdapterStore]:
    torch.manual_seed(0)  # the same random base for every engine
    model = build_model("demo", DEVICE)
    registry = AdapterRegistry(
        [folder],
        adapter_dir=folder,
        base_model_ids={"random-llama"},
        base_module_names=set(LINEAR),
        max_lora_rank=16,
        strict_base=False,
        allow_hub=False,
    )
    registry.scan()
    store = AdapterStore(model, registry, max_gpu_adapters=gpu_adapters, max_cpu_adapters=4)
    runner = ModelRunner(
        model=model,
        tokenizer=IdTokenizer(model.config.vocab_size),  # type: ignore[arg-type]
        model_id="random-llama",
        num_slots=8,
        max_model_len=128,
        store=store,
        cuda_graphs=cuda_graphs,
        slot_lora=True,
        max_lora_rank=16,
    )
    engine = AsyncEngine(runner, EngineConfig(max_loras_per_batch=gpu_adapters))  # type: ignore[arg-type]
    return engine, store


@pytest.fixture(scope="module")
def adapters() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        write_adapters(build_model("demo", DEVICE), Path(tmp), 3, 16)
        yield Path(tmp)


def _run(engine: AsyncEngine, reqs: list[tuple[list[int], str | None, int]]) -> list[list[int]]:
    async def one(prompt: list[int], adapter: str | None, n: int) -> list[int]:
        req = GenerationRequest(
            request_id=uuid.uuid4().hex,
            sampling=SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True),
            prompt=prompt,
            adapter=adapter,
        )
        out: list[int] = []
        async for event in engine.submit(req):
            out.extend(event.token_ids)
        return out

    async def main() -> list[list[int]]:
        return list(await asyncio.gather(*(one(*r) for r in reqs)))

    return asyncio.run(main())


def test_greedy_with_graphs_equals_without(adapters: Path) -> None:
    gen = torch.Generator().manual_seed(3)
    names = [None, "tenant-00", "tenant-01", "tenant-02"]
    reqs = [
        (torch.randint(0, 512, (5 + 3 * i,), generator=gen).tolist(), names[i % 4], 10 + 4 * i)
        for i in range(7)
    ]
    results = []
    for graphs in (True, False):
        engine, store = _engine(adapters, cuda_graphs=graphs)
        assert (engine.runner.graphs is not None) == graphs  # type: ignore[attr-defined]
        engine.start()
        try:
            results.append(_run(engine, reqs))
            if graphs:
                assert engine.runner.graphs.num_graphs > 0  # type: ignore[attr-defined]
        finally:
            engine.stop()
            store.close()
    assert results[0] == results[1]


@torch.inference_mode()
def test_slot_lora_equals_peft_on_cuda() -> None:
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    from server.runtime.slot_lora import SlotLoRA

    torch.manual_seed(0)
    model = build_model("demo", DEVICE)
    specs = {"s1": (4, ["q_proj", "v_proj"]), "s2": (16, list(LINEAR)), "s3": (8, ["down_proj"])}
    peft = None
    for name, (rank, targets) in specs.items():
        cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0)
        if peft is None:
            peft = get_peft_model(model, cfg, adapter_name=name)
        else:
            peft.add_adapter(name, cfg)
        for pname, param in peft.named_parameters():
            if f"lora_B.{name}" in pname:
                param.data.normal_(0, 0.05)
    assert peft is not None
    peft.eval()
    slots = SlotLoRA(peft, num_slots=4, r_max=16, dtype=torch.bfloat16, device=DEVICE)
    slots.on_peft_change(peft)
    for name in specs:
        state_dict = get_peft_model_state_dict(peft, adapter_name=name)
        prepared = slots.prepare(peft.peft_config[name], state_dict)
        assert all(a.is_pinned() for _, a, _ in prepared.layers)  # one pinned host buffer, async copies
        assert slots.on_gpu_enter(name, prepared)
    names = ["s1", "__base__", "s2", "s3", "s2", "__base__"]
    ids = torch.randint(0, 512, (len(names), 9), device=DEVICE)
    slots.enabled = False
    want = peft(input_ids=ids, adapter_names=names).logits.float()
    slots.enabled = True
    rows = torch.tensor([slots.slot_of(None if n == "__base__" else n) for n in names], device=DEVICE)
    with slots.routing(rows):
        got = peft(input_ids=ids).logits.float()
    # bf16 activations, PEFT's LoRA in float32 vs the slots' bf16: relative error ~1e-3
    assert ((got - want).norm() / want.norm()).item() < 2e-2
    base_rows = [i for i, n in enumerate(names) if n == "__base__"]
    with peft.disable_adapter():
        plain = peft(input_ids=ids).logits.float()
    slots.enabled = True
    torch.testing.assert_close(got[base_rows], plain[base_rows], atol=0, rtol=0)


def test_cold_loads_during_graph_capture_fail_nothing() -> None:
    """More adapters than GPU slots, all cold, with graphs on: the loader thread pins host memory while the
    engine thread captures decode graphs. Every request must complete (no invalidated capture)."""
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        names = write_adapters(build_model("demo", DEVICE), Path(tmp), 8, 16)
        engine, store = _engine(Path(tmp), cuda_graphs=True, gpu_adapters=2)  # loads and evictions mid-run
        engine.start()
        try:
            gen = torch.Generator().manual_seed(5)
            reqs = [
                (torch.randint(0, 512, (6,), generator=gen).tolist(), names[i % 8], 12) for i in range(16)
            ]
            outs = _run(engine, reqs)
        finally:
            engine.stop()
            store.close()
        assert [len(o) for o in outs] == [12] * 16
        assert not engine.runner.graphs.failed  # type: ignore[attr-defined]
