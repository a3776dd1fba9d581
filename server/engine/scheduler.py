"""Waiting and running queues, admission, and the choice of the next step. Torch-free.

Every step shares one token budget (``max_num_batched_tokens``) between decode rows and prompt chunks,
decode rows first: each running sequence past its prompt computes one token, then prompt chunks, of
sequences still in their prompt and of waiting ones admitted with a first chunk (in the order below),
while budget, slots and KV blocks last. So a long prompt never holds running streams up for more than one
budgeted step. While decode rows run, prompt chunks also stay under ``prompt_cap(decode rows)`` tokens
(by default ``prefill_beside_decode`` plus one per decode row), so a step with prompt tokens holds the
decoding streams up for a bounded time and inter-token latency stays near its median while new prompts
arrive; the price is slower admission under a burst of long prompts. On the CPU the engine replaces it
with what steps cost (``server.engine.step_cost``). Alone (no decode rows) a prompt takes the whole budget.

KV memory is paged (``BlockManager``): admission takes the longest cached prefix of the prompt (full
blocks under the same adapter version) and blocks for its first chunk; a decode row that needs a new block
when none is free preempts the newest running sequence (its blocks are freed, it waits at the head of the
queue and recomputes its tokens when readmitted, keeping its slot and adapter lease).

Admission also needs a free slot (per-sequence sampling state, ``max_num_seqs``), at most
``max_loras_per_batch`` distinct adapters among the running, and a resident adapter (``acquire`` returned
a lease). A sequence whose adapter is still loading is skipped, not rejected, and keeps its place. Among
admissible sequences the tenant with the fewest running sequences goes first.

Prompt tokens go to the sequences that want them (running ones still in their prompt, then admissions) in
one order: preempted sequences first, then by tenant as above, then the fewest prompt tokens left to
compute, then arrival. Shortest first is what keeps a chat turn's short uncached tail (its history is in
the prefix cache) from waiting behind other conversations' long first prompts; a prompt that later ones
have gone ahead of for ``MAX_BYPASSES`` steps goes first by arrival every other step until it is done, so
none starves, and shorter ones still get the steps between while a burst of long ones catches up.

Why a sequence waits (``num_deferred``, vLLM's waiting reasons): the last admission pass *deferred* it for a
transient constraint (its adapter still loading, or the step's distinct-adapter budget full); every other
waiting sequence waits for *capacity* (a slot, KV blocks, or room in the step's token budget).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, field

from server.engine.block_manager import BlockManager, NoFreeBlocksError, PrefixCacheStats
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

BASE_DIGEST = "base"
MAX_BYPASSES = 64  # steps a wanting prompt lets later, shorter ones go first; then it goes by arrival


@dataclass(slots=True)
class _Admission:
    """One step's admission pass: the adapters its rows run, and whether it is over."""

    adapters: set[str]
    stopped: bool = False


@dataclass(slots=True, frozen=True)
class SchedulerConfig:
    num_slots: int
    max_model_len: int
    max_num_batched_tokens: int
    max_loras_per_batch: int
    max_queue: int
    num_blocks: int = 0  # 0: enough for every slot's whole context (the old static cache's capacity)
    block_size: int = 16
    enable_prefix_caching: bool = True
    base_digest: str = BASE_DIGEST  # keys the base model's blocks in the prefix cache
    # beside decode rows, prompt chunks take at most this many tokens plus one per decode row (None: the
    # whole budget); a prompt-logprobs request, which computes its prompt in one piece, is not capped
    prefill_beside_decode: int | None = None

    @property
    def resolved_num_blocks(self) -> int:
        if self.num_blocks > 0:
            return self.num_blocks
        return self.num_slots * -(-self.max_model_len // self.block_size)


@dataclass(slots=True)
class ScheduleResult:
    """What one call to ``schedule`` decided: the step to run (if any) and the sequences that failed
    admission (their adapter could not be served)."""

    batch: Batch | None
    failed: list[tuple[Sequence, EngineError]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)


class Scheduler:
    """Owns the waiting queue, the running set, the slot table and the KV blocks."""

    def __init__(self, config: SchedulerConfig, acquire: AcquireFn, release: ReleaseFn) -> None:
        self.config = config
        # prompt tokens a step with this many decode rows may take (None: the whole budget); the engine
        # may replace it with a measured one (``server.engine.step_cost``)
        self.prompt_cap: Callable[[int], int | None] = self._fixed_cap
        self._acquire = acquire
        self._release = release
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []  # admission order: the newest is preempted first
        self._free_slots = list(range(config.num_slots))  # a min-heap: low slots first (graph buckets)
        self._deferred: set[str] = set()  # request ids the last admission pass deferred
        self._bypassed: dict[str, int] = {}  # request id -> steps later prompts got tokens before it
        self._starved_step = False  # whether this step's prompt tokens go to passed-over prompts first
        self._left: dict[str, int] = {}  # waiting request id -> prompt tokens to compute, when first seen
        self._last_digest: dict[str, str] = {}  # adapter name -> the digest of its last lease
        self.blocks = BlockManager(
            config.resolved_num_blocks,
            config.block_size,
            enable_prefix_caching=config.enable_prefix_caching,
        )
        self.num_preemptions = 0

    def _fixed_cap(self, decode_rows: int) -> int | None:
        """``prefill_beside_decode`` tokens plus one per decode row (None: no cap)."""
        beside = self.config.prefill_beside_decode
        return None if beside is None else decode_rows + beside

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

    @property
    def kv_cache_usage(self) -> float:
        return self.blocks.usage

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats:
        return self.blocks.stats

    def running_adapters(self) -> set[str]:
        return {s.adapter for s in self.running if s.adapter is not None}

    def waiting_adapters(self) -> set[str]:
        return {s.adapter for s in self.waiting if s.adapter is not None}

    def cache_digest(self, seq: Sequence) -> str:
        """The adapter version that keys ``seq``'s blocks: the lease's digest (a merged snapshot computes
        other KV than PEFT's forward: its own key), the base's digest for base requests."""
        lease = seq.lease
        if lease is None:
            return self.config.base_digest
        return f"snapshot:{lease.digest}" if lease.on_snapshot else lease.digest

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
                self._forget(seq)
                seq.aborted = True
                return seq
        for seq in self.running:
            if seq.request_id == request_id:
                seq.aborted = True
                return seq
        return None

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Take ``seq`` out for good: free its blocks and slot, unpin its adapter."""
        seq.finish_reason = reason
        seq.status = SequenceStatus.FINISHED
        self._forget(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.request_id)
        seq.block_table = []
        if seq.slot >= 0:
            heapq.heappush(self._free_slots, seq.slot)
            seq.slot = -1
        if seq.lease is not None:
            self._release(seq.lease)
            seq.lease = None

    # ------------------------------------------------------------------------------------ the step

    def schedule(self, now: float) -> ScheduleResult:
        """Choose the next step: decode rows, then prompt chunks of running sequences, then admissions,
        all under one token budget."""
        result = ScheduleResult(batch=None)
        for seq in self.running:  # the last step's tokens have KV now: their full blocks become shareable
            self.blocks.commit(seq.request_id, seq.token_ids, seq.num_cached)
        rows: list[Sequence] = []
        sizes: list[int] = []
        budget = self.config.max_num_batched_tokens
        # every decode row runs (a budget below --max-num-seqs would starve the last ones); what they
        # leave of the budget goes to prompt chunks
        for seq in [s for s in self.running if not s.in_prefill]:
            self._bypassed.pop(seq.request_id, None)  # its prompt is done
            if seq.status is not SequenceStatus.RUNNING or not self._make_room(seq, seq.num_tokens, result):
                continue
            rows.append(seq)
            sizes.append(1)
            budget -= 1
        allowed = self.prompt_cap(len(rows)) if rows else None
        cap = budget if allowed is None else min(budget, allowed)
        admission = _Admission(self.running_adapters())
        self._deferred = set()
        self._starved_step = not self._starved_step
        candidates = self._prompt_order()
        served: list[Sequence] = []
        for seq in candidates:
            if budget <= 0:
                break
            if seq.status is SequenceStatus.RUNNING:
                chunk = self._chunk(seq, budget, cap, alone=not rows, result=result)
            elif seq.status is SequenceStatus.WAITING and not result.preempted and not admission.stopped:
                # (after a preemption blocks are short: admitting now would only preempt again)
                chunk = self._admit(seq, now, budget, cap, alone=not rows, admission=admission, result=result)
            else:
                continue  # preempted by an older sequence's chunk, or admission is over for this step
            if chunk > 0:
                rows.append(seq)
                sizes.append(chunk)
                served.append(seq)
                budget -= chunk
                cap = min(cap - chunk, budget)
        self._count_bypasses(candidates, served)
        # a prompt chunk may have preempted a sequence taken earlier in this step: it holds no blocks now
        taken = [(q, n) for q, n in zip(rows, sizes, strict=True) if q.status is SequenceStatus.RUNNING]
        if taken:
            result.batch = Batch(seqs=[q for q, _ in taken], num_new_tokens=[n for _, n in taken])
        return result

    def _prompt_order(self) -> list[Sequence]:
        """The sequences that want prompt tokens (running ones still in their prompt, and the waiting), in
        the order they get them: preempted sequences first (they hold a slot), then, every other step, any
        a later one went ahead of for ``MAX_BYPASSES`` steps (by arrival), then the tenant with the fewest
        sequences past their prompt, then the fewest prompt tokens left to compute (shortest first: a chat
        turn's short uncached tail does not wait behind another conversation's long first prompt), then
        arrival. Every other step, not every step: while steps take few prompt tokens (beside decode
        rows), passed-over prompts first on every step made short ones wait behind a whole burst of long
        ones (measured: chat turns 2 of 33-51 s behind other conversations' first prompts)."""
        decoding: dict[str | None, int] = {}  # a tenant's running sequences past their prompt
        for s in self.running:
            if not s.in_prefill:
                decoding[s.tenant] = decoding.get(s.tenant, 0) + 1

        def key(s: Sequence) -> tuple[bool, bool, int, int, float]:
            running = s.status is SequenceStatus.RUNNING
            starved = self._starved_step and self._bypassed.get(s.request_id, 0) >= MAX_BYPASSES
            left = 0 if starved else self._tokens_left(s)
            return (running or s.slot < 0, not starved, decoding.get(s.tenant, 0), left, s.arrival_time)

        wanting = [s for s in self.running if s.in_prefill] + self.waiting
        return sorted(wanting, key=key)

    def _tokens_left(self, seq: Sequence) -> int:
        """Prompt tokens ``seq`` has yet to compute: a waiting sequence's after the cached prefix its prompt
        had when first looked at (with its adapter's last known version; none known: the whole prompt)."""
        if seq.status is SequenceStatus.RUNNING:
            return seq.num_tokens - seq.num_cached
        if seq.request_id not in self._left:
            known = seq.lease is not None or seq.adapter is None
            digest = self.cache_digest(seq) if known else self._last_digest.get(seq.adapter or "")
            cached = 0
            if digest is not None and seq.sampling.prompt_logprobs is None:
                cached = self.blocks.cached_prefix(seq.token_ids, digest)
            self._left[seq.request_id] = seq.num_tokens - cached
        return self._left[seq.request_id]

    def _count_bypasses(self, candidates: list[Sequence], served: list[Sequence]) -> None:
        """Each wanting sequence that got no prompt tokens this step while a later one got some was
        bypassed once more (``MAX_BYPASSES`` of them and it goes first until its prompt is done)."""
        if not served:
            return
        newest = max(s.arrival_time for s in served)
        got = {s.request_id for s in served}
        for s in candidates:
            if s.request_id not in got and s.arrival_time < newest and not s.is_finished:
                self._bypassed[s.request_id] = self._bypassed.get(s.request_id, 0) + 1

    def _chunk(
        self, seq: Sequence, budget: int, cap: int, *, alone: bool, result: ScheduleResult | None = None
    ) -> int:
        """Tokens ``seq`` (in its prompt, holding blocks) computes this step: as many as ``cap`` (what the
        budget leaves to prompt chunks beside decode rows) and the free blocks allow. A request for prompt
        logprobs computes its prompt in one piece, within the whole ``budget``. With
        ``result`` (a running sequence), sequences admitted after it are preempted while blocks are short,
        so prompts that together overfill the pool cannot stall each other."""
        remaining = seq.num_tokens - seq.num_cached
        if seq.sampling.prompt_logprobs is not None:
            chunk = remaining if (remaining <= budget or alone) else 0
        else:
            chunk = min(remaining, cap)
        if chunk <= 0:
            return 0
        bm = self.blocks
        if result is not None:
            while not bm.can_grow(seq.request_id, seq.num_cached + chunk) and self.running[-1] is not seq:
                victim = self.running[-1]
                self._preempt(victim)
                result.preempted.append(victim)
        held = len(seq.block_table) + bm.num_free_blocks
        chunk = min(chunk, held * bm.block_size - seq.num_cached)
        if seq.sampling.prompt_logprobs is not None and chunk < remaining:
            return 0
        if chunk <= 0:
            return 0
        bm.grow(seq.request_id, seq.num_cached + chunk)
        return chunk

    def _make_room(self, seq: Sequence, num_tokens: int, result: ScheduleResult) -> bool:
        """Grow ``seq``'s blocks to ``num_tokens``, preempting the newest running sequences while blocks are
        short. False if ``seq`` itself had to go."""
        while not self.blocks.can_grow(seq.request_id, num_tokens):
            victim = self.running[-1]
            self._preempt(victim)
            result.preempted.append(victim)
            if victim is seq:
                return False
        self.blocks.grow(seq.request_id, num_tokens)
        return True

    def _forget(self, seq: Sequence) -> None:
        self._bypassed.pop(seq.request_id, None)
        self._left.pop(seq.request_id, None)

    def _preempt(self, seq: Sequence) -> None:
        """Recompute later: free the blocks, keep the slot and the lease, wait at the head of the queue."""
        self.running.remove(seq)
        self.blocks.free(seq.request_id)
        seq.block_table = []
        seq.num_cached = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self._left.pop(seq.request_id, None)  # its blocks went back: looked at afresh
        self.waiting.insert(0, seq)

    def _admit(
        self,
        seq: Sequence,
        now: float,
        budget: int,
        cap: int,
        *,
        alone: bool,
        admission: _Admission,
        result: ScheduleResult,
    ) -> int:
        """Admit waiting ``seq`` with its first chunk if a slot, its adapter and blocks allow; returns the
        chunk (0: not admitted; ``admission.stopped`` when later ones must not overtake it)."""
        if cap <= 0 and seq.sampling.prompt_logprobs is None:
            admission.stopped = True  # the step's prompt tokens are spent: it goes first next step
            return 0
        if seq.slot < 0 and not self._free_slots:
            return 0
        adapters = admission.adapters
        new_adapter = seq.adapter is not None and seq.adapter not in adapters
        if new_adapter and len(adapters) >= self.config.max_loras_per_batch:
            self._deferred.add(seq.request_id)
            return 0
        if seq.lease is None and seq.adapter is not None:
            try:
                lease = self._acquire(seq.adapter)
            except EngineError as exc:
                self.waiting.remove(seq)
                self._forget(seq)
                result.failed.append((seq, exc))
                return 0
            if lease is None:
                self._deferred.add(seq.request_id)
                return 0  # still loading: keep its place, try again next step
            seq.lease = lease
            self._last_digest[seq.adapter] = self.cache_digest(seq)
        chunk = self._allocate(seq, budget, cap, alone=alone)
        if chunk == 0:
            if self.blocks.has(seq.request_id):
                self.blocks.free(seq.request_id)
                seq.num_cached = 0
            admission.stopped = True  # no blocks (or no budget) for it: later ones must not overtake it
            return 0
        if seq.adapter is not None:
            adapters.add(seq.adapter)
        self.waiting.remove(seq)
        self._left.pop(seq.request_id, None)
        if seq.slot < 0:
            seq.slot = heapq.heappop(self._free_slots)
        seq.status = SequenceStatus.RUNNING
        if seq.first_scheduled_time is None:
            seq.first_scheduled_time = now
        self.running.append(seq)
        return chunk

    def _allocate(self, seq: Sequence, budget: int, cap: int, *, alone: bool) -> int:
        """Blocks for a sequence's cached prefix and first chunk; returns the chunk (0: not now)."""
        bm = self.blocks
        # prompt logprobs need every prompt position's logits: no cached prefix for such a request
        wants_all = seq.sampling.prompt_logprobs is not None
        first = seq.num_preemptions == 0
        try:
            cached = bm.allocate(
                seq.request_id, seq.token_ids, self.cache_digest(seq), 0, lookup=not wants_all
            )
        except NoFreeBlocksError:
            return 0
        seq.block_table = bm.block_table(seq.request_id)
        seq.num_cached = cached
        if first:
            seq.num_prefix_cached = min(cached, seq.num_prompt_tokens)
        return self._chunk(seq, budget, cap, alone=alone)
