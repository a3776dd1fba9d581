"""The measured allowance of prompt tokens beside decode rows: what it does before it has measured anything,
what it takes from which steps, and where it settles when steps cost what a linear model says."""

from __future__ import annotations

import random

import pytest

from server.engine.step_cost import MIN_SAMPLE_TOKENS, StepCost


def settled(cost: StepCost, decode_s: float, token_s: float, rows: int, steps: int = 400) -> None:
    """Feed ``cost`` what a machine where a step costs ``decode_s + token_s * prompt tokens`` reports,
    each mixed step taking what the allowance then was (plus one per row, as the scheduler allows)."""
    for _ in range(steps):
        cost.observe(rows, 0, decode_s)
        prompt = cost.beside() + rows
        cost.observe(rows, prompt, decode_s + token_s * prompt)


def test_before_anything_is_measured_it_allows_the_floor() -> None:
    cost = StepCost(floor=16, ceiling=512)
    assert cost.beside() == 16
    cost.observe(16, 0, 0.05)  # a decode step alone says nothing about prompt tokens yet
    assert cost.beside() == 16


def test_it_allows_what_keeps_a_step_within_the_ratio() -> None:
    cost = StepCost(floor=16, ceiling=512, ratio=1.6)
    cost.observe(16, 0, 0.050)
    cost.observe(16, 32, 0.050 + 32 * 0.0005)
    # 0.6 decode steps = 30 ms, 0.5 ms a token: 60 tokens, less the 16 the scheduler adds for the rows
    assert cost.beside() == 44


@pytest.mark.parametrize(
    ("token_s", "expected"),
    [(0.010, 16), (0.0000001, 512)],  # dear tokens: the floor; nearly free ones: the whole budget
)
def test_it_stays_within_floor_and_ceiling(token_s: float, expected: int) -> None:
    cost = StepCost(floor=16, ceiling=512)
    cost.observe(16, 0, 0.050)
    cost.observe(16, 32, 0.050 + 32 * token_s)
    assert cost.beside() == expected


def test_steps_without_decode_rows_and_tiny_chunks_are_not_counted() -> None:
    cost = StepCost(floor=16, ceiling=512)
    cost.observe(0, 400, 0.4)  # a prompt alone holds no stream up
    cost.observe(16, 32, 0.066)  # no decode step measured yet: nothing to subtract
    assert cost.decode_s is None and cost.token_s is None
    cost.observe(16, 0, 0.050)
    cost.observe(16, MIN_SAMPLE_TOKENS - 1, 0.5)  # too few tokens to tell their cost from noise
    assert cost.token_s is None
    cost.observe(16, MIN_SAMPLE_TOKENS, 0.050 + MIN_SAMPLE_TOKENS * 0.001)
    assert cost.token_s == pytest.approx(0.001)


def test_a_mixed_step_faster_than_the_decode_average_adds_nothing_not_less() -> None:
    cost = StepCost(floor=16, ceiling=512)
    cost.observe(16, 0, 0.050)
    cost.observe(16, 32, 0.040)
    assert cost.token_s == 0.0 and cost.beside() == 512


@pytest.mark.parametrize(
    ("decode_s", "token_s", "expected"),
    [
        (0.050, 0.00047, 0.6 * 0.050 / 0.00047 - 16),  # bf16 on a 2-core Xeon with AMX
        (0.120, 0.0019, 0.6 * 0.120 / 0.0019 - 16),  # float32 on a 2-core EPYC Zen 4
    ],
)
def test_it_settles_where_a_linear_cost_model_says(decode_s: float, token_s: float, expected: float) -> None:
    cost = StepCost(floor=16, ceiling=512, ratio=1.6)
    settled(cost, decode_s, token_s, rows=16)
    assert cost.beside() == pytest.approx(expected, abs=1)


def test_it_follows_the_machine_through_noise() -> None:
    rng = random.Random(0)
    cost = StepCost(floor=16, ceiling=512, ratio=1.6)
    for _ in range(2000):
        noise = rng.uniform(0.9, 1.1)
        cost.observe(16, 0, 0.050 * noise)
        prompt = cost.beside() + 16
        cost.observe(16, prompt, (0.050 + 0.0005 * prompt) * rng.uniform(0.9, 1.1))
    assert 30 <= cost.beside() <= 60  # 44 without noise
    settled(cost, 0.050, 0.0001, rows=16)  # the machine got faster at prompt tokens: it allows more
    assert cost.beside() >= 250
