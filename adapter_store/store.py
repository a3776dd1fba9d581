"""Adapter tiers: GPU (in the PeftModel) <- CPU (host state dicts) <- disk, with LRU, pinning and
background loads.

Threading. ``acquire``, ``release``, ``sync``, ``model`` and ``materialize`` belong to the engine thread:
only they touch the model. Disk reads run on a pool of loader threads; snapshot builds on another thread.
``load``, ``unload``, ``preload``, ``adapters``, ``build_snapshot`` and ``retire_snapshot`` are safe from any
thread: they only change bookkeeping, and the engine thread applies the change at its next ``sync``. One lock guards the bookkeeping; no model work runs
under it except on the engine thread.

Versions. Each version of an adapter lives in the PeftModel under its own name (``name@digest[:12]``).
Re-registering changed files makes the new version current: new acquires wait for (and get) it, leases on
the old one keep running on the old weights, and the old one is deleted when its last lease is released.

GPU tier listener. With one set (``server.runtime.slot_lora.SlotLoRA`` on CUDA), an adapter entering the GPU
tier goes to the listener first, in the form the listener prepared on the loader thread; only an adapter the
listener refuses is put into the PeftModel (PEFT's ``add_adapter`` + ``set_peft_model_state_dict``, most of
a second per all-linear adapter on an 8B model, on the engine thread). ``materialize`` puts a
listener-served adapter into the PeftModel too, for PEFT's own forward (the reference).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from peft import LoraConfig, PeftModelForCausalLM
from transformers import PreTrainedModel

from adapter_store.bnb_layout import stabilize_4bit_layers
from adapter_store.loader import AdapterLoadError, LoadedAdapter, inject, peft_name, read_adapter, remove
from adapter_store.registry import AdapterRefusedError, AdapterRegistry, AdapterSource
from adapter_store.snapshots import SnapshotManager
from adapter_store.torch_threads import serial_torch

log = logging.getLogger(__name__)

FAILURE_BACKOFF_S = 30.0


class StoreObserver(Protocol):
    """Receives the store's events (``server.metrics.Metrics`` implements it)."""

    def on_adapter_load(self, tier: str, seconds: float) -> None: ...
    def on_adapter_evict(self, tier: str) -> None: ...
    def on_adapter_resident(self, adapter: str, tier: str, resident: bool) -> None: ...
    def on_snapshot_active(self, adapter: str, active: bool) -> None: ...


class GpuTierListener(Protocol):
    """Serves GPU-tier adapters outside the PeftModel, e.g. ``server.runtime.slot_lora.SlotLoRA`` holding
    their weights in graph-friendly slot tensors.

    ``prepare`` and ``serves`` run on a loader thread (they must be thread-safe); the others on the engine
    thread, inside ``sync``. ``on_gpu_enter`` returns False when the listener cannot serve the adapter: the
    store then puts it into the PeftModel, and ``on_peft_change`` follows the PeftModel's adapters. When
    ``serves`` says the prepared form will do, the CPU tier keeps only that form (no PEFT state dict) and
    reads the files again if PEFT ever needs the adapter."""

    def prepare(self, config: LoraConfig, state_dict: dict[str, torch.Tensor]) -> object: ...
    def serves(self, prepared: object) -> bool: ...
    def on_gpu_enter(self, key: str, prepared: object) -> bool: ...
    def on_gpu_leave(self, key: str) -> None: ...
    def on_peft_change(self, peft_model: torch.nn.Module | None) -> None: ...


class ServingStore(Protocol):
    """What the runtime's ``ModelRunner`` needs of an adapter store (``AdapterStore`` implements it): the
    registry to answer which adapters exist, leases, the model to run, and the GPU tier listener hook."""

    registry: AdapterRegistry

    @property
    def model(self) -> torch.nn.Module: ...

    @property
    def max_gpu_adapters(self) -> int: ...

    def acquire(self, name: str) -> Lease | None: ...
    def release(self, lease: Lease) -> None: ...
    def sync(self) -> None: ...
    def set_wakeup(self, wake: Callable[[], None]) -> None: ...
    def set_gpu_listener(self, listener: GpuTierListener | None) -> None: ...


def _no_wakeup() -> None:
    pass


class _NullObserver:
    def on_adapter_load(self, tier: str, seconds: float) -> None:
        pass

    def on_adapter_evict(self, tier: str) -> None:
        pass

    def on_adapter_resident(self, adapter: str, tier: str, resident: bool) -> None:
        pass

    def on_snapshot_active(self, adapter: str, active: bool) -> None:
        pass


@dataclass(slots=True)
class Lease:
    """Pins one adapter version while a sequence uses it (``server.engine.types.AdapterLease``). Rows of a
    lease with ``snapshot`` run on that merged model; the others run on ``AdapterStore.model`` with
    ``adapter_names=[version, ...]``. ``version`` (``name@digest[:12]``) is the version's one name: the
    store's key, PEFT's adapter name and the LoRA slot key."""

    adapter: str
    version: str
    digest: str
    snapshot: torch.nn.Module | None = None

    @property
    def on_snapshot(self) -> bool:
        return self.snapshot is not None


@dataclass(slots=True)
class AdapterInfo:
    """One registered adapter as the admin API shows it."""

    name: str
    tier: str  # "gpu" | "cpu" | "disk"
    pinned: int
    digest: str
    requests: int
    snapshot: str  # "none" | "building" | "active" | "failed"
    rank: int
    path: str


@dataclass(slots=True)
class _GpuEntry:
    source: AdapterSource
    key: str
    in_peft: bool  # in the PeftModel (else only the GPU tier listener holds it)
    pins: int = 0


@dataclass(slots=True)
class _Failure:
    digest: str
    error: AdapterLoadError
    retry_at: float


class AdapterStore:
    """GPU/CPU/disk tiers of LoRA adapters over one resident base model."""

    def __init__(
        self,
        base_model: PreTrainedModel,
        registry: AdapterRegistry,
        *,
        max_gpu_adapters: int,
        max_cpu_adapters: int,
        observer: StoreObserver | None = None,
        base_loader: Callable[[], PreTrainedModel] | None = None,
        snapshot_policy: str = "manual",
        max_snapshots: int = 1,
        snapshot_share: float = 0.5,
        snapshot_window: int = 200,
        snapshot_min_requests: int = 20,
        snapshot_idle_s: float = 300.0,
        failure_backoff_s: float = FAILURE_BACKOFF_S,
        load_workers: int = 4,
    ) -> None:
        if max_gpu_adapters < 1 or max_cpu_adapters < 0 or load_workers < 1:
            raise ValueError("max_gpu_adapters and load_workers must be >= 1, max_cpu_adapters >= 0")
        stabilize_4bit_layers(base_model)  # PEFT reads the base's state_dict at every injection
        self._base = base_model
        self.registry = registry
        self._max_gpu = max_gpu_adapters
        self._max_cpu = max_cpu_adapters
        self._obs: StoreObserver = observer or _NullObserver()
        self._backoff = failure_backoff_s
        self._pin = next(base_model.parameters()).device.type == "cuda"
        self._peft: PeftModelForCausalLM | None = None
        self._gpu: collections.OrderedDict[str, _GpuEntry] = collections.OrderedDict()  # LRU first
        self._cpu: collections.OrderedDict[str, LoadedAdapter] = collections.OrderedDict()  # LRU first
        self._loading: dict[str, tuple[AdapterSource, Future[LoadedAdapter], float]] = {}
        self._wanted: dict[str, AdapterSource] = {}  # versions some acquirer waits for
        self._failed: dict[str, _Failure] = {}
        self._requests: collections.Counter[str] = collections.Counter()
        self._lock = threading.RLock()
        self._dirty = threading.Event()
        self._pool = ThreadPoolExecutor(
            max_workers=load_workers, thread_name_prefix="adapter-loader", initializer=serial_torch
        )
        # transformers/PEFT patch torch globally while constructing models: snapshot builds and
        # promotions must not overlap (a promotion waits for the next sync instead of blocking)
        self._construct_lock = threading.Lock()
        self._gpu_listener: GpuTierListener | None = None
        self._wakeup: Callable[[], None] = _no_wakeup
        self.snapshots = SnapshotManager(
            base_loader,
            policy=snapshot_policy,
            max_snapshots=max_snapshots,
            share=snapshot_share,
            on_active=self._obs.on_snapshot_active,
            window=snapshot_window,
            min_requests=snapshot_min_requests,
            idle_seconds=snapshot_idle_s,
            construct_lock=self._construct_lock,
        )

    @property
    def model(self) -> torch.nn.Module:
        """The PeftModel while it holds a GPU-tier adapter, else the base (whose LoRA layers, if any, hold no
        adapter and act as the plain base; a GPU tier listener's hooks, if any, sit on its linear layers).
        Pass ``adapter_names`` only to the PeftModel."""
        if self._peft is not None and any(e.in_peft for e in self._gpu.values()):
            return self._peft
        return self._base

    @property
    def max_gpu_adapters(self) -> int:
        return self._max_gpu

    def set_wakeup(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` (on a loader thread) when a background load ends: ``sync`` has news then."""
        self._wakeup = wake

    def set_gpu_listener(self, listener: GpuTierListener | None) -> None:
        """Serve the GPU tier through ``listener`` from now on (engine thread). Adapters already there stay
        in the PeftModel and are offered to the listener at once (read again from disk if need be)."""
        self._gpu_listener = listener
        if listener is None:
            return
        listener.on_peft_change(self._peft)
        for key, entry in self._gpu.items():
            loaded = self._cpu.get(key) or self._reread(entry.source)
            listener.on_gpu_enter(key, self._prepared(listener, loaded))

    def materialize(self, key: str) -> PeftModelForCausalLM:
        """Put GPU-tier adapter version ``key`` (a ``Lease.version``) into the PeftModel if only the GPU
        tier listener holds it, so PEFT's own forward can run it (the reference path); returns the PeftModel.
        Engine thread; reads the adapter again if the CPU tier holds no PEFT copy of it. KeyError: not on the
        GPU tier; AdapterLoadError: its files are gone or changed, or PEFT refuses it."""
        with self._lock:
            entry = self._gpu[key]
            if not entry.in_peft:
                loaded = self._with_weights(self._cpu.get(key) or self._reread(entry.source))
                with self._construct_lock:
                    self._peft = inject(self._peft, self._base, loaded, key)
                entry.in_peft = True
                if self._gpu_listener is not None:
                    self._gpu_listener.on_peft_change(self._peft)
            assert self._peft is not None
            return self._peft

    # --------------------------------------------------------------------------- engine thread only
    def acquire(self, name: str) -> Lease | None:
        """Pin ``name`` if it can run now; else start its load (once) and return None."""
        source = self.registry.get(name)
        if source is None:
            raise AdapterRefusedError("not_found", f"adapter {name!r} is not registered", status=404)
        key = peft_name(source.name, source.digest)
        with self._lock:
            snapshot = self.snapshots.lease(name, source.digest)
            entry = self._gpu.get(key)
            if snapshot is None and entry is None:
                self._want(source, key)
                return None
            if entry is not None:
                self._gpu.move_to_end(key)
                if snapshot is None:
                    entry.pins += 1
            self._requests[name] += 1
            self.snapshots.record(name)
            return Lease(name, key, source.digest, snapshot)

    def release(self, lease: Lease) -> None:
        with self._lock:
            if lease.snapshot is not None:
                self.snapshots.release(lease.adapter, lease.snapshot)
                return
            entry = self._gpu.get(lease.version)
            if entry is None:
                return
            entry.pins -= 1
            if entry.pins <= 0 and (self._wanted or not self._is_current(entry.source)):
                self._dirty.set()

    def sync(self) -> None:
        """Between steps: promote loaded adapters that are waited for, drop unpinned old versions,
        install/retire snapshots. Cheap when nothing changed."""
        if not self._dirty.is_set() and not self.snapshots.dirty():
            return
        with self._lock:
            self._dirty.clear()
            self._harvest_loads()
            for entry in list(self._gpu.values()):
                if entry.pins <= 0 and not self._is_current(entry.source):
                    self._evict_gpu(entry.key)
            for key, source in list(self._wanted.items()):
                if key in self._gpu or not self._is_current(source) or source.name in self._failed:
                    del self._wanted[key]
                elif key in self._cpu:
                    if not self._promote(key):
                        break  # all GPU slots pinned, or a snapshot is building: retry later
                elif key not in self._loading:
                    self._start_load(source)
            self._trim_cpu()
            self.snapshots.sync(self.registry.peek)

    # ------------------------------------------------------------------------------------ any thread
    def load(self, name: str, path: str | Path) -> AdapterInfo:
        """Register (or re-register: a changed file is a new version) and start loading it."""
        source = self.registry.register(name, path)
        key = peft_name(source.name, source.digest)
        with self._lock:
            self._failed.pop(name, None)
            if key not in self._gpu and key not in self._cpu and key not in self._loading:
                self._start_load(source)
            self._dirty.set()
            return self._info(source)

    def preload(self, names: list[str] | None = None) -> int:
        """Start reading registered adapters (all, or ``names``, in order) into the CPU tier, as many as it
        has room for, so that their first request skips the disk. Returns how many loads started."""
        with self._lock:
            room = self._max_cpu - len(self._cpu) - len(self._loading)
            started = 0
            for name in self.registry.names() if names is None else names:
                if started >= room:
                    break
                source = self.registry.peek(name)
                if source is None:
                    continue
                key = peft_name(source.name, source.digest)
                if key not in self._gpu and key not in self._cpu and key not in self._loading:
                    self._start_load(source)
                    started += 1
            return started

    def unload(self, name: str) -> None:
        """Unregister ``name``; its GPU copy goes once unpinned, its CPU copy at once."""
        self.registry.unregister(name)
        with self._lock:
            self._failed.pop(name, None)
            for key in [k for k, a in self._cpu.items() if a.source.name == name]:
                self._drop_cpu(key)
            self.snapshots.retire(name)
            self._dirty.set()

    def adapters(self) -> list[AdapterInfo]:
        with self._lock:
            return [self._info(s) for n in self.registry.names() if (s := self.registry.peek(n)) is not None]

    def build_snapshot(self, name: str) -> None:
        source = self.registry.get(name)
        if source is None:
            raise AdapterRefusedError("not_found", f"adapter {name!r} is not registered", status=404)
        with self._lock:
            self.snapshots.request(source)

    def retire_snapshot(self, name: str) -> None:
        with self._lock:
            if not self.snapshots.retire(name):
                raise AdapterRefusedError("not_found", f"adapter {name!r} has no snapshot", status=404)

    def close(self) -> None:
        """Stop the loader and snapshot threads (waits for a snapshot build in progress)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.snapshots.close()

    # ------------------------------------------------------------------------------------- internals
    def _is_current(self, source: AdapterSource) -> bool:
        current = self.registry.peek(source.name)
        return current is not None and current.digest == source.digest

    def _want(self, source: AdapterSource, key: str) -> None:
        failure = self._failed.get(source.name)
        if failure is not None:
            if failure.digest == source.digest and time.monotonic() < failure.retry_at:
                e = failure.error  # a fresh instance per raise: tracebacks must not pile up
                raise AdapterLoadError(e.message, status=e.status, reason=e.reason)
            del self._failed[source.name]
        if key not in self._wanted:
            self._wanted[key] = source
            self._dirty.set()
        if key not in self._cpu and key not in self._loading:
            self._start_load(source)

    def _start_load(self, source: AdapterSource) -> None:
        key = peft_name(source.name, source.digest)
        future = self._pool.submit(self._read, source, self._gpu_listener)
        future.add_done_callback(self._load_done)
        self._loading[key] = (source, future, time.perf_counter())

    def _load_done(self, _: Future[LoadedAdapter]) -> None:
        self._dirty.set()
        self._wakeup()

    def _harvest_loads(self) -> None:
        for key, (source, future, t0) in list(self._loading.items()):
            if not future.done():
                continue
            del self._loading[key]
            try:
                loaded = future.result()
            except AdapterLoadError as e:
                self._fail(source, e)
                continue
            except Exception as e:  # an unexpected loader bug fails this adapter, not the server
                log.exception("loading adapter %s failed", source.name)
                self._fail(source, AdapterLoadError(f"adapter {source.name!r} failed to load: {e}"))
                continue
            if loaded.digest != source.digest:
                # the files changed after registration: re-validate; the new version loads on demand
                try:
                    self.registry.register(source.name, source.path)
                except AdapterRefusedError as e:
                    self._fail(source, AdapterLoadError(str(e), status=e.status, reason=e.reason))
                continue
            self._cpu[key] = loaded
            self._obs.on_adapter_load("cpu", time.perf_counter() - t0)
            self._obs.on_adapter_resident(source.name, "cpu", True)

    def _read(self, source: AdapterSource, listener: GpuTierListener | None) -> LoadedAdapter:
        """Loader thread: disk -> host state dict (pinned on CUDA unless a listener takes the adapter in its
        own form, which it then prepares here too)."""
        loaded = read_adapter(source, pin_memory=self._pin and listener is None)
        if listener is not None and listener.serves(self._prepared(listener, loaded)):
            loaded.state_dict = {}  # the prepared form is all the GPU tier needs: half the host memory or less
        return loaded

    def _prepared(self, listener: GpuTierListener, loaded: LoadedAdapter) -> object:
        if loaded.prepared_by is not listener:
            loaded.prepared = listener.prepare(loaded.config, self._with_weights(loaded).state_dict)
            loaded.prepared_by = listener
        return loaded.prepared

    def _with_weights(self, loaded: LoadedAdapter) -> LoadedAdapter:
        """``loaded`` if it still holds its PEFT state dict, else the same version read again from disk."""
        return loaded if loaded.state_dict else self._reread(loaded.source)

    @staticmethod
    def _reread(source: AdapterSource) -> LoadedAdapter:
        loaded = read_adapter(source)
        if loaded.digest != source.digest:
            raise AdapterLoadError(f"adapter {source.name!r} changed on disk since it was loaded", status=409)
        return loaded

    def _fail(self, source: AdapterSource, error: AdapterLoadError) -> None:
        log.warning("adapter %s: %s", source.name, error)
        self._failed[source.name] = _Failure(source.digest, error, time.monotonic() + self._backoff)

    def _promote(self, key: str) -> bool:
        """CPU tier -> GPU tier listener, or the PeftModel if the listener refuses it (or none is set),
        evicting the LRU unpinned GPU adapter if full. False if it must wait: every GPU slot is pinned, or
        it needs the PeftModel while a snapshot build holds the construction lock (the listener's path
        constructs no module, so a snapshot build never holds it up)."""
        while len(self._gpu) >= self._max_gpu:
            victim = next((e.key for e in self._gpu.values() if e.pins <= 0), None)
            if victim is None:
                return False
            self._evict_gpu(victim)
        loaded = self._cpu[key]
        t0 = time.perf_counter()
        listener = self._gpu_listener
        in_peft = listener is None or not self._listener_takes(listener, key, loaded)
        if in_peft:
            if not self._construct_lock.acquire(blocking=False):
                self._dirty.set()  # retry at the next sync
                return False
            try:
                self._peft = inject(self._peft, self._base, self._with_weights(loaded), key)
            except AdapterLoadError as e:
                del self._wanted[key]
                self._fail(loaded.source, e)
                return True
            finally:
                self._construct_lock.release()
        self._cpu.move_to_end(key)
        del self._wanted[key]
        self._gpu[key] = _GpuEntry(loaded.source, key, in_peft)
        if in_peft and listener is not None:
            listener.on_peft_change(self._peft)
        self._obs.on_adapter_load("gpu", time.perf_counter() - t0)
        self._obs.on_adapter_resident(loaded.source.name, "gpu", True)
        return True

    def _listener_takes(self, listener: GpuTierListener, key: str, loaded: LoadedAdapter) -> bool:
        try:
            return listener.on_gpu_enter(key, self._prepared(listener, loaded))
        except Exception:  # e.g. out of device memory for new slot tensors: PEFT's path may still fit
            log.exception("the GPU tier listener failed on adapter %s; it runs on PEFT's forward", key)
            return False

    def _evict_gpu(self, key: str) -> None:
        entry = self._gpu.pop(key)
        if self._gpu_listener is not None:
            self._gpu_listener.on_gpu_leave(key)
        if entry.in_peft and self._peft is not None:
            remove(self._peft, key)
            if self._gpu_listener is not None:
                self._gpu_listener.on_peft_change(self._peft)
        self._obs.on_adapter_evict("gpu")
        if not any(e.source.name == entry.source.name for e in self._gpu.values()):
            self._obs.on_adapter_resident(entry.source.name, "gpu", False)

    def _trim_cpu(self) -> None:
        for key in [k for k, a in self._cpu.items() if not self._is_current(a.source)]:
            self._drop_cpu(key)
        for key in list(self._cpu):
            if len(self._cpu) <= self._max_cpu:
                break
            if key not in self._wanted:
                self._drop_cpu(key)
                self._obs.on_adapter_evict("cpu")

    def _drop_cpu(self, key: str) -> None:
        name = self._cpu.pop(key).source.name
        if not any(a.source.name == name for a in self._cpu.values()):
            self._obs.on_adapter_resident(name, "cpu", False)

    def _info(self, source: AdapterSource) -> AdapterInfo:
        key = peft_name(source.name, source.digest)
        tier = "gpu" if key in self._gpu else "cpu" if key in self._cpu else "disk"
        pinned = sum(e.pins for e in self._gpu.values() if e.source.name == source.name)
        pinned += self.snapshots.pins(source.name)
        snapshot = self.snapshots.state(source.name)
        snapshot = "none" if snapshot == "retiring" else snapshot
        return AdapterInfo(
            source.name,
            tier,
            pinned,
            source.digest,
            self._requests[source.name],
            snapshot,
            source.rank,
            str(source.path),
        )
