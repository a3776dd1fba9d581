"""bitsandbytes' CPU packing of 4-bit weights and PEFT injection (adapter_store/bnb_layout.py).

On CPUs with AVX512-BF16 the first forward repacks each ``Linear4bit``; bitsandbytes 0.50 then corrupts the
layer whenever ``state_dict()`` is read, which PEFT does at every adapter injection. The tests compare with
plain PEFT on a freshly loaded model (wrapped before any forward). On CPUs without AVX512-BF16 nothing is
packed and they pass trivially, except the invariant tests, which hold on every machine."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.functional import has_avx512bf16
from peft import PeftModel

from adapter_store import AdapterRegistry, AdapterStore
from adapter_store.bnb_layout import StableLinear4bit, is_cpu_packed, stabilize_4bit_layers
from server.runtime.loader import ModelSpec, load_model
from tests.integration.store_helpers import (
    BASE_ID,
    MODULES,
    load_nf4,
    make_adapter,
    make_base,
    one_torch_thread,
)

PROMPT = torch.tensor([[1, 17, 42, 99, 3, 8, 200]])
avx512bf16 = pytest.mark.skipif(not has_avx512bf16(), reason="bitsandbytes packs 4-bit weights only here")


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_base(tmp_path_factory.mktemp("bnb") / "base")


@pytest.fixture(scope="module")
def adapter_dir(base: Path) -> Path:
    root = base.parent / "adapters"
    make_adapter(base, root / "alpha", seed=1, r=4, targets=("q_proj", "v_proj", "down_proj"))
    make_adapter(base, root / "beta", seed=2, r=8, targets=("k_proj", "o_proj", "gate_proj", "up_proj"))
    return root


@torch.inference_mode()
def logits(model: torch.nn.Module, **kwargs: object) -> torch.Tensor:
    return model(input_ids=PROMPT, **kwargs).logits[0]


@torch.inference_mode()
def fresh_reference(base: Path, adapter: Path | None) -> torch.Tensor:
    """Plain PEFT on a freshly loaded model, wrapped before any forward (bitsandbytes as it comes)."""
    model = load_nf4(base)
    if adapter is None:
        return logits(model)
    return logits(PeftModel.from_pretrained(model, adapter).eval())


def four_bit_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def test_every_4bit_layer_of_a_loaded_base_is_stable(base: Path) -> None:
    """The invariant, on every machine: no 4-bit layer we serve is a plain ``Linear4bit``."""
    model = load_model(ModelSpec(source=str(base), quantization="nf4"))
    layers = four_bit_layers(model)
    assert layers and all(type(m) is StableLinear4bit for m in layers)
    plain = load_nf4(base)
    assert stabilize_4bit_layers(plain) == len(layers)
    assert stabilize_4bit_layers(plain) == 0  # idempotent


def test_the_store_stabilizes_a_base_it_is_given(base: Path, adapter_dir: Path) -> None:
    model = load_nf4(base)
    registry = AdapterRegistry(
        [adapter_dir],
        adapter_dir=adapter_dir,
        base_model_ids=[BASE_ID],
        base_module_names=MODULES,
        max_lora_rank=16,
    )
    store = AdapterStore(model, registry, max_gpu_adapters=1, max_cpu_adapters=1)
    try:
        assert all(type(m) is StableLinear4bit for m in four_bit_layers(model))
    finally:
        store.close()


@avx512bf16
def test_state_dict_leaves_a_packed_layer_as_it_computes(base: Path) -> None:
    model = load_nf4(base)
    stabilize_4bit_layers(model)
    before = logits(model)
    assert any(is_cpu_packed(m) for m in four_bit_layers(model))
    exported = model.state_dict()
    assert torch.equal(logits(model), before)
    # what it exports is the canonical layout: the fresh model's, but for absmax's bf16 rounding
    fresh = load_nf4(base).state_dict()
    assert exported.keys() == fresh.keys()
    for key, value in fresh.items():
        if key.endswith(".absmax"):
            torch.testing.assert_close(exported[key], value, rtol=1e-2, atol=0)
        else:
            assert torch.equal(exported[key], value), key


@avx512bf16
def test_plain_bitsandbytes_still_has_the_bug(base: Path) -> None:
    """Why the fix exists: on this machine, unfixed, one ``state_dict()`` after a forward changes outputs.
    If a bitsandbytes release fixes it, this test says so and the workaround can go."""
    model = load_nf4(base)
    before = logits(model)
    model.state_dict()
    assert not torch.equal(logits(model), before)


def test_adapters_injected_after_the_base_ran_equal_fresh_peft(
    base: Path, adapter_dir: Path, tmp_path: Path
) -> None:
    """The server's order of events: the base serves requests, then adapters are injected one by one. Each
    adapter's rows, and the base's, must equal plain PEFT on a fresh model, exactly (same kernels)."""
    dirs = tmp_path / "adapters"
    shutil.copytree(adapter_dir, dirs)
    registry = AdapterRegistry(
        [dirs], adapter_dir=dirs, base_model_ids=[BASE_ID], base_module_names=MODULES, max_lora_rank=16
    )
    registry.scan()
    model = load_nf4(base)
    store = AdapterStore(model, registry, max_gpu_adapters=2, max_cpu_adapters=2)
    try:
        base_ref = fresh_reference(base, None)
        assert torch.equal(logits(model), base_ref)  # the base runs first: its layers pack here
        for name in ("alpha", "beta"):
            deadline = time.monotonic() + 60
            while (lease := store.acquire(name)) is None:
                assert time.monotonic() < deadline, f"{name} never loaded"
                time.sleep(0.01)
                store.sync()
            got = logits(store.model, adapter_names=[lease.version])
            torch.testing.assert_close(got, fresh_reference(base, dirs / name), rtol=0, atol=1e-5)
            store.release(lease)
        base_rows = logits(store.model, adapter_names=["__base__"])
        torch.testing.assert_close(base_rows, base_ref, rtol=0, atol=1e-5)
    finally:
        store.close()
