"""Merged snapshots: a second resident copy of the base with one adapter merged in, for a hot tenant.

A snapshot runs its adapter's rows without the per-layer LoRA detour (and without PEFT's host-side
``adapter_names`` bookkeeping), at the cost of one more copy of the base in memory. It is built on a
background thread from ``base_loader()`` (never on the serving path: merging an 8B NF4 base takes ~20 s on
an H100), installed by ``AdapterStore.sync`` on the engine thread, and used by that adapter's *new* leases.
It is retired by the admin, when its adapter goes cold (no lease for ``idle_seconds``; under the ``auto``
policy also when its share of recent traffic falls below half of ``snapshot_share``), when its adapter gets
a new version, or to make room under ``max_snapshots``; a retiring snapshot is dropped once unpinned.

Drift. On an NF4 base, ``merge_and_unload`` dequantizes each targeted weight, adds ``B @ A * scale`` and
quantizes the sum again to NF4, so the merged weights carry a fresh rounding error of the order of the NF4
step (about 1/8 of each block's absmax) wherever the LoRA delta moved a value across a code boundary.
Snapshot outputs therefore differ slightly from the unmerged path. Measured with
``benchmarks/adapter_load.py`` on CPU, tiny random-weight NF4 Llama (hidden 64, 2 layers), 4 prompts x 16
greedy tokens: max |logit diff| 0.04 (rank 2, down_proj) / 0.12 (rank 4, q,v) / 0.38 (rank 8, all linear),
mean 0.006-0.025; teacher-forced greedy agreement 74-90% (random weights give near-flat logits, so ties
flip easily: an upper bound on the damage, a trained model agrees more). The unmerged PEFT path stays the
reference; a snapshot is an opt-in trade of exactness for speed. On the trained demo bundle (CPU, same
script, 4 prompts x 16 tokens): max |logit diff| 5.2 / 9.2 / 6.9 (shout r16 / digits r8 / pirate r4; trained
logits are large), mean 0.30-0.37, teacher-forced greedy agreement 97% / 99% / 93%, identical free-running
greedy sequences 3/4, 3/4, 1/4.

Model construction in transformers and PEFT patches torch process-wide (init functions,
``Module.register_parameter``), so a build holds the store's construction lock: adapter promotions wait
(at the next ``sync``) while a snapshot is being built.
"""

from __future__ import annotations

import collections
import gc
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

import torch
from peft import PeftModelForCausalLM, set_peft_model_state_dict

from adapter_store.bnb_layout import is_cpu_packed, stabilize_4bit_layers
from adapter_store.loader import AdapterLoadError, read_adapter
from adapter_store.registry import AdapterSource
from adapter_store.torch_threads import serial_torch

log = logging.getLogger(__name__)

SnapshotState = Literal["none", "building", "active", "retiring", "failed"]


def build_merged(base_loader: Callable[[], torch.nn.Module], source: AdapterSource) -> torch.nn.Module:
    """Fresh base + ``source`` merged (``merge_and_unload``): a plain model with no LoRA layers."""
    adapter = read_adapter(source)
    if adapter.digest != source.digest:
        raise AdapterLoadError(f"adapter {source.name!r} changed on disk; register it again", status=409)
    base = base_loader()
    if any(is_cpu_packed(m) for m in base.modules()):
        # PEFT's merge dequantizes each weight with bitsandbytes' canonical layout: a packed one would merge
        # into garbage. A base that has never run a forward is never packed.
        raise AdapterLoadError("the snapshot's base has already run on the CPU; load a fresh one", status=500)
    stabilize_4bit_layers(base)
    peft = PeftModelForCausalLM(base, adapter.config, adapter_name="snapshot", low_cpu_mem_usage=True)
    set_peft_model_state_dict(peft, adapter.state_dict, adapter_name="snapshot", low_cpu_mem_usage=True)
    merged = peft.merge_and_unload()
    stabilize_4bit_layers(merged)  # merging made new 4-bit layers
    merged.eval()
    return merged


@dataclass(slots=True, frozen=True)
class DriftReport:
    """How far a merged snapshot's outputs are from the unmerged adapter's."""

    max_abs_logit_diff: float  # over every position of every prompt (teacher-forced)
    mean_abs_logit_diff: float
    token_agreement: float  # share of positions where both pick the same greedy token
    identical_sequences: int  # free-running greedy outputs equal to the reference's
    prompts: int


@torch.inference_mode()
def measure_drift(
    reference: torch.nn.Module,
    adapter_name: str,
    snapshot: torch.nn.Module,
    prompts: list[list[int]],
    new_tokens: int = 16,
) -> DriftReport:
    """Compare ``snapshot`` with ``reference`` (a PeftModel run with ``adapter_names=[adapter_name]``)."""
    max_diff, diffs, agree, total, identical = 0.0, [], 0, 0, 0
    for prompt in prompts:
        seqs = []
        for model, kwargs in ((reference, {"adapter_names": [adapter_name]}), (snapshot, {})):
            ids = list(prompt)
            for _ in range(new_tokens):
                logits = model(input_ids=torch.tensor([ids], device=_device(model)), **kwargs).logits
                ids.append(int(logits[0, -1].argmax()))
            seqs.append(ids)
        identical += seqs[0] == seqs[1]
        ids_t = torch.tensor([seqs[0]], device=_device(reference))
        ref = reference(input_ids=ids_t, adapter_names=[adapter_name]).logits[0].float()
        got = snapshot(input_ids=ids_t.to(_device(snapshot))).logits[0].float().to(ref.device)
        diff = (ref - got).abs()
        max_diff = max(max_diff, float(diff.max()))
        diffs.append(float(diff.mean()))
        agree += int((ref.argmax(-1) == got.argmax(-1))[len(prompt) - 1 :].sum())
        total += len(seqs[0]) - len(prompt) + 1
    return DriftReport(max_diff, sum(diffs) / len(diffs), agree / total, identical, len(prompts))


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@dataclass(slots=True)
class Snapshot:
    """One snapshot of one adapter version."""

    name: str
    digest: str
    state: SnapshotState = "building"
    model: torch.nn.Module | None = None
    pins: int = 0
    last_used: float = field(default_factory=time.monotonic)
    future: Future[torch.nn.Module] | None = None
    error: str | None = None
    build_seconds: float = 0.0


class SnapshotManager:
    """Snapshots by adapter name; the ``AdapterStore`` holds one and calls it under its own lock.
    ``lease``/``release``/``sync`` run on the engine thread; ``request``/``retire`` on any thread."""

    def __init__(
        self,
        base_loader: Callable[[], torch.nn.Module] | None,
        *,
        policy: str,
        max_snapshots: int,
        share: float,
        on_active: Callable[[str, bool], None],
        window: int = 200,
        min_requests: int = 20,
        idle_seconds: float = 300.0,
        construct_lock: threading.Lock | None = None,
    ) -> None:
        self._base_loader = base_loader
        self._construct_lock = construct_lock or threading.Lock()
        self.policy = policy
        self._max = max_snapshots
        self._share = share
        self._on_active = on_active
        self._traffic: collections.deque[str] = collections.deque(maxlen=window)
        self._min_requests = min_requests
        self._idle = idle_seconds
        self._snaps: dict[str, Snapshot] = {}
        self._retiring: list[Snapshot] = []
        self._pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="snapshot-builder", initializer=serial_torch
        )
        self._changed = threading.Event()
        self._requests_seen = 0
        self._last_idle_check = 0.0

    @property
    def enabled(self) -> bool:
        return self._base_loader is not None and self.policy != "off" and self._max > 0

    def state(self, name: str) -> str:
        snap = self._snaps.get(name)
        return "none" if snap is None else snap.state

    def pins(self, name: str) -> int:
        """Leases running on snapshots of ``name`` (the current one and any retiring ones)."""
        return sum(
            s.pins for s in [self._snaps.get(name), *self._retiring] if s is not None and s.name == name
        )

    def count_active(self) -> int:
        return sum(1 for s in self._snaps.values() if s.state == "active")

    # ------------------------------------------------------------------------------ engine thread
    def record(self, name: str) -> None:
        self._traffic.append(name)
        self._requests_seen += 1

    def lease(self, name: str, digest: str) -> torch.nn.Module | None:
        snap = self._snaps.get(name)
        if snap is None or snap.state != "active" or snap.digest != digest or snap.model is None:
            return None
        snap.pins += 1
        snap.last_used = time.monotonic()
        return snap.model

    def release(self, name: str, model: torch.nn.Module) -> None:
        for snap in [self._snaps.get(name), *self._retiring]:
            if snap is not None and snap.model is model:
                snap.pins -= 1
                if snap.pins <= 0 and snap.state == "retiring":
                    self._changed.set()
                return

    def dirty(self) -> bool:
        if self._changed.is_set() or (self.policy == "auto" and self._requests_seen > 0):
            return True
        return bool(self._snaps) and time.monotonic() - self._last_idle_check > 1.0  # idle retirement

    def sync(self, current: Callable[[str], AdapterSource | None]) -> None:
        """Install finished builds, retire cold/stale/unpinned ones, apply the auto policy."""
        self._changed.clear()
        for name, snap in list(self._snaps.items()):
            if snap.state == "building" and snap.future is not None and snap.future.done():
                self._install(snap)
            src = current(name)
            if snap.state in ("active", "building") and (src is None or src.digest != snap.digest):
                self._retire(snap)
        now = time.monotonic()
        if now - self._last_idle_check > 1.0:
            self._last_idle_check = now
            for snap in list(self._snaps.values()):
                if snap.state == "active" and snap.pins == 0 and now - snap.last_used > self._idle:
                    log.info("snapshot of %s retired: idle for %.0f s", snap.name, now - snap.last_used)
                    self._retire(snap)
        if self.policy == "auto" and self._requests_seen:
            self._requests_seen = 0
            self._auto(current)
        freed = [s for s in self._retiring if s.pins <= 0]
        if freed:
            self._retiring = [s for s in self._retiring if s.pins > 0]
            for s in freed:
                s.model = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    # ----------------------------------------------------------------------------------- any thread
    def request(self, source: AdapterSource) -> None:
        """Start building a snapshot of ``source`` (no-op if one exists or is building for that version)."""
        if self._base_loader is None or self.policy == "off":
            raise AdapterLoadError(
                "merged snapshots are disabled on this server", status=409, reason="disabled"
            )
        if self._max <= 0:
            raise AdapterLoadError(
                "max_snapshots is 0: no snapshot can be built", status=409, reason="disabled"
            )
        snap = self._snaps.get(source.name)
        if snap is not None and snap.digest == source.digest and snap.state in ("building", "active"):
            return
        if snap is not None:
            self._retire(snap)
        live = [s for s in self._snaps.values() if s.state in ("building", "active")]
        while len(live) >= self._max:
            victims = sorted((s for s in live if s.state == "active"), key=lambda s: s.last_used)
            if not victims:
                raise AdapterLoadError(
                    "every snapshot slot is busy building; retry later", status=409, reason="busy"
                )
            self._retire(victims[0])
            live.remove(victims[0])
        snap = Snapshot(source.name, source.digest)
        snap.future = self._pool.submit(self._build, source, snap)
        self._snaps[source.name] = snap

    def retire(self, name: str) -> bool:
        snap = self._snaps.get(name)
        if snap is None or snap.state not in ("building", "active", "failed"):
            return False
        self._retire(snap)
        self._changed.set()
        return True

    def close(self) -> None:
        """Cancel queued builds and wait for a running one (it holds the construction lock)."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    # ------------------------------------------------------------------------------------ internals
    def _build(self, source: AdapterSource, snap: Snapshot) -> torch.nn.Module:
        if self._base_loader is None:
            raise AdapterLoadError("snapshots are disabled", status=409)
        t0 = time.perf_counter()
        try:
            # transformers and PEFT patch torch process-wide while they build models (init functions,
            # Module.register_parameter): no other model construction may run meanwhile.
            with self._construct_lock, torch.inference_mode():
                return build_merged(self._base_loader, source)
        finally:
            snap.build_seconds = time.perf_counter() - t0
            self._changed.set()

    def _install(self, snap: Snapshot) -> None:
        assert snap.future is not None  # building snapshots always carry their future
        try:
            snap.model = snap.future.result()
        except Exception as e:  # a failed build fails only the snapshot; the adapter keeps serving unmerged
            snap.state, snap.error = "failed", str(e)
            log.warning("snapshot of %s failed: %s", snap.name, e)
            return
        snap.state, snap.last_used = "active", time.monotonic()
        log.info("snapshot of %s active (built in %.2f s)", snap.name, snap.build_seconds)
        self._on_active(snap.name, True)

    def _retire(self, snap: Snapshot) -> None:
        was_active = snap.state == "active"
        if snap.future is not None and not snap.future.done():
            snap.future.cancel()
        if self._snaps.get(snap.name) is snap:
            del self._snaps[snap.name]
        snap.state = "retiring"
        if snap.model is not None or (snap.future is not None and not snap.future.cancelled()):
            self._retiring.append(snap)
        if was_active:
            self._on_active(snap.name, False)

    def _auto(self, current: Callable[[str], AdapterSource | None]) -> None:
        if not self.enabled or len(self._traffic) < self._min_requests:
            return
        counts = collections.Counter(self._traffic)
        total = len(self._traffic)
        for name, snap in list(self._snaps.items()):
            if snap.state == "active" and counts[name] / total < self._share / 2:
                log.info("snapshot of %s retired: share fell to %.0f%%", name, 100 * counts[name] / total)
                self._retire(snap)
        for name, n in counts.most_common(self._max):
            if n / total <= self._share or name in self._snaps:
                continue
            source = current(name)
            if source is not None:
                try:
                    self.request(source)
                except AdapterLoadError as e:
                    log.info("auto snapshot of %s not started: %s", name, e)
