"""Scheduler without a model: admission limits, skipping cold adapters, fairness, aborts, slot reuse."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from server.engine.scheduler import Scheduler, SchedulerConfig
from server.engine.types import (
    AdapterUnavailableError,
    FinishReason,
    QueueFullError,
    SamplingParams,
    Sequence,
    SequenceStatus,
)


@dataclass
class FakeLease:
    adapter: str


class Adapters:
    """Which adapters are resident; acquire pins like the real store (a count per adapter)."""

    def __init__(self, ready: set[str], broken: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        self.ready = set(ready)
        self.broken = set(broken)
        self.pins: dict[str, int] = {}
        self.asked: list[str] = []

    def acquire(self, name: str) -> FakeLease | None:
        self.asked.append(name)
        if name in self.broken:
            raise AdapterUnavailableError(f"{name} is broken")
        if name not in self.ready:
            return None
        self.pins[name] = self.pins.get(name, 0) + 1
        return FakeLease(name)

    def release(self, lease: FakeLease) -> None:
        self.pins[lease.adapter] -= 1


def make(
    slots: int = 4, budget: int = 1000, loras: int = 2, queue: int = 100, ready: set[str] | None = None
) -> tuple[Scheduler, Adapters]:
    adapters = Adapters(ready if ready is not None else {"a", "b", "c", "d"})
    config = SchedulerConfig(
        num_slots=slots,
        max_model_len=2048,
        max_num_batched_tokens=budget,
        max_loras_per_batch=loras,
        max_queue=queue,
    )
    return Scheduler(config, adapters.acquire, adapters.release), adapters  # type: ignore[arg-type]


_ids = iter(range(10**9))


def seq(
    prompt_len: int = 4, adapter: str | None = None, tenant: str | None = None, t: float = 0.0
) -> Sequence:
    n = next(_ids)
    return Sequence(
        request_id=f"r{n}",
        token_ids=list(range(prompt_len)),
        num_prompt_tokens=prompt_len,
        sampling=SamplingParams(max_tokens=8),
        adapter=adapter,
        seed=n,
        tenant=tenant,
        arrival_time=t or float(n),
    )


def test_empty_scheduler_has_no_step() -> None:
    s, _ = make()
    assert s.schedule(0.0).batch is None
    assert not s.has_work


def test_single_request_prefills_then_decodes() -> None:
    s, _ = make()
    s.add(q := seq())
    first = s.schedule(0.0).batch
    assert first is not None and first.kind == "prefill" and first.seqs == [q]
    assert q.status is SequenceStatus.RUNNING and q.slot == 0
    second = s.schedule(0.0).batch
    assert second is not None and second.kind == "decode" and second.seqs == [q]


def test_slots_bound_admission_and_lowest_slot_is_reused() -> None:
    s, _ = make(slots=2)
    seqs = [seq() for _ in range(3)]
    for q in seqs:
        s.add(q)
    batch = s.schedule(0.0).batch
    assert batch is not None and len(batch) == 2
    assert sorted(q.slot for q in batch.seqs) == [0, 1]
    assert seqs[2].status is SequenceStatus.WAITING
    s.finish(seqs[0], FinishReason.STOP)
    s.schedule(0.0)  # decode (prefill ran last)
    batch = s.schedule(0.0).batch
    assert batch is not None and batch.kind == "prefill" and batch.seqs == [seqs[2]]
    assert seqs[2].slot == 0


@pytest.mark.parametrize(
    ("prompts", "budget", "admitted"),
    [
        ([10, 10, 10], 25, 2),
        ([30], 25, 1),  # a prompt over the budget still runs, alone
        ([30, 5], 25, 1),
        ([5, 30, 5], 25, 2),  # the long one waits, the short one behind it goes
        ([], 25, 0),
    ],
)
def test_token_budget(prompts: list[int], budget: int, admitted: int) -> None:
    s, _ = make(slots=8, budget=budget)
    for n in prompts:
        s.add(seq(n))
    batch = s.schedule(0.0).batch
    assert (0 if batch is None else len(batch)) == admitted


def test_distinct_adapter_cap_skips_without_rejecting() -> None:
    s, _ = make(slots=8, loras=2)
    qa, qb, qc, qa2, qbase = seq(adapter="a"), seq(adapter="b"), seq(adapter="c"), seq(adapter="a"), seq()
    for q in (qa, qb, qc, qa2, qbase):
        s.add(q)
    batch = s.schedule(0.0).batch
    assert batch is not None
    assert set(batch.seqs) == {qa, qb, qa2, qbase}
    assert qc.status is SequenceStatus.WAITING
    s.finish(qa, FinishReason.STOP)
    s.finish(qa2, FinishReason.STOP)
    s.schedule(0.0)  # decode
    batch = s.schedule(0.0).batch
    assert batch is not None and batch.seqs == [qc]


def test_cold_adapter_is_skipped_and_keeps_its_place() -> None:
    s, adapters = make(ready={"a"})
    cold, warm = seq(adapter="cold"), seq(adapter="a")
    s.add(cold)
    s.add(warm)
    batch = s.schedule(0.0).batch
    assert batch is not None and batch.seqs == [warm]
    assert cold.status is SequenceStatus.WAITING and "cold" in adapters.asked
    adapters.ready.add("cold")
    s.schedule(0.0)  # decode
    batch = s.schedule(0.0).batch
    assert batch is not None and batch.seqs == [cold]


def test_broken_adapter_fails_only_its_request() -> None:
    s, adapters = make()
    adapters.broken.add("bad")
    bad, good = seq(adapter="bad"), seq(adapter="a")
    s.add(bad)
    s.add(good)
    result = s.schedule(0.0)
    assert [q for q, _ in result.failed] == [bad]
    assert isinstance(result.failed[0][1], AdapterUnavailableError)
    assert result.batch is not None and result.batch.seqs == [good]
    assert bad not in s.waiting


def test_tenant_fairness_orders_admission() -> None:
    s, _ = make(slots=3)
    hog = [seq(tenant="hog", t=float(i)) for i in range(3)]
    for q in hog[:2]:
        s.add(q)
    s.schedule(0.0)  # hog holds two slots
    s.add(hog[2])
    late = seq(tenant="polite", t=100.0)
    s.add(late)
    s.schedule(0.0)  # decode
    batch = s.schedule(0.0).batch
    assert batch is not None and batch.seqs == [late]


def test_queue_full_raises() -> None:
    s, _ = make(queue=2)
    s.add(seq())
    s.add(seq())
    with pytest.raises(QueueFullError):
        s.add(seq())


def test_abort_waiting_and_running() -> None:
    s, adapters = make(slots=1)
    running, waiting = seq(adapter="a"), seq()
    s.add(running)
    s.add(waiting)
    s.schedule(0.0)
    assert s.abort(waiting.request_id) is waiting and waiting not in s.waiting
    assert s.abort(running.request_id) is running and running.aborted
    s.finish(running, FinishReason.ABORT)
    assert s.num_free_slots == 1 and adapters.pins["a"] == 0
    assert s.abort("nope") is None


def test_finish_releases_lease_once() -> None:
    s, adapters = make()
    q = seq(adapter="b")
    s.add(q)
    s.schedule(0.0)
    assert adapters.pins["b"] == 1
    s.finish(q, FinishReason.LENGTH)
    assert adapters.pins["b"] == 0 and q.lease is None and q.slot == -1
    assert q.finish_reason is FinishReason.LENGTH


def test_prefill_and_decode_alternate_under_constant_arrivals() -> None:
    s, _ = make(slots=8)
    s.add(seq())
    kinds = []
    for _ in range(6):
        s.add(seq())
        batch = s.schedule(0.0).batch
        assert batch is not None
        kinds.append(batch.kind)
    assert kinds == ["prefill", "decode"] * 3


# ------------------------------------------------------------------ why a sequence waits (vLLM's reasons)


@pytest.mark.parametrize(
    ("slots", "loras", "ready", "waiting", "deferred"),
    [
        (1, 2, {"a", "b"}, ["a", None, "b"], 0),  # one slot: the two left wait for capacity
        (8, 1, {"a", "b"}, ["a", "b", "b"], 2),  # the step's adapter budget defers b
        (8, 2, {"a"}, ["a", "cold", None], 1),  # an adapter still loading is deferred
        (2, 2, {"a"}, ["cold", "a", None, None], 1),  # cold deferred; then slots run out: capacity
        (4, 2, set(), [], 0),
    ],
)
def test_waiting_is_split_into_deferred_and_capacity(
    slots: int, loras: int, ready: set[str], waiting: list[str | None], deferred: int
) -> None:
    s, _ = make(slots=slots, loras=loras, ready=ready)
    for adapter in waiting:
        s.add(seq(adapter=adapter))
    s.schedule(0.0)
    assert s.num_deferred == deferred
    assert s.num_deferred <= len(s.waiting)


def test_a_deferred_sequence_stops_counting_once_admitted_or_aborted() -> None:
    s, adapters = make(slots=4, ready={"a"})
    cold, other = seq(adapter="cold"), seq(adapter="cold")
    s.add(cold)
    s.add(other)
    s.schedule(0.0)
    assert s.num_deferred == 2
    s.abort(other.request_id)
    assert s.num_deferred == 1  # counted over the waiting queue, not remembered
    adapters.ready.add("cold")
    s.schedule(0.0)
    assert s.num_deferred == 0 and cold.status is SequenceStatus.RUNNING
