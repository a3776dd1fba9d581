"""Sampler: each stage against hand-computed logits, then seeding, batch independence and distributions."""

from __future__ import annotations

import math

import pytest
import torch

from server.engine.types import SamplingParams
from server.runtime.sampler import (
    ALL_FEATURES,
    Sampler,
    SamplingFeatures,
    apply_filters,
    apply_penalties,
    gumbel_noise,
    open_uniform,
    splitmix64,
)

CPU = torch.device("cpu")
NEG_INF = float("-inf")
MASK64 = (1 << 64) - 1


def _splitmix64_reference(x: int) -> int:
    x &= MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def _as_signed(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


def _sampler(vocab_size: int = 8, num_slots: int = 4) -> Sampler:
    return Sampler(vocab_size, num_slots, CPU)


# ------------------------------------------------------------------------------------------------ hash


@pytest.mark.parametrize("value", [0, 1, 2, 12345, -1, -(2**63), 2**63 - 1, 0x0123456789ABCDEF])
def test_splitmix64_matches_unsigned_reference(value: int) -> None:
    got = splitmix64(torch.tensor([value], dtype=torch.int64))
    assert int(got[0]) == _as_signed(_splitmix64_reference(value))


def test_gumbel_noise_is_a_function_of_seed_step_and_token_only() -> None:
    a = gumbel_noise(torch.tensor([7, 7, 8]), torch.tensor([0, 1, 0]), 16)  # [3, 16]
    b = gumbel_noise(torch.tensor([8, 7]), torch.tensor([0, 0]), 16)
    assert torch.equal(a[0], b[1]) and torch.equal(a[2], b[0])
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[0], a[2])
    assert torch.isfinite(a).all()


def test_uniforms_never_reach_0_or_1_so_the_noise_stays_finite() -> None:
    """The extreme hashes (all bits set: the old 24-bit mapping rounded it to 1.0, +inf noise, and a token
    the grammar masked to -inf became NaN and won the argmax, once in 2**24 draws)."""
    extremes = torch.tensor([-1, 0, 2**63 - 1, -(2**63), 1 << 40], dtype=torch.int64)
    u = open_uniform(extremes)
    assert bool(((u > 0) & (u < 1)).all())
    noise = -torch.log(-torch.log(u))
    assert torch.isfinite(noise).all()
    masked = torch.full((5,), float("-inf")) + noise
    assert not torch.isnan(masked).any()  # a masked token stays -inf whatever its noise


# ------------------------------------------------------------------------------------------- penalties

# (logits, prompt tokens, output counts, repetition, frequency, presence, expected)
PENALTY_CASES = [
    pytest.param(
        [1.0, 2.0, -1.0, 0.5], [], [0, 0, 0, 0], 2.0, 0.0, 0.0, [1.0, 2.0, -1.0, 0.5], id="nothing-seen"
    ),
    pytest.param(
        [1.0, 2.0, -1.0, 0.5], [1, 2], [0, 0, 0, 0], 2.0, 0.0, 0.0, [1.0, 1.0, -2.0, 0.5], id="rep-prompt"
    ),
    pytest.param(
        [1.0, 2.0, -1.0, 0.0], [], [3, 0, 1, 1], 2.0, 0.0, 0.0, [0.5, 2.0, -2.0, 0.0], id="rep-output"
    ),
    pytest.param(
        [4.0, -4.0, 1.0, 1.0], [0, 1], [0, 0, 0, 0], 0.5, 0.0, 0.0, [8.0, -2.0, 1.0, 1.0], id="rep-below-1"
    ),
    pytest.param(
        [1.0, 1.0, 1.0, 1.0], [0], [0, 1, 3, 0], 1.0, 0.5, 0.0, [1.0, 0.5, -0.5, 1.0], id="frequency"
    ),
    pytest.param(
        [1.0, 1.0, 1.0, 1.0], [0], [0, 1, 3, 0], 1.0, 0.0, 0.25, [1.0, 0.75, 0.75, 1.0], id="presence"
    ),
    pytest.param(
        [1.0, 1.0, 1.0, 1.0], [], [0, 1, 3, 0], 1.0, -1.0, -1.0, [1.0, 3.0, 5.0, 1.0], id="negative"
    ),
    # Order: repetition first, then frequency and presence: 2/2 - 0.5*2 - 1 = -1; -1*2 - 0.5 - 1 = -3.5.
    pytest.param([2.0, -1.0, 3.0, 0.0], [3], [2, 1, 0, 0], 2.0, 0.5, 1.0, [-1.0, -3.5, 3.0, 0.0], id="all"),
]


@pytest.mark.parametrize(("logits", "prompt", "counts", "rep", "freq", "pres", "expected"), PENALTY_CASES)
def test_apply_penalties(
    logits: list[float],
    prompt: list[int],
    counts: list[int],
    rep: float,
    freq: float,
    pres: float,
    expected: list[float],
) -> None:
    prompt_mask = torch.zeros(1, len(logits), dtype=torch.bool)
    prompt_mask[0, prompt] = True
    got = apply_penalties(
        torch.tensor([logits]),
        prompt_mask,
        torch.tensor([counts], dtype=torch.int32),
        torch.tensor([rep]),
        torch.tensor([freq]),
        torch.tensor([pres]),
    )
    torch.testing.assert_close(got, torch.tensor([expected]))


# --------------------------------------------------------------------------------------------- filters

LOGITS = [math.log(p) for p in (0.05, 0.4, 0.1, 0.3, 0.15)]  # probabilities 0.05 0.4 0.1 0.3 0.15
# (top_k, top_p, min_p, kept token ids)
FILTER_CASES = [
    pytest.param(0, 1.0, 0.0, [0, 1, 2, 3, 4], id="all-off"),
    pytest.param(-1, 1.0, 0.0, [0, 1, 2, 3, 4], id="top-k-negative-off"),
    pytest.param(5, 1.0, 0.0, [0, 1, 2, 3, 4], id="top-k-vocab"),
    pytest.param(100, 1.0, 0.0, [0, 1, 2, 3, 4], id="top-k-above-vocab"),
    pytest.param(1, 1.0, 0.0, [1], id="top-k-1"),
    pytest.param(3, 1.0, 0.0, [1, 3, 4], id="top-k-3"),
    pytest.param(0, 0.39, 0.0, [1], id="top-p-below-first"),
    pytest.param(0, 0.41, 0.0, [1, 3], id="top-p-just-past-first"),
    pytest.param(0, 0.7, 0.0, [1, 3], id="top-p-reaches-at-second"),
    pytest.param(0, 0.8, 0.0, [1, 3, 4], id="top-p-0.8"),
    pytest.param(0, 0.01, 0.0, [1], id="top-p-tiny-keeps-top"),
    # top-k 2 renormalizes to 0.4/0.7=0.571, 0.3/0.7=0.429: top-p 0.5 then keeps only token 1.
    pytest.param(2, 0.5, 0.0, [1], id="top-p-after-top-k"),
    pytest.param(2, 0.6, 0.0, [1, 3], id="top-p-after-top-k-both"),
    pytest.param(0, 1.0, 0.3, [1, 3, 4], id="min-p-0.3"),  # threshold 0.12
    pytest.param(0, 1.0, 0.2, [1, 2, 3, 4], id="min-p-0.2"),  # threshold 0.08
    pytest.param(0, 1.0, 1.0, [1], id="min-p-1"),
    pytest.param(0, 0.8, 0.5, [1, 3], id="top-p-then-min-p"),  # min-p 0.5 drops token 4 (0.15 < 0.2)
    pytest.param(4, 1.0, 0.3, [1, 3, 4], id="top-k-then-min-p"),
]


@pytest.mark.parametrize(("top_k", "top_p", "min_p", "kept"), FILTER_CASES)
def test_apply_filters(top_k: int, top_p: float, min_p: float, kept: list[int]) -> None:
    logits = torch.tensor([LOGITS])
    got = apply_filters(logits, torch.tensor([top_k]), torch.tensor([top_p]), torch.tensor([min_p]))
    expected = torch.full_like(logits, NEG_INF)
    expected[0, kept] = logits[0, kept]
    torch.testing.assert_close(got, expected)


def test_top_k_keeps_ties_with_the_kth_logit() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, 2.0, 0.0]])
    got = apply_filters(logits, torch.tensor([2]), torch.tensor([1.0]), torch.tensor([0.0]))
    torch.testing.assert_close(got, torch.tensor([[NEG_INF, 3.0, 2.0, 2.0, NEG_INF]]))


def test_filters_are_per_row() -> None:
    logits = torch.tensor([LOGITS, LOGITS])
    got = apply_filters(logits, torch.tensor([1, 0]), torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.3]))
    assert torch.isfinite(got[0]).tolist() == [False, True, False, False, False]
    assert torch.isfinite(got[1]).tolist() == [False, True, False, True, True]


# ------------------------------------------------------------------------------------------- the call


def test_greedy_is_argmax_with_first_index_on_ties() -> None:
    sampler = _sampler(vocab_size=16, num_slots=3)
    for slot in range(3):
        sampler.start(slot, [], SamplingParams(temperature=0.0), seed=slot)
    logits = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    logits[2] = 0.0
    logits[2, 5] = logits[2, 9] = 1.0
    got = sampler(logits, torch.arange(3))
    assert got.tolist() == [*torch.argmax(logits[:2], dim=-1).tolist(), 5]
    assert got.dtype == torch.int64


def test_greedy_sees_penalties() -> None:
    sampler = _sampler()
    sampler.start(0, [2], SamplingParams(temperature=0.0, repetition_penalty=4.0), seed=0)
    logits = torch.tensor([[0.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    assert sampler(logits, torch.tensor([0])).tolist() == [1]  # 2 / 4 = 0.5 < 1
    assert sampler(logits, torch.tensor([0])).tolist() == [2]  # now 1 is penalized too: 0.25 < 0.5


def test_frequency_penalty_accumulates_over_steps() -> None:
    sampler = _sampler(vocab_size=4, num_slots=1)
    sampler.start(0, [], SamplingParams(temperature=0.0, frequency_penalty=0.6), seed=0)
    logits = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    tokens = [int(sampler(logits, torch.tensor([0]))[0]) for _ in range(4)]
    # token 0: 1.0, 0.4, -0.2 ... loses to token 1 (0.0) after two picks, then 1 is penalized, etc.
    assert tokens == [0, 0, 1, 2]
    assert sampler.output_counts(0).tolist() == [2, 1, 1, 0]
    assert sampler.step_count(0) == 4


def _run(sampler: Sampler, slot: int, logits: torch.Tensor, steps: int) -> list[int]:
    return [int(sampler(logits, torch.tensor([slot]))[0]) for _ in range(steps)]


def test_same_seed_same_tokens_different_seed_different_tokens() -> None:
    logits = torch.zeros(1, 16)  # uniform: every draw is pure noise
    params = SamplingParams(temperature=1.0)
    runs = []
    for seed in (11, 11, 12):
        sampler = _sampler(vocab_size=16)
        sampler.start(1, [], params, seed=seed)
        runs.append(_run(sampler, 1, logits, 20))
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    assert len(set(runs[0])) > 1  # the step counter changes the draw


def test_samples_do_not_depend_on_slot_or_batch_neighbours() -> None:
    gen = torch.Generator().manual_seed(1)
    row = torch.randn(1, 16, generator=gen)
    params = SamplingParams(temperature=0.8, top_k=10, top_p=0.95, repetition_penalty=1.3)

    alone = _sampler(vocab_size=16, num_slots=4)
    alone.start(0, [1, 2, 3], params, seed=42)
    expected = _run(alone, 0, row, 12)

    crowded = _sampler(vocab_size=16, num_slots=4)
    crowded.start(3, [1, 2, 3], params, seed=42)
    crowded.start(0, [5], SamplingParams(temperature=1.5, presence_penalty=1.0), seed=7)
    crowded.start(2, [], SamplingParams(temperature=0.0), seed=42)
    got = []
    for step in range(12):
        others = torch.randn(3, 16, generator=gen)
        # Our row moves within the batch and the batch changes size; padding rows point at slot 4.
        if step % 2:
            logits, slots = torch.cat([others, row]), torch.tensor([0, 2, 4, 3])
            got.append(int(crowded(logits, slots)[3]))
        else:
            logits, slots = torch.cat([row, others[:1]]), torch.tensor([3, 4])
            got.append(int(crowded(logits, slots)[0]))
    assert got == expected


def test_padding_rows_do_not_touch_real_slots() -> None:
    sampler = _sampler(vocab_size=8, num_slots=2)
    sampler.start(0, [1], SamplingParams(temperature=1.0, frequency_penalty=1.0), seed=3)
    sampler.start(1, [2], SamplingParams(temperature=0.0), seed=4)
    before = [(sampler.output_counts(s).clone(), sampler.step_count(s)) for s in (0, 1)]
    sampler(torch.randn(5, 8), torch.full((5,), 2))
    after = [(sampler.output_counts(s), sampler.step_count(s)) for s in (0, 1)]
    for (counts_before, step_before), (counts_after, step_after) in zip(before, after, strict=True):
        assert torch.equal(counts_before, counts_after) and step_before == step_after


def test_free_and_start_reset_the_slot() -> None:
    sampler = _sampler(vocab_size=4, num_slots=1)
    params = SamplingParams(temperature=0.0, repetition_penalty=3.0, frequency_penalty=1.0)
    logits = torch.tensor([[3.0, 2.0, 0.0, 0.0]])
    sampler.start(0, [0], params, seed=0)
    _run(sampler, 0, logits, 3)
    sampler.free(0)
    assert sampler.output_counts(0).tolist() == [0, 0, 0, 0] and sampler.step_count(0) == 0
    assert sampler.features() == SamplingFeatures(penalties=False, filters=False, random=False, bias=False)
    # A fresh start sees only its own prompt: token 0 is no longer penalized by the previous prompt.
    sampler.start(0, [1], SamplingParams(temperature=0.0, repetition_penalty=3.0), seed=0)
    assert _run(sampler, 0, logits, 1) == [0]


def test_restart_without_free_repeats_the_seeded_sequence() -> None:
    sampler = _sampler(vocab_size=16, num_slots=1)
    params = SamplingParams(temperature=1.0, presence_penalty=0.5)
    logits = torch.zeros(1, 16)
    sampler.start(0, [3], params, seed=9)
    first = _run(sampler, 0, logits, 10)
    sampler.start(0, [3], params, seed=9)
    assert _run(sampler, 0, logits, 10) == first


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_accepts_any_float_dtype(dtype: torch.dtype) -> None:
    sampler = _sampler()
    sampler.start(0, [], SamplingParams(temperature=0.7, top_p=0.9), seed=1)
    logits = torch.randn(2, 8).to(dtype)
    out = sampler(logits, torch.tensor([0, 4]))
    assert out.shape == (2,) and out.dtype == torch.int64


def test_skipping_unneeded_stages_gives_the_same_tokens() -> None:
    logits = torch.randn(3, 8, generator=torch.Generator().manual_seed(5))
    results = []
    for features in (ALL_FEATURES, None):
        sampler = _sampler()
        sampler.start(0, [1], SamplingParams(temperature=0.9), seed=1)
        sampler.start(1, [2], SamplingParams(temperature=0.0), seed=2)
        assert sampler.features() == SamplingFeatures(penalties=False, filters=False, random=True, bias=False)
        results.append([sampler(logits, torch.tensor([0, 1, 4]), features).tolist() for _ in range(5)])
    assert results[0] == results[1]


@pytest.mark.parametrize("slot", [-1, 4])
def test_start_rejects_a_slot_out_of_range(slot: int) -> None:
    with pytest.raises(IndexError):
        _sampler().start(slot, [], SamplingParams(), seed=0)


def test_start_rejects_prompt_ids_outside_the_vocab() -> None:
    with pytest.raises(ValueError, match="prompt token ids"):
        _sampler(vocab_size=8).start(0, [3, 8], SamplingParams(), seed=0)


# --------------------------------------------------------------------------------------- distribution

NUM_SEEDS = 1500
STEPS = 4
TOLERANCE = 0.03  # about 5 standard errors of a frequency near 0.3 with 6000 draws


def _frequencies(logits: list[float], params: SamplingParams) -> torch.Tensor:
    """Sampled-token frequencies over NUM_SEEDS requests x STEPS steps, all in one batch per step."""
    sampler = Sampler(len(logits), NUM_SEEDS, CPU)
    for slot in range(NUM_SEEDS):
        sampler.start(slot, [], params, seed=1000 + slot)
    batch = torch.tensor([logits]).expand(NUM_SEEDS, -1)
    slots = torch.arange(NUM_SEEDS)
    tokens = torch.cat([sampler(batch, slots) for _ in range(STEPS)])
    return torch.bincount(tokens, minlength=len(logits)).to(torch.float32) / tokens.numel()


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_frequencies_follow_softmax_over_temperature(temperature: float) -> None:
    logits = [0.5, -1.0, 2.0, 0.0, 1.0, -0.5, 1.5, -2.0]
    freq = _frequencies(logits, SamplingParams(temperature=temperature))
    expected = torch.softmax(torch.tensor(logits) / temperature, dim=-1)
    assert (freq - expected).abs().max() < TOLERANCE


def test_frequencies_follow_the_filtered_renormalized_distribution() -> None:
    logits = [0.5, -1.0, 2.0, 0.0, 1.0, -0.5, 1.5, -2.0]
    freq = _frequencies(logits, SamplingParams(temperature=1.0, top_k=3))
    expected = torch.zeros(8)
    top = torch.tensor([2, 6, 4])
    expected[top] = torch.softmax(torch.tensor(logits)[top], dim=-1)
    assert (freq - expected).abs().max() < TOLERANCE
    assert freq[expected == 0].sum() == 0


# ------------------------------------------------------------------ logit_bias, min_tokens, logprobs


def test_logit_bias_moves_the_argmax_and_leaves_other_slots_alone() -> None:
    sampler = _sampler(vocab_size=4, num_slots=2)
    logits = torch.tensor([[1.0, 3.0, 0.0, 0.0], [1.0, 3.0, 0.0, 0.0]])
    sampler.start(0, [], SamplingParams(temperature=0.0, logit_bias=((2, 100.0), (1, -100.0))), seed=0)
    sampler.start(1, [], SamplingParams(temperature=0.0), seed=0)
    assert sampler(logits, torch.tensor([0, 1])).tolist() == [2, 1]
    sampler.free(0)
    sampler.start(0, [], SamplingParams(temperature=0.0), seed=0)
    assert sampler(logits, torch.tensor([0, 1])).tolist() == [1, 1]  # the bias left with its sequence


def test_min_tokens_blocks_stop_ids_until_enough_tokens_are_out() -> None:
    sampler = _sampler(vocab_size=4, num_slots=1)
    logits = torch.tensor([[0.0, 0.0, 0.0, 5.0]])  # token 3 (EOS here) is the argmax
    sampler.start(0, [], SamplingParams(temperature=0.0, min_tokens=2), seed=0, stop_token_ids=[3])
    assert _run(sampler, 0, logits, 3) == [0, 0, 3]


@pytest.mark.parametrize("mode", ["raw_logprobs", "processed_logprobs"])
def test_logprobs_for_the_rows_that_asked(mode: str) -> None:
    sampler = Sampler(6, 3, CPU, logprobs_mode=mode)  # type: ignore[arg-type]
    logits = torch.randn(3, 6, generator=torch.Generator().manual_seed(3))
    sampler.start(0, [], SamplingParams(temperature=0.0, presence_penalty=2.0), seed=0)
    sampler.start(2, [], SamplingParams(temperature=0.5), seed=9)
    out = sampler.sample(logits, torch.tensor([0, 1, 2]), logprob_rows=torch.tensor([0, 2]), num_logprobs=3)
    assert out.logprobs is not None and out.logprobs.rows.tolist() == [0, 2]
    rows = out.logprobs.to_host([3, 1])
    assert [len(r.top_ids) for r in rows] == [3, 1]
    # the distribution: raw = the model's; processed = what row 2 sampled from (temperature 0.5)
    dists = [logits[0], logits[2] if mode == "raw_logprobs" else logits[2] / 0.5]
    for row, dist, token in zip(rows, dists, out.token_ids[[0, 2]].tolist(), strict=True):
        want = torch.log_softmax(dist, dim=-1)
        assert row.token_id == token
        assert row.logprob == pytest.approx(float(want[token]), abs=1e-5)
        assert list(row.top_ids) == want.topk(len(row.top_ids)).indices.tolist()
        assert row.rank == int((want > want[token]).sum()) + 1


def test_no_logprobs_unless_asked() -> None:
    sampler = _sampler()
    sampler.start(0, [], SamplingParams(), seed=0)
    assert sampler.sample(torch.randn(1, 8), torch.tensor([0])).logprobs is None
