"""AdapterStore on a tiny NF4 Llama (CPU): tiers, LRU, pinning, background loads, versions."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import adapter_store.store as store_module
from adapter_store import (
    AdapterLoadError,
    AdapterRefusedError,
    AdapterRegistry,
    AdapterStore,
    Lease,
    LoadedAdapter,
    read_adapter,
)
from tests.integration.store_helpers import (
    BASE_ID,
    MODULES,
    PROMPTS,
    greedy,
    load_nf4,
    make_adapter,
    make_base,
    one_torch_thread,
    reference,
)

N_NEW = 4
SPECS = {  # name -> (seed, rank, targets)
    "alpha": (1, 4, ("q_proj", "v_proj")),
    "beta": (2, 8, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    "gamma": (3, 2, ("down_proj", "lm_head")),
}


@dataclass
class Bundle:
    base: Path
    adapter_dir: Path
    refs: dict[str, list[list[int]]]  # adapter -> greedy output per prompt (PEFT, adapter alone)
    base_refs: list[list[int]]
    v2: Path  # a second version of "alpha"
    v2_refs: list[list[int]]


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture(scope="session")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    with one_torch_thread():
        return _make_bundle(tmp_path_factory.mktemp("store"))


def _make_bundle(root: Path) -> Bundle:
    base = make_base(root / "base")
    adapter_dir = root / "adapters"
    for name, (seed, r, targets) in SPECS.items():
        make_adapter(base, adapter_dir / name, seed=seed, r=r, targets=targets)
    v2 = make_adapter(base, root / "alpha-v2", seed=99, r=4, targets=("q_proj", "v_proj"))
    refs = {n: [reference(base, adapter_dir / n, p, N_NEW) for p in PROMPTS] for n in SPECS}
    base_model = load_nf4(base)
    return Bundle(
        base,
        adapter_dir,
        refs,
        [greedy(base_model, p, N_NEW) for p in PROMPTS],
        v2,
        [reference(base, v2, p, N_NEW) for p in PROMPTS],
    )


@dataclass
class Recorder:
    """A StoreObserver that keeps every event."""

    events: list[tuple[str, ...]] = field(default_factory=list)

    def on_adapter_load(self, tier: str, seconds: float) -> None:
        self.events.append(("load", tier))

    def on_adapter_evict(self, tier: str) -> None:
        self.events.append(("evict", tier))

    def on_adapter_resident(self, adapter: str, tier: str, resident: bool) -> None:
        self.events.append(("resident", adapter, tier, str(resident)))

    def on_snapshot_active(self, adapter: str, active: bool) -> None:
        self.events.append(("snapshot", adapter, str(active)))


def make_store(bundle: Bundle, tmp_path: Path, **kwargs: object) -> tuple[AdapterStore, Recorder]:
    adapter_dir = tmp_path / "adapters"
    shutil.copytree(bundle.adapter_dir, adapter_dir)
    registry = AdapterRegistry(
        [adapter_dir],
        adapter_dir=adapter_dir,
        base_model_ids=[BASE_ID],
        base_module_names=MODULES,
        max_lora_rank=16,
    )
    assert registry.scan() == []
    recorder = Recorder()
    options: dict = {"max_gpu_adapters": 1, "max_cpu_adapters": 1, "observer": recorder}
    options.update(kwargs)
    return AdapterStore(load_nf4(bundle.base), registry, **options), recorder


@pytest.fixture
def store_factory(bundle: Bundle, tmp_path: Path) -> Iterator[Callable[..., tuple[AdapterStore, Recorder]]]:
    made: list[AdapterStore] = []

    def factory(**kwargs: object) -> tuple[AdapterStore, Recorder]:
        store, rec = make_store(bundle, tmp_path, **kwargs)
        made.append(store)
        return store, rec

    yield factory
    for s in made:
        s.close()


def wait_acquire(store: AdapterStore, name: str, timeout: float = 30.0) -> Lease:
    """What the engine does: acquire, and between steps sync, until the adapter is resident."""
    deadline = time.monotonic() + timeout
    while (lease := store.acquire(name)) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} never became resident")
        store.sync()
        time.sleep(0.002)
    return lease


def run(store: AdapterStore, lease: Lease, prompt: list[int]) -> list[int]:
    if lease.snapshot is not None:
        return greedy(lease.snapshot, prompt, N_NEW)
    return greedy(store.model, prompt, N_NEW, [lease.version])


def test_round_robin_over_more_adapters_than_slots(store_factory: Callable, bundle: Bundle) -> None:
    store, rec = store_factory(max_gpu_adapters=1, max_cpu_adapters=1)
    assert store.model is not None and greedy(store.model, PROMPTS[0], N_NEW) == bundle.base_refs[0]
    for _ in range(2):
        for name in SPECS:
            lease = wait_acquire(store, name)
            assert run(store, lease, PROMPTS[0]) == bundle.refs[name][0], name
            assert greedy(store.model, PROMPTS[0], N_NEW, ["__base__"]) == bundle.base_refs[0]
            store.release(lease)
            tiers = {a.name: a.tier for a in store.adapters()}
            assert tiers[name] == "gpu" and list(tiers.values()).count("gpu") == 1
    assert rec.events.count(("evict", "gpu")) == 5
    assert rec.events.count(("load", "cpu")) == 6  # CPU tier of 1 slot: every turn is a disk read
    assert {a.name: a.requests for a in store.adapters()} == dict.fromkeys(SPECS, 2)


def test_cpu_tier_makes_reloads_skip_the_disk(store_factory: Callable, bundle: Bundle) -> None:
    store, rec = store_factory(max_gpu_adapters=1, max_cpu_adapters=3)
    for _ in range(2):
        for name in SPECS:
            lease = wait_acquire(store, name)
            assert run(store, lease, PROMPTS[1]) == bundle.refs[name][1]
            store.release(lease)
    assert rec.events.count(("load", "cpu")) == 3 and rec.events.count(("load", "gpu")) == 6


def test_preload_fills_the_cpu_tier_before_any_request(store_factory: Callable, bundle: Bundle) -> None:
    store, rec = store_factory(max_gpu_adapters=1, max_cpu_adapters=2)
    assert store.preload(["nope", "gamma"]) == 1  # an unknown name is skipped
    assert store.preload() == 1  # room for one more: the first by name
    deadline = time.monotonic() + 30
    while {a.name: a.tier for a in store.adapters()} != {"alpha": "cpu", "beta": "disk", "gamma": "cpu"}:
        assert time.monotonic() < deadline, "preload never finished"
        store.sync()
        time.sleep(0.01)
    assert store.preload() == 0  # full
    preloaded = [a.name for a in store.adapters() if a.tier == "cpu"]
    for name in preloaded:
        lease = wait_acquire(store, name)
        assert run(store, lease, PROMPTS[0]) == bundle.refs[name][0]
        store.release(lease)
    assert rec.events.count(("load", "cpu")) == 2  # the requests found them in host memory


def test_mixed_batch_rows(store_factory: Callable, bundle: Bundle) -> None:
    store, _ = store_factory(max_gpu_adapters=3, max_cpu_adapters=0)
    leases = [wait_acquire(store, n) for n in SPECS]
    names = [lease.version for lease in leases] + ["__base__"]
    prompt = PROMPTS[0]
    ids = [list(prompt) for _ in names]
    with torch.inference_mode():
        for _ in range(N_NEW):
            logits = store.model(input_ids=torch.tensor(ids), adapter_names=names).logits
            for row, tok in zip(ids, logits[:, -1].argmax(-1).tolist(), strict=True):
                row.append(tok)
    outputs = [row[len(prompt) :] for row in ids]
    assert outputs == [bundle.refs[n][0] for n in SPECS] + [bundle.base_refs[0]]


def test_adapter_copy_of_a_base_layer_never_reaches_the_base(
    store_factory: Callable, bundle: Bundle, tmp_path: Path
) -> None:
    """PEFT saves lm_head's base weight with an adapter that targets lm_head (gamma); PEFT's loading would
    write it into the shared base. A tampered copy must change nothing, for gamma or for anyone else."""
    from safetensors.torch import load_file, save_file

    store, _ = store_factory(max_gpu_adapters=2, max_cpu_adapters=0)
    folder = tmp_path / "adapters" / "gamma"  # the store's own copy of the adapters
    weights = load_file(folder / "adapter_model.safetensors")
    copies = [k for k in weights if ".base_layer." in k]
    assert copies  # PEFT did save one
    save_file(
        {k: torch.zeros_like(v) if k in copies else v for k, v in weights.items()},
        folder / "adapter_model.safetensors",
    )
    store.load("gamma", folder)
    gamma, alpha = wait_acquire(store, "gamma"), wait_acquire(store, "alpha")
    assert run(store, gamma, PROMPTS[0]) == bundle.refs["gamma"][0]
    assert run(store, alpha, PROMPTS[0]) == bundle.refs["alpha"][0]
    assert greedy(store.model, PROMPTS[0], N_NEW, ["__base__"]) == bundle.base_refs[0]


def test_pinned_adapters_are_never_evicted(store_factory: Callable, bundle: Bundle) -> None:
    store, _ = store_factory(max_gpu_adapters=1, max_cpu_adapters=2)
    pinned = [wait_acquire(store, "alpha") for _ in range(3)]
    stop = threading.Event()
    errors: list[BaseException] = []

    def admin() -> None:  # other threads hammer the any-thread API meanwhile
        try:
            while not stop.is_set():
                store.load("gamma", "gamma")
                store.adapters()
        except BaseException as e:
            errors.append(e)
            raise

    threads = [threading.Thread(target=admin) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for _ in range(100):
            assert store.acquire("beta") is None  # waits: the only GPU slot is pinned
            store.sync()
            time.sleep(0.002)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors
    info = {a.name: a for a in store.adapters()}
    assert info["alpha"].tier == "gpu" and info["alpha"].pinned == 3 and info["beta"].tier == "cpu"
    assert run(store, pinned[0], PROMPTS[2]) == bundle.refs["alpha"][2]
    for lease in pinned[:2]:
        store.release(lease)
    store.sync()
    assert store.acquire("beta") is None  # one pin left
    store.release(pinned[2])
    lease = wait_acquire(store, "beta")
    assert run(store, lease, PROMPTS[2]) == bundle.refs["beta"][2]


def test_one_load_for_many_cold_requests(store_factory: Callable, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    gate = threading.Event()

    def slow_read(source: object, *, pin_memory: bool = False) -> LoadedAdapter:
        calls.append(source.name)  # type: ignore[attr-defined]
        gate.wait(10)
        return read_adapter(source, pin_memory=pin_memory)  # type: ignore[arg-type]

    monkeypatch.setattr(store_module, "read_adapter", slow_read)
    store, _ = store_factory(max_gpu_adapters=2)
    for _ in range(50):
        assert store.acquire("alpha") is None
        store.sync()
    gate.set()
    leases = [wait_acquire(store, "alpha") for _ in range(50)]
    assert calls == ["alpha"] and len({lease.version for lease in leases}) == 1


def test_failed_load_fails_only_that_adapter(
    store_factory: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    def flaky_read(source: object, *, pin_memory: bool = False) -> LoadedAdapter:
        calls.append(source.name)  # type: ignore[attr-defined]
        if source.name == "beta":  # type: ignore[attr-defined]
            raise AdapterLoadError("beta is broken", status=422)
        return read_adapter(source, pin_memory=pin_memory)  # type: ignore[arg-type]

    monkeypatch.setattr(store_module, "read_adapter", flaky_read)
    store, _ = store_factory(max_gpu_adapters=2, failure_backoff_s=3600)
    assert store.acquire("beta") is None
    with pytest.raises(AdapterLoadError) as err:
        for _ in range(1000):
            store.sync()
            store.acquire("beta")
            time.sleep(0.002)
    assert err.value.status == 422
    for _ in range(5):  # no hot retry loop: the failure is remembered
        store.sync()
        with pytest.raises(AdapterLoadError):
            store.acquire("beta")
    assert calls.count("beta") == 1
    store.release(wait_acquire(store, "alpha"))  # others keep serving
    with pytest.raises(AdapterRefusedError) as refused:
        store.acquire("nobody")
    assert refused.value.status == 404
    store.load("beta", "beta")  # re-registration clears the failure and retries (on the loader thread)
    deadline = time.monotonic() + 10
    while calls.count("beta") < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert calls.count("beta") == 2


def test_atomic_version_swap(store_factory: Callable, bundle: Bundle, tmp_path: Path) -> None:
    store, _ = store_factory(max_gpu_adapters=2, max_cpu_adapters=2)
    old = wait_acquire(store, "alpha")
    shutil.rmtree(tmp_path / "adapters" / "alpha")
    shutil.copytree(bundle.v2, tmp_path / "adapters" / "alpha")
    info = store.load("alpha", "alpha")
    assert info.digest != old.digest
    new = wait_acquire(store, "alpha")
    assert new.version != old.version and new.digest == info.digest
    # running requests finish on the old weights; new ones get the new
    assert run(store, old, PROMPTS[0]) == bundle.refs["alpha"][0]
    assert run(store, new, PROMPTS[0]) == bundle.v2_refs[0]
    peft = store.model
    store.sync()
    assert old.version in peft.peft_config  # type: ignore[operator]
    store.release(old)
    store.sync()
    assert old.version not in peft.peft_config  # type: ignore[operator]
    assert run(store, new, PROMPTS[1]) == bundle.v2_refs[1]


def test_unload_waits_for_pins(store_factory: Callable, bundle: Bundle) -> None:
    store, _ = store_factory(max_gpu_adapters=2)
    lease = wait_acquire(store, "gamma")
    store.unload("gamma")
    with pytest.raises(AdapterRefusedError):
        store.acquire("gamma")
    store.sync()
    assert run(store, lease, PROMPTS[0]) == bundle.refs["gamma"][0]
    store.release(lease)
    store.sync()
    assert "gamma" not in [a.name for a in store.adapters()]
    assert store.model is not None and greedy(store.model, PROMPTS[0], N_NEW) == bundle.base_refs[0]
