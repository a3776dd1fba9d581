"""Waiting and running queues, admission, and the choice of the next step. Torch-free.

Admission takes a waiting sequence into a free KV slot when all hold: a slot is free, the step's prompt
tokens stay under ``max_num_batched_tokens``, the running set keeps at most ``max_loras_per_batch``
distinct adapters, and the adapter is resident (``acquire`` returned a lease). A sequence whose adapter is
still loading is skipped, not rejected, and keeps its place. Among admissible sequences, the tenant with
the fewest running sequences goes first, then arrival order, so one tenant's burst cannot take every slot.

Why a sequence waits (``num_deferred``, vLLM's waiting reasons): the last admission pass *deferred* it for a
transient constraint (its adapter still loading, or the step's distinct-adapter budget full); every other
waiting sequence waits for *capacity* (a free KV slot, or room in the step's token budget).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, field

from server.engine.types import (
    AdapterLease,
    Batch,
    EngineError,
    FinishReason,
    QueueFullError,
    Sequence,
    SequenceStatus,
)

AcquireFn = Callable[[str], AdapterLease | None]
ReleaseFn = Callable[[AdapterLease], None]


@dataclass(slots=True, frozen=True)
class SchedulerConfig:
    num_slots: int
    max_model_len: int
    max_num_batched_tokens: int
    max_loras_per_batch: int
    max_queue: int


@dataclass(slots=True)
class ScheduleResult:
    """What one call to ``schedule`` decided: the step to run (if any) and the sequences that failed
    admission (their adapter could not be served)."""

    batch: Batch | None
    failed: list[tuple[Sequence, EngineError]] = field(default_factory=list)


class Scheduler:
    """Owns the waiting queue, the running set and the slot table."""

    def __init__(self, config: SchedulerConfig, acquire: AcquireFn, release: ReleaseFn) -> None:
        self.config = config
        self._acquire = acquire
        self._release = release
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        # a min-heap: the lowest free slot first keeps running sequences packed at the low slots, so a
        # decode step covers slots [0, bucket) as one contiguous view of the KV memory
        self._free_slots = list(range(config.num_slots))
        self._last_was_prefill = False
        self._deferred: set[str] = set()  # request ids the last admission pass deferred

    # ------------------------------------------------------------------------------------ queries

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_deferred(self) -> int:
        """Waiting sequences the last admission pass deferred for a transient constraint."""
        return sum(1 for s in self.waiting if s.request_id in self._deferred)

    def running_adapters(self) -> set[str]:
        return {s.adapter for s in self.running if s.adapter is not None}

    def waiting_adapters(self) -> set[str]:
        return {s.adapter for s in self.waiting if s.adapter is not None}

    # ------------------------------------------------------------------------------------ changes

    def add(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.config.max_queue:
            raise QueueFullError(f"the queue holds {self.config.max_queue} waiting requests; retry shortly")
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def abort(self, request_id: str) -> Sequence | None:
        """Mark a sequence aborted. A waiting one leaves at once (returned); a running one is returned too
        and leaves when the engine finishes it, before the next step is built."""
        for seq in self.waiting:
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                seq.aborted = True
                return seq
        for seq in self.running:
            if seq.request_id == request_id:
                seq.aborted = True
                return seq
        return None

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Take ``seq`` out for good: free its slot and unpin its adapter."""
        seq.finish_reason = reason
        seq.status = SequenceStatus.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.slot >= 0:
            heapq.heappush(self._free_slots, seq.slot)
            seq.slot = -1
        if seq.lease is not None:
            self._release(seq.lease)
            seq.lease = None

    # ------------------------------------------------------------------------------------ the step

    def schedule(self, now: float) -> ScheduleResult:
        """Choose the next step. Prefill of newly admitted sequences alternates with decode of the running
        set, so arrivals start quickly and running sequences are never starved."""
        result = ScheduleResult(batch=None)
        want_decode = bool(self.running) and self._last_was_prefill
        if not want_decode:
            admitted = self._admit(now, result.failed)
            if admitted:
                self._last_was_prefill = True
                result.batch = Batch(kind="prefill", seqs=admitted)
                return result
        if self.running:
            self._last_was_prefill = False
            result.batch = Batch(kind="decode", seqs=list(self.running))
        return result

    def _admit(self, now: float, failed: list[tuple[Sequence, EngineError]]) -> list[Sequence]:
        self._deferred = set()
        if not self.waiting or not self._free_slots:
            return []
        per_tenant: dict[str | None, int] = {}
        for s in self.running:
            per_tenant[s.tenant] = per_tenant.get(s.tenant, 0) + 1
        order = sorted(self.waiting, key=lambda s: (per_tenant.get(s.tenant, 0), s.arrival_time))
        adapters = self.running_adapters()
        budget = self.config.max_num_batched_tokens
        admitted: list[Sequence] = []
        for seq in order:
            if not self._free_slots:
                break
            prompt = seq.num_tokens - seq.num_cached
            if admitted and prompt > budget:
                continue  # a long prompt alone may exceed the budget, never on top of others
            new_adapter = seq.adapter is not None and seq.adapter not in adapters
            if new_adapter and len(adapters) >= self.config.max_loras_per_batch:
                self._deferred.add(seq.request_id)
                continue
            if seq.lease is None and seq.adapter is not None:
                try:
                    lease = self._acquire(seq.adapter)
                except EngineError as exc:
                    self.waiting.remove(seq)
                    failed.append((seq, exc))
                    continue
                if lease is None:
                    self._deferred.add(seq.request_id)
                    continue  # still loading: keep its place, try again next step
                seq.lease = lease
            if seq.adapter is not None:
                adapters.add(seq.adapter)
            budget -= prompt
            self.waiting.remove(seq)
            seq.slot = heapq.heappop(self._free_slots)
            seq.status = SequenceStatus.RUNNING
            seq.first_scheduled_time = now
            self.running.append(seq)
            admitted.append(seq)
        return admitted
