"""The adapter store with a GPU tier listener (SlotLoRA, as on CUDA) on the tiny NF4 Llama (CPU): adapters
reach the slots straight from their state dicts, prepared on the loader threads, and never enter the
PeftModel unless the slots refuse them (their rows then run on PEFT's forward) or ``materialize`` asks."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

from adapter_store import AdapterStore
from server.runtime.slot_lora import SlotLoRA, SlotWeights
from tests.integration.store_helpers import BASE_ID, PROMPTS, greedy, one_torch_thread, reference
from tests.integration.test_store import N_NEW, SPECS, Bundle, bundle, make_store, wait_acquire

__all__ = ["bundle"]  # the session fixture, re-exported for pytest


class Spy(SlotLoRA):
    """SlotLoRA that records which thread prepared what."""

    def __init__(self, model: torch.nn.Module, **kwargs: object) -> None:
        super().__init__(model, **kwargs)  # type: ignore[arg-type]
        self.prepared_on: list[str] = []

    def prepare(self, config: object, state_dict: object) -> SlotWeights:
        self.prepared_on.append(threading.current_thread().name)
        return super().prepare(config, state_dict)  # type: ignore[arg-type]


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture
def slot_store(bundle: Bundle, tmp_path: Path) -> Iterator[Callable[..., tuple[AdapterStore, Spy]]]:
    made: list[AdapterStore] = []

    def factory(**kwargs: object) -> tuple[AdapterStore, Spy]:
        store, _ = make_store(bundle, tmp_path, **kwargs)
        made.append(store)
        slots = Spy(
            store.model,
            num_slots=store.max_gpu_adapters,
            r_max=16,
            dtype=torch.float32,
            device=torch.device("cpu"),
        )
        slots.enabled = True
        store.set_gpu_listener(slots)
        return store, slots

    yield factory
    for s in made:
        s.close()


@torch.inference_mode()
def slot_greedy(model: torch.nn.Module, slots: SlotLoRA, key: str | None, prompt: list[int]) -> list[int]:
    with slots.routing(torch.tensor([slots.slot_of(key)])):
        return greedy(model, prompt, N_NEW)


def test_adapters_reach_the_slots_without_peft(
    slot_store: Callable[..., tuple[AdapterStore, Spy]], bundle: Bundle
) -> None:
    store, slots = slot_store(max_gpu_adapters=2, max_cpu_adapters=3)
    base = store.model
    for name in SPECS:  # three adapters, two slots: loads, evictions and slot reuse
        lease = wait_acquire(store, name)
        assert store.model is base and not hasattr(base, "peft_config")  # PEFT never wrapped the base
        assert slots.supports(lease.version)
        assert [slot_greedy(store.model, slots, lease.version, p) for p in PROMPTS] == bundle.refs[name]
        store.release(lease)
    assert [slot_greedy(store.model, slots, None, p) for p in PROMPTS] == bundle.base_refs
    # every adapter was prepared once, on a loader thread, never on this (the engine's) thread
    assert len(slots.prepared_on) == len(SPECS)
    assert all(t.startswith("adapter-loader") for t in slots.prepared_on)
    tiers = {a.name: a.tier for a in store.adapters()}
    assert sorted(tiers.values()) == ["cpu", "gpu", "gpu"]


def test_materialize_puts_a_slot_adapter_into_peft(
    slot_store: Callable[..., tuple[AdapterStore, Spy]], bundle: Bundle
) -> None:
    store, slots = slot_store(max_gpu_adapters=2, max_cpu_adapters=0)  # no CPU copy: materialize re-reads
    lease = wait_acquire(store, "beta")
    peft = store.materialize(lease.version)
    assert store.model is peft and lease.version in peft.peft_config
    slots.enabled = False  # PEFT's own forward: the reference
    try:
        assert [greedy(peft, p, N_NEW, [lease.version]) for p in PROMPTS] == bundle.refs["beta"]
    finally:
        slots.enabled = True
    # slot routing still works, with PEFT's layers switched off
    assert [slot_greedy(peft, slots, lease.version, p) for p in PROMPTS] == bundle.refs["beta"]
    assert store.materialize(lease.version) is peft  # idempotent
    store.release(lease)
    with pytest.raises(KeyError):
        store.materialize("alpha@000000000000")


def _bias_adapter(bundle: Bundle, folder: Path) -> Path:
    """A LoRA with a bias on lora_B (PEFT's ``lora_bias``): the slots refuse it, PEFT runs it."""
    torch.manual_seed(7)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_bias=True)
    peft = get_peft_model(LlamaForCausalLM.from_pretrained(bundle.base), config)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.3)
    peft.save_pretrained(folder)
    config_path = folder / "adapter_config.json"
    config_path.write_text(
        json.dumps({**json.loads(config_path.read_text()), "base_model_name_or_path": BASE_ID})
    )
    return folder


@torch.inference_mode()
def test_refused_adapter_runs_on_peft_beside_slot_rows(
    slot_store: Callable[..., tuple[AdapterStore, Spy]], bundle: Bundle, tmp_path: Path
) -> None:
    store, slots = slot_store(max_gpu_adapters=2, max_cpu_adapters=2)
    folder = _bias_adapter(bundle, tmp_path / "adapters" / "biased")  # under the store's root
    want = [reference(bundle.base, folder, p, N_NEW) for p in PROMPTS]
    store.load("biased", folder)
    biased = wait_acquire(store, "biased")
    alpha = wait_acquire(store, "alpha")
    assert not slots.supports(biased.version) and slots.supports(alpha.version)
    peft = store.model
    assert biased.version in getattr(peft, "peft_config", {})  # refused by the slots: in the PeftModel
    assert alpha.version not in peft.peft_config
    # both adapters in one batch (the runner's routing): alpha through its slot, biased through PEFT
    for prompt, want_biased, want_alpha in zip(PROMPTS, want, bundle.refs["alpha"], strict=True):
        ids = [list(prompt), list(prompt)]
        for _ in range(N_NEW):
            rows = torch.tensor([slots.base_slot, slots.slot_of(alpha.version)])
            with slots.routing(rows, peft_rows=True):
                logits = peft(input_ids=torch.tensor(ids), adapter_names=[biased.version, "__base__"]).logits
            for row, token in zip(ids, logits[:, -1].argmax(-1).tolist(), strict=True):
                row.append(token)
        assert ids[0][len(prompt) :] == want_biased
        assert ids[1][len(prompt) :] == want_alpha
    store.release(biased)
    store.release(alpha)


def test_listener_set_late_takes_resident_adapters(bundle: Bundle, tmp_path: Path) -> None:
    store, _ = make_store(bundle, tmp_path, max_gpu_adapters=2, max_cpu_adapters=0)
    try:
        lease = wait_acquire(store, "alpha")  # no listener yet: into the PeftModel
        slots = SlotLoRA(store.model, num_slots=2, r_max=16, dtype=torch.float32, device=torch.device("cpu"))
        slots.enabled = True
        store.set_gpu_listener(slots)
        assert slots.supports(lease.version)
        assert [slot_greedy(store.model, slots, lease.version, p) for p in PROMPTS] == bundle.refs["alpha"]
        store.release(lease)
    finally:
        store.close()


def test_load_workers_must_be_positive(bundle: Bundle, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="load_workers"):
        make_store(bundle, tmp_path, load_workers=0)


class FailingSlots(Spy):
    """Injected fault: allocating the slot tensors of a new layer fails after some layers were filled."""

    def __init__(self, model: torch.nn.Module, fail_after: int, **kwargs: object) -> None:
        super().__init__(model, **kwargs)
        self.fail_after = fail_after

    def _layer(self, base: torch.nn.Module):  # type: ignore[no-untyped-def]
        if base not in self._layers and len(self._layers) >= self.fail_after:
            raise torch.OutOfMemoryError("injected: no memory for another layer's slot tensors")
        return super()._layer(base)


def test_a_failing_slot_fill_falls_back_to_peft_and_leaves_the_slot_clean(
    bundle: Bundle, tmp_path: Path
) -> None:
    store, _ = make_store(bundle, tmp_path, max_gpu_adapters=1, max_cpu_adapters=3)
    try:
        slots = FailingSlots(
            store.model, 5, num_slots=1, r_max=16, dtype=torch.float32, device=torch.device("cpu")
        )
        slots.enabled = True
        store.set_gpu_listener(slots)
        lease = wait_acquire(store, "alpha")  # q and v of 2 layers: 4 layers, fits
        assert slots.supports(lease.version)
        store.release(lease)
        lease = wait_acquire(
            store, "beta"
        )  # all 7 projections: fills layer 0 down_proj (a new layer), fails on gate_proj
        assert not slots.supports(lease.version)
        assert lease.version in store.model.peft_config  # served by PEFT instead
        slots.enabled = False
        try:
            assert [greedy(store.model, p, N_NEW, [lease.version]) for p in PROMPTS] == bundle.refs["beta"]
        finally:
            slots.enabled = True
        store.release(lease)
        lease = wait_acquire(store, "alpha")  # back into the slot beta half-filled: nothing of beta left
        assert slots.supports(lease.version)
        with slots.routing(torch.tensor([slots.slot_of(lease.version)])):
            assert [greedy(store.model, p, N_NEW) for p in PROMPTS] == bundle.refs["alpha"]
        store.release(lease)
    finally:
        store.close()


def test_cpu_tier_keeps_only_the_slot_form(
    slot_store: Callable[..., tuple[AdapterStore, Spy]], bundle: Bundle, tmp_path: Path
) -> None:
    from adapter_store import AdapterLoadError

    store, slots = slot_store(max_gpu_adapters=3, max_cpu_adapters=3)
    folder = _bias_adapter(bundle, tmp_path / "adapters" / "biased")
    store.load("biased", folder)
    leases = {name: wait_acquire(store, name) for name in ("alpha", "biased")}
    held = {a.source.name: a for a in store._cpu.values()}  # the CPU tier's copies
    assert not held["alpha"].state_dict and slots.serves(held["alpha"].prepared)  # slot form only
    assert held["biased"].state_dict and not slots.serves(held["biased"].prepared)  # PEFT needs it
    # materialize reads alpha's files again, and refuses if they changed in between
    peft = store.materialize(leases["alpha"].version)
    slots.enabled = False
    try:
        assert [greedy(peft, p, N_NEW, [leases["alpha"].version]) for p in PROMPTS] == bundle.refs["alpha"]
    finally:
        slots.enabled = True
    beta = wait_acquire(store, "beta")
    weights = tmp_path / "adapters" / "beta" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)  # same size, other bytes
    with pytest.raises(AdapterLoadError, match="changed on disk") as refused:
        store.materialize(beta.version)
    assert refused.value.status == 409
    assert slots.supports(beta.version) and beta.version not in peft.peft_config  # nothing half-done
    for lease in (*leases.values(), beta):
        store.release(lease)


def test_a_snapshot_build_holds_up_only_peft_promotions(
    slot_store: Callable[..., tuple[AdapterStore, Spy]], bundle: Bundle, tmp_path: Path
) -> None:
    store, slots = slot_store(max_gpu_adapters=2, max_cpu_adapters=2)
    store.load("biased", _bias_adapter(bundle, tmp_path / "adapters" / "biased"))
    with store._construct_lock:  # what a merged-snapshot build holds while it constructs its model
        lease = wait_acquire(store, "alpha")  # the slot path constructs nothing: no wait
        assert slots.supports(lease.version)
        with pytest.raises(TimeoutError):
            wait_acquire(store, "biased", timeout=1.0)  # PEFT's path must wait for the lock
    biased = wait_acquire(store, "biased")
    assert biased.version in store.model.peft_config
    store.release(lease)
    store.release(biased)
