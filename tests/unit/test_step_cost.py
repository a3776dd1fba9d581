"""The measured allowance of prompt tokens beside decode rows: what it does before it has measured anything,
what it takes from which steps, and where it settles when steps cost what a linear model says, also when
the decode rows change under it (a burst of new prompts) and when the steps cannot tell the terms apart."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from server.engine.step_cost import PROBE_TOKENS, StepCost

Machine = Callable[[int, int], float]  # decode rows, prompt tokens -> a step's seconds


def machine(fixed_s: float, row_s: float, token_s: float) -> Machine:
    """What a step costs on a machine of that linear model."""
    return lambda rows, tokens: fixed_s + row_s * rows + token_s * tokens


def settled(cost: StepCost, step: Machine, rows: int, steps: int = 400) -> None:
    """Feed ``cost`` what ``step`` reports, each mixed step taking the allowance it then had."""
    for _ in range(steps):
        cost.observe(rows, 0, step(rows, 0))
        prompt = cost.allowance(rows)
        cost.observe(rows, prompt, step(rows, prompt))


def test_before_anything_is_measured_it_allows_the_floor_and_every_other_step_more() -> None:
    cost = StepCost(floor=16, ceiling=512)
    assert cost.allowance(16) == 16 + 16 and cost.allowance(4) == 16 + 4  # plus one per decode row
    allowed = []
    for _ in range(4):
        cost.observe(16, 0, 0.05)  # decode steps alone say nothing about prompt tokens
        allowed.append(cost.allowance(16))
    assert allowed == [32 + PROBE_TOKENS, 32] * 2 and cost.token_s is None
    cost.observe(16, 2, 0.06)  # nor do two prompt tokens beside them: too little spread to tell noise
    assert cost.token_s is None


def test_a_queue_that_never_drains_does_not_hold_the_allowance_at_the_floor() -> None:
    """Every step takes all the allowance (prompts keep arriving): the probe's steps differ from the
    floor's, which measures a token's cost, and the allowance moves to what the ratio keeps."""
    step = machine(0.100, 0.003, 0.002)  # 16 rows: 148 ms; a prompt token 2 ms
    cost = StepCost(floor=8, ceiling=512, ratio=1.5)
    taken = []
    for _ in range(200):
        prompt = cost.allowance(16)
        taken.append(prompt)
        cost.observe(16, prompt, step(16, prompt))
    assert taken[:2] == [8 + 16, 8 + 16 + PROBE_TOKENS]  # the floor, then the probe: measured since
    assert cost.token_s == pytest.approx(0.002, rel=0.01)
    assert taken[-1] == int(0.5 * 0.148 / 0.002)  # 37


def test_it_allows_what_keeps_a_step_within_the_ratio_of_its_decode_rows() -> None:
    cost = StepCost(floor=16, ceiling=512, ratio=1.5)
    cost.observe(16, 0, 0.050)
    cost.observe(16, 32, 0.050 + 32 * 0.0005)
    # half a decode step, 25 ms, at 0.5 ms a token: 50 tokens in all
    assert cost.token_s == pytest.approx(0.0005)
    assert cost.allowance(16) == 50
    assert cost.allowance(40) == 16 + 40  # never fewer than the floor plus one per decode row


@pytest.mark.parametrize(
    ("token_s", "expected"),
    [(0.010, 32), (0.0000001, 512)],  # dear tokens: the floor (plus the rows); nearly free: the budget
)
def test_it_stays_within_floor_and_ceiling(token_s: float, expected: int) -> None:
    cost = StepCost(floor=16, ceiling=512)
    cost.observe(16, 0, 0.050)
    cost.observe(16, 32, 0.050 + 32 * token_s)
    assert cost.allowance(16) == expected


def test_steps_without_decode_rows_are_not_counted() -> None:
    cost = StepCost(floor=16, ceiling=512)
    cost.observe(0, 400, 0.4)  # a prompt alone holds no stream up
    cost.observe(16, 32, 0.066)  # one step: nothing to compare it with
    assert cost.decode_s(16) is None and cost.token_s is None
    cost.observe(16, 0, 0.050)
    assert cost.token_s == pytest.approx(0.016 / 32)  # the prompt-alone step left no trace


def test_a_mixed_step_faster_than_decode_steps_makes_tokens_free_not_negative() -> None:
    cost = StepCost(floor=16, ceiling=512)
    cost.observe(16, 0, 0.050)
    cost.observe(16, 32, 0.040)
    assert cost.token_s == 0.0 and cost.allowance(16) == 512


@pytest.mark.parametrize(
    ("decode_s", "token_s"),
    [
        (0.050, 0.00047),  # bf16 on a 2-core Xeon with AMX
        (0.120, 0.0019),  # float32 on a 2-core EPYC Zen 4
        (0.150, 0.0038),  # bf16 widened to float32 on a 2-core AVX2 EPYC Zen 3
    ],
)
def test_it_settles_where_a_linear_cost_model_says(decode_s: float, token_s: float) -> None:
    cost = StepCost(floor=0, ceiling=512, ratio=1.5)  # (no floor: the fit alone)
    settled(cost, machine(decode_s, 0.0, token_s), rows=16)
    assert cost.allowance(16) == pytest.approx(0.5 * decode_s / token_s, abs=1)


def test_it_compares_a_mixed_step_with_decode_steps_of_its_own_rows() -> None:
    """Under a burst of new prompts the decode rows drop while every step takes prompt tokens. Decode
    steps of 16 rows and mixed steps of 8 rows: an average of decode steps, whatever their rows, makes the
    mixed steps' prompt tokens look nearly free (this is what ran the allowance away); the fit does not."""
    step = machine(0.030, 0.006, 0.004)  # 16 decode rows: 126 ms; 8 rows: 78 ms; a prompt token 4 ms
    cost = StepCost(floor=0, ceiling=512, ratio=1.5)  # (no floor: the fit alone)
    for _ in range(64):
        cost.observe(16, 0, step(16, 0))
        cost.observe(12, 0, step(12, 0))
    for rows, prompt in [(8, 20), (8, 30), (10, 20), (8, 24)] * 8:
        cost.observe(rows, prompt, step(rows, prompt))
    assert cost.token_s == pytest.approx(0.004, rel=0.02)
    assert cost.decode_s(8) == pytest.approx(0.078, rel=0.02)
    assert cost.allowance(8) == pytest.approx(0.5 * 0.078 / 0.004, abs=1)  # 9, not hundreds
    assert cost.allowance(16) == pytest.approx(0.5 * 0.126 / 0.004, abs=1)


def test_where_steps_cannot_tell_the_terms_apart_the_slopes_hold() -> None:
    """Every step mixed with the same prompt tokens for long (a burst), or the decode rows never changing:
    the data say nothing about one slope, and the fit keeps its last estimate instead of drifting with
    noise into an allowance that runs away."""
    rng = random.Random(1)
    step = machine(0.050, 0.0, 0.0005)
    cost = StepCost(floor=8, ceiling=512, ratio=1.5)
    settled(cost, step, rows=16, steps=100)
    before = cost.token_s
    assert before == pytest.approx(0.0005, rel=0.01)
    for _ in range(2000):  # the same 40 prompt tokens beside 16 rows, 10% noise
        cost.observe(16, 40, step(16, 40) * rng.uniform(0.9, 1.1))
    assert cost.token_s == pytest.approx(before, rel=0.1)
    assert 40 <= cost.allowance(16) <= 60  # 50 without noise


def test_it_follows_the_machine_through_noise() -> None:
    rng = random.Random(0)
    cost = StepCost(floor=8, ceiling=512, ratio=1.5)
    for _ in range(2000):
        rows = rng.choice((12, 14, 16))
        cost.observe(rows, 0, (0.040 + 0.001 * rows) * rng.uniform(0.9, 1.1))
        prompt = cost.allowance(rows)
        cost.observe(rows, prompt, (0.040 + 0.001 * rows + 0.0005 * prompt) * rng.uniform(0.9, 1.1))
    assert 45 <= cost.allowance(16) <= 65  # 56 without noise
    settled(cost, machine(0.040, 0.001, 0.0001), rows=16)  # faster at prompt tokens: it allows more
    assert cost.allowance(16) >= 250
