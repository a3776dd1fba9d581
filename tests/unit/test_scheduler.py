"""Scheduler without a model: admission limits, skipping cold adapters, fairness, aborts, slot reuse, the
shared token budget (decode rows first, then prompt chunks), paged KV blocks, preemption, prefix cache."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest

from server.engine.scheduler import MAX_BYPASSES, Scheduler, SchedulerConfig
from server.engine.types import (
    AdapterUnavailableError,
    Batch,
    FinishReason,
    QueueFullError,
    SamplingParams,
    Sequence,
    SequenceStatus,
)


@dataclass
class FakeLease:
    adapter: str
    on_snapshot: bool = False

    @property
    def version(self) -> str:
        return f"{self.adapter}@v1"

    @property
    def digest(self) -> str:
        return f"sha-{self.adapter}"


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
    slots: int = 4,
    budget: int = 1000,
    loras: int = 2,
    queue: int = 100,
    ready: set[str] | None = None,
    blocks: int = 0,
    block_size: int = 4,
    prefix_caching: bool = True,
    beside: int | None = None,
) -> tuple[Scheduler, Adapters]:
    adapters = Adapters(ready if ready is not None else {"a", "b", "c", "d"})
    config = SchedulerConfig(
        num_slots=slots,
        max_model_len=2048,
        max_num_batched_tokens=budget,
        max_loras_per_batch=loras,
        max_queue=queue,
        num_blocks=blocks,
        block_size=block_size,
        enable_prefix_caching=prefix_caching,
        prefill_beside_decode=beside,
    )
    return Scheduler(config, adapters.acquire, adapters.release), adapters  # type: ignore[arg-type]


def step(s: Scheduler, token: int = 7) -> Batch | None:
    """Schedule and apply the step as the engine does: every row's tokens get KV, sampling rows a token."""
    batch = s.schedule(0.0).batch
    if batch is None:
        return None
    for i, q in enumerate(batch.seqs):
        samples = batch.samples(i)
        q.num_cached += batch.num_new_tokens[i]
        if samples:
            q.token_ids.append(token)
    return batch


def prefill_rows(batch: Batch | None) -> list[Sequence]:
    return [] if batch is None else [q for i, q in enumerate(batch.seqs) if batch.is_prefill(i)]


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
    first = step(s)
    assert first is not None and first.kind == "prefill" and first.seqs == [q]
    assert first.num_new_tokens == [4] and first.samples(0)
    assert q.status is SequenceStatus.RUNNING and q.slot == 0
    second = step(s)
    assert second is not None and second.kind == "decode" and second.seqs == [q]
    assert second.num_new_tokens == [1]


def test_slots_bound_admission_and_lowest_slot_is_reused() -> None:
    s, _ = make(slots=2)
    seqs = [seq() for _ in range(3)]
    for q in seqs:
        s.add(q)
    batch = step(s)
    assert batch is not None and len(batch) == 2
    assert sorted(q.slot for q in batch.seqs) == [0, 1]
    assert seqs[2].status is SequenceStatus.WAITING
    s.finish(seqs[0], FinishReason.STOP)
    batch = step(s)  # seqs[1] decodes, seqs[2] joins the same step
    assert batch is not None and batch.kind == "mixed" and batch.seqs == [seqs[1], seqs[2]]
    assert seqs[2].slot == 0


@pytest.mark.parametrize(
    ("prompts", "budget", "chunks"),
    [
        ([10, 10, 10], 25, [10, 10, 5]),  # the third prompt starts with what the budget leaves
        ([30], 25, [25]),  # a long prompt is chunked
        ([30, 5], 25, [5, 20]),  # the shorter prompt first, the longer with what is left
        ([5, 30, 5], 25, [5, 5, 15]),
        ([], 25, []),
    ],
)
def test_token_budget_chunks_prompts(prompts: list[int], budget: int, chunks: list[int]) -> None:
    s, _ = make(slots=8, budget=budget)
    for n in prompts:
        s.add(seq(n))
    batch = s.schedule(0.0).batch
    assert ([] if batch is None else batch.num_new_tokens) == chunks


def test_a_chunked_prompt_continues_after_decode_rows_and_samples_at_its_end() -> None:
    s, _ = make(slots=4, budget=8)
    s.add(short := seq(3))
    step(s)  # short prefilled
    s.add(long := seq(20))
    sizes: list[list[int]] = []
    while long.in_prefill or long.num_output_tokens == 0:
        batch = step(s)
        assert batch is not None and batch.seqs[0] is short  # decode rows first, every step
        assert batch.num_tokens <= 8
        sizes.append(batch.num_new_tokens)
    assert sizes == [[1, 7], [1, 7], [1, 6]]
    assert long.num_output_tokens == 1


def test_distinct_adapter_cap_skips_without_rejecting() -> None:
    s, _ = make(slots=8, loras=2)
    qa, qb, qc, qa2, qbase = seq(adapter="a"), seq(adapter="b"), seq(adapter="c"), seq(adapter="a"), seq()
    for q in (qa, qb, qc, qa2, qbase):
        s.add(q)
    batch = step(s)
    assert batch is not None
    assert set(batch.seqs) == {qa, qb, qa2, qbase}
    assert qc.status is SequenceStatus.WAITING
    s.finish(qa, FinishReason.STOP)
    s.finish(qa2, FinishReason.STOP)
    assert prefill_rows(step(s)) == [qc]


def test_cold_adapter_is_skipped_and_keeps_its_place() -> None:
    s, adapters = make(ready={"a"})
    cold, warm = seq(adapter="cold"), seq(adapter="a")
    s.add(cold)
    s.add(warm)
    batch = step(s)
    assert batch is not None and batch.seqs == [warm]
    assert cold.status is SequenceStatus.WAITING and "cold" in adapters.asked
    adapters.ready.add("cold")
    assert prefill_rows(step(s)) == [cold]


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
    step(s)  # hog holds two slots
    s.add(hog[2])
    late = seq(tenant="polite", t=100.0)
    s.add(late)
    assert prefill_rows(step(s)) == [late]


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


def test_arrivals_join_the_running_decode_step() -> None:
    s, _ = make(slots=8)
    s.add(seq())
    kinds = []
    for _ in range(4):
        s.add(seq())
        batch = step(s)
        assert batch is not None
        kinds.append(batch.kind)
        assert [batch.is_prefill(i) for i in range(len(batch))] == sorted(
            batch.is_prefill(i) for i in range(len(batch))
        )  # decode rows first
    assert kinds == ["prefill", "mixed", "mixed", "mixed"]


# ------------------------------------------------------------------ paged KV: blocks, preemption, prefix cache


def test_admission_waits_for_free_blocks() -> None:
    s, _ = make(slots=8, blocks=4, block_size=4)
    first, second, third = seq(12), seq(12), seq(12)
    for q in (first, second, third):
        s.add(q)
    batch = step(s)
    # first takes 3 of 4 blocks, second starts with a chunk of the last one, third waits
    assert batch is not None and batch.seqs == [first, second] and batch.num_new_tokens == [12, 4]
    assert third.status is SequenceStatus.WAITING and s.kv_cache_usage == 1.0


def test_decode_preempts_the_newest_sequence_when_blocks_run_out() -> None:
    s, _ = make(slots=8, blocks=4, block_size=4)
    old, new = seq(4), seq(3)
    old.arrival_time = new.arrival_time = 0.0
    s.add(old)
    s._bypassed[old.request_id] = MAX_BYPASSES  # old goes first by arrival, whatever new's length
    s.add(new)
    step(s)  # old: 1 block (+1 token), new: 1 block
    step(s)  # old grows to 2 blocks, new fills its block
    for _ in range(3):
        step(s)
    # old has 9 tokens (3 blocks), new 8 (2 blocks, full at the end of last step): 5 > 4, the newest goes
    result = s.schedule(0.0)
    assert result.preempted == [new] and s.num_preemptions == 1
    assert new.status is SequenceStatus.WAITING and s.waiting[0] is new
    assert new.slot >= 0 and new.num_cached == 0 and new.block_table == []
    assert result.batch is not None and result.batch.seqs == [old]


def test_a_prompt_chunk_that_preempts_a_decode_row_takes_it_out_of_the_step() -> None:
    """An older sequence still in its prompt needs blocks a newer one holds, and the newer one is already
    a decode row of this step: it is preempted and leaves the step (it has no blocks left to write to)."""
    s, _ = make(slots=8, blocks=5, block_size=4, budget=8, prefix_caching=False)
    long = seq(20)
    s.add(long)
    step(s)  # long: 8 of 20 prompt tokens, 2 blocks
    short = seq(3)
    s.add(short)
    step(s)  # short goes first (fewer tokens left): 3 tokens, 1 block; long 5 more, 4 blocks: 5 of 5
    assert short.num_output_tokens == 1 and long.in_prefill
    result = s.schedule(0.0)  # short decodes; long's chunk needs a 5th block: short, the newest, goes
    assert result.preempted == [short] and short.block_table == []
    assert result.batch is not None and result.batch.seqs == [long]
    assert all(q.block_table for q in result.batch.seqs)


def test_a_preempted_sequence_recomputes_its_tokens_and_keeps_its_output() -> None:
    s, _ = make(slots=8, blocks=5, block_size=4, prefix_caching=False)
    old, new = seq(8), seq(4)
    s.add(old)
    step(s)  # old is admitted first (the shorter new would go first beside it)
    s.add(new)
    step(s)
    new.token_ids.extend([9, 9])  # pretend both decoded a while: new 7 tokens (2 blocks)
    new.num_cached = new.num_tokens - 1
    s.blocks.grow(new.request_id, new.num_tokens)
    old.token_ids.extend([5] * 3)  # old 13 tokens, 12 with KV (3 blocks): 5 blocks taken
    old.num_cached = 12
    s.blocks.grow(old.request_id, 12)
    batch = step(s)  # old needs a 4th block: new goes, and nothing is admitted in its place
    assert batch is not None and batch.seqs == [old] and new.num_preemptions == 1
    s.finish(old, FinishReason.STOP)
    batch = step(s)
    assert batch is not None and batch.seqs == [new] and batch.num_new_tokens == [7]
    assert new.num_output_tokens == 4 and new.num_prompt_tokens == 4


def test_a_repeated_prompt_starts_after_its_cached_blocks() -> None:
    s, _ = make(slots=8, block_size=4)
    s.add(first := seq(10))
    step(s)
    step(s)  # the next schedule commits first's full blocks
    s.add(again := seq(10))
    batch = step(s)
    assert batch is not None and prefill_rows(batch) == [again]
    assert batch.num_new_tokens[-1] == 2 and again.num_prefix_cached == 8
    assert again.block_table[:2] == first.block_table[:2]
    assert s.prefix_cache_stats.queries == 20 and s.prefix_cache_stats.hits == 8


def test_adapters_never_share_cached_blocks() -> None:
    s, _ = make(slots=8, block_size=4)
    s.add(qa := seq(10, adapter="a"))
    step(s)
    step(s)
    s.add(qb := seq(10, adapter="b"))
    s.add(qbase := seq(10))
    step(s)
    assert qb.num_prefix_cached == 0 and qbase.num_prefix_cached == 0
    assert not set(qa.block_table) & set(qb.block_table)


def test_no_prefix_caching_never_hits() -> None:
    s, _ = make(slots=8, block_size=4, prefix_caching=False)
    s.add(seq(10))
    step(s)
    step(s)
    s.add(again := seq(10))
    step(s)
    assert again.num_prefix_cached == 0 and s.prefix_cache_stats.queries == 0


def test_prompt_logprobs_are_computed_whole_without_the_cache() -> None:
    s, _ = make(slots=8, budget=8, block_size=4)
    s.add(seq(10))
    step(s)
    step(s)
    step(s)
    q = seq(10)
    q.sampling = SamplingParams(max_tokens=8, prompt_logprobs=1)
    s.add(q)
    batch = step(s)  # 1 decode row + 10 > 8: it waits for a step it can have whole
    assert batch is not None and q not in batch.seqs
    s.finish(batch.seqs[0], FinishReason.STOP)
    batch = step(s)
    assert batch is not None and batch.seqs == [q] and batch.num_new_tokens == [10]
    assert q.num_prefix_cached == 0


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


def test_every_decode_row_runs_even_past_the_budget_and_chunks_wait() -> None:
    s, _ = make(slots=8, budget=3)
    running = [seq(1) for _ in range(3)]
    for q in running:
        s.add(q)
    step(s)  # three 1-token prompts: the whole budget
    s.config = dataclasses.replace(s.config, max_num_batched_tokens=2)
    s.add(late := seq(4))
    batch = step(s)
    assert batch is not None and batch.seqs == running  # 3 decode rows, over the budget of 2
    assert late.status is SequenceStatus.WAITING


# ------------------------------------------------------------------ prompt tokens beside decode rows


def test_beside_decode_rows_prompt_chunks_stay_under_the_cap_and_take_the_budget_alone() -> None:
    s, _ = make(slots=8, budget=100, beside=4, prefix_caching=False)  # seq()'s prompts share prefixes
    s.add(first := seq(30))
    batch = step(s)
    assert batch is not None and batch.num_new_tokens == [30]  # alone: the whole budget
    s.add(second := seq(20))
    s.add(third := seq(20))
    sizes: list[list[int]] = []
    while third.in_prefill:
        batch = step(s)
        assert batch is not None and batch.seqs[0] is first
        sizes.append(batch.num_new_tokens)
    # 1 decode row + 4 + 1: five prompt tokens a step; the second's prompt first, then the third joins
    assert sizes[:4] == [[1, 5], [1, 5], [1, 5], [1, 5]]
    assert sizes[4] == [1, 1, 6]  # second decodes now: two decode rows, 4 + 2 prompt tokens
    assert all(
        sum(n for n in step_sizes if n > 1) <= 4 + sum(n == 1 for n in step_sizes) for step_sizes in sizes
    )
    assert second.num_output_tokens > 0 and third.num_output_tokens == 1


def test_the_cap_grows_with_the_decode_rows_and_never_past_the_budget() -> None:
    s, _ = make(slots=16, budget=12, beside=2)
    running = [seq(1) for _ in range(6)]
    for q in running:
        s.add(q)
    step(s)
    s.add(late := seq(40))
    batch = step(s)
    assert batch is not None and batch.num_new_tokens == [1] * 6 + [6]  # min(12 - 6, 6 + 2)
    assert late.num_cached == 6


def test_a_measured_cap_is_asked_with_the_steps_decode_rows_and_bounds_its_prompt_tokens_in_all() -> None:
    """The engine's measured allowance (``StepCost.allowance``) replaces the fixed cap: asked with the
    decode rows the step has, its answer bounds the step's prompt tokens in all (no one per row on top)."""
    s, _ = make(slots=16, budget=64, beside=100)
    asked: list[int] = []

    def cap(decode_rows: int) -> int:
        asked.append(decode_rows)
        return 3 * decode_rows

    s.prompt_cap = cap
    running = [seq(1) for _ in range(4)]
    for q in running:
        s.add(q)
    first = step(s)
    assert first is not None and first.num_new_tokens == [1] * 4 and asked == []  # alone: not asked
    s.add(late := seq(40))
    batch = step(s)
    assert batch is not None and batch.num_new_tokens == [1] * 4 + [12] and asked == [4]
    assert late.num_cached == 12


def test_a_prompt_logprobs_request_is_not_held_behind_the_cap() -> None:
    s, _ = make(slots=8, budget=64, beside=0)
    s.add(seq(3))
    step(s)
    q = seq(20)
    q.sampling = SamplingParams(max_tokens=8, prompt_logprobs=1)
    s.add(q)
    batch = step(s)  # its prompt in one piece, within the budget: the cap of 1 would never fit it
    assert batch is not None and q in batch.seqs and batch.num_new_tokens[-1] == 20


def test_the_cap_is_measured_from_8_on_the_cpu_and_off_on_cuda_unless_set() -> None:
    from server.bootstrap import _prefill_beside_decode
    from server.config import Settings
    from server.engine.step_cost import DEFAULT_RATIO

    assert _prefill_beside_decode(Settings(), "cpu") == (8, DEFAULT_RATIO)
    assert _prefill_beside_decode(Settings(), "cuda") == (None, None)
    assert _prefill_beside_decode(Settings(prefill_beside_decode=0), "cuda") == (0, None)
    assert _prefill_beside_decode(Settings(prefill_beside_decode=24), "cpu") == (24, None)  # fixed


@pytest.mark.parametrize("value", ["-1", "four", "1.5"])
def test_a_bad_cap_is_a_usage_error(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    from server.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--prefill-beside-decode", value])
    assert exit_info.value.code == 2
    assert "prefill_beside_decode" in capsys.readouterr().err


def test_a_good_cap_reaches_the_settings() -> None:
    from server.cli import build_parser, settings_from_args

    args = build_parser().parse_args(["serve", "--prefill-beside-decode", "0"])
    assert settings_from_args(args).prefill_beside_decode == 0


def test_a_chat_turns_cached_history_puts_its_short_tail_ahead_of_an_earlier_long_prompt() -> None:
    s, _ = make(slots=8, budget=8, block_size=4)
    s.add(turn1 := seq(20))
    for _ in range(4):
        step(s)  # 20 prompt tokens in chunks of 8, then its first decode step commits the blocks
    s.finish(turn1, FinishReason.STOP)
    other = seq(24, t=1000.0)  # another conversation's first prompt, sent first
    other.token_ids = [100 + i for i in range(24)]
    s.add(other)
    turn2 = seq(t=1001.0)
    turn2.token_ids = [*turn1.token_ids, 90, 91, 92, 93, 94]  # the history (and reply) and a question
    turn2.num_prompt_tokens = len(turn2.token_ids)
    s.add(turn2)
    batch = step(s)
    assert batch is not None and batch.seqs == [turn2, other]
    assert turn2.num_prefix_cached == 20 and batch.num_new_tokens == [7, 1]


def test_a_short_prompt_goes_ahead_of_a_long_one_already_in_its_chunks() -> None:
    s, _ = make(slots=8, budget=10, prefix_caching=False)
    s.add(long := seq(100))
    step(s)
    s.add(short := seq(6))
    batch = step(s)
    assert batch is not None and batch.seqs == [short, long] and batch.num_new_tokens == [6, 4]


def test_the_tenant_with_fewer_running_goes_before_the_shorter_prompt() -> None:
    s, _ = make(slots=8, budget=100, prefix_caching=False)
    s.add(busy := seq(4, tenant="busy"))
    step(s)
    s.add(long := seq(50, tenant="idle"))
    s.add(short := seq(5, tenant="busy"))
    assert prefill_rows(step(s)) == [long, short]
    assert busy.status is SequenceStatus.RUNNING


def test_a_long_prompt_bypassed_for_max_bypasses_steps_goes_first() -> None:
    s, _ = make(slots=4, budget=4, prefix_caching=False)
    s.add(long := seq(40, t=1.0))
    t = 2.0
    for _ in range(MAX_BYPASSES):
        s.add(short := seq(4, t=t))
        t += 1.0
        assert prefill_rows(step(s)) == [short]  # every step a later, shorter prompt goes first
        s.finish(short, FinishReason.STOP)
    # from now on long goes first every other step, until its prompt is done; the shorter, later prompts
    # that keep arriving get the steps between (none waits behind all of long's 40 tokens, 4 a step)
    served = []
    while long.in_prefill:
        s.add(seq(4, t=t))
        t += 1.0
        rows = prefill_rows(step(s))
        assert len(rows) == 1
        served.append(rows[0])
        if rows[0] is not long:
            s.finish(rows[0], FinishReason.STOP)
        assert len(served) <= 20
    assert served.count(long) == 10 and len(served) >= 18  # short ones in the steps between
    assert all(long in served[i : i + 2] for i in range(0, len(served) - 1))  # never two steps without it
    assert len(prefill_rows(step(s))) == 1 and s._bypassed == {}  # a short one again; nobody starved
