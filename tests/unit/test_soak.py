"""The soak's verdict (``loadtests/soak.py``): which outcomes pass which check. The soak itself runs for 20
minutes outside CI; here its pure judgement runs on hand-built outcomes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SOAK_PY = Path(__file__).parents[2] / "loadtests" / "soak.py"


def _load_soak_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("loadtest_soak", SOAK_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


soak = _load_soak_module()


def _state(*outcomes: Any, windows: tuple[tuple[str, float, float], ...] = ()) -> Any:
    state = soak.SoakState(t0=0.0)
    state.outcomes.extend(outcomes)
    state.unload_windows.extend(windows)
    # flat RSS over a 20-minute run; one probe equal to its reference
    state.rss.extend((float(t), 400 * 2**20) for t in range(0, 1201, 5))
    state.probes.append(soak.Probe("a", "d1", "The cat", "text", reference="text"))
    return state


def _checks(state: Any) -> dict[str, bool]:
    args = soak.build_parser().parse_args(["--out", "soak.json"])
    summary = soak.summarize(state, args, {"running": 0, "waiting": 0})
    checks: dict[str, bool] = summary["checks"]
    return checks


WINDOW = ("a", 100.0, 102.0)  # adapter a between an admin unload (100 s) and its reload (102 s)


@pytest.mark.parametrize(
    ("status", "model", "start", "e2e", "ok"),
    [
        ("done", "a", 10.0, 1.0, True),
        ("disconnect", "b", 10.0, 0.2, True),
        ("404", "a", 101.0, 0.01, True),  # inside the window
        ("404", "a", 99.5, 0.8, True),  # sent before the unload, answered after it
        ("stream_error:invalid_request_error", "a", 99.0, 2.0, True),  # waited on it, then it went
        ("404", "a", 103.0, 0.01, False),  # after the reload answered: a real refusal
        ("404", "b", 101.0, 0.01, False),  # another adapter's window does not excuse it
        ("400", "a", 101.0, 0.01, False),  # a valid request is never a 400
        ("stream_error:server_error", "a", 101.0, 0.5, False),
        ("no_done", "a", 10.0, 1.0, False),
        ("", "a", 10.0, None, False),
        ("ReadError", "a", 10.0, 0.3, False),
    ],
)
def test_stream_ok(status: str, model: str, start: float, e2e: float | None, ok: bool) -> None:
    outcome = soak.Outcome("stream", start, status=status, model=model, e2e=e2e)
    assert soak._stream_ok(outcome, _state(windows=(WINDOW,))) is ok


def test_a_clean_run_passes_every_check() -> None:
    state = _state(
        soak.Outcome("stream", 10.0, status="done", model="a", e2e=0.5),
        soak.Outcome("malformed:bad_json", 11.0, status="400", e2e=0.01),
        soak.Outcome("probe", 12.0, status="200", model="a", e2e=0.2),
        soak.Outcome("admin:unload", 100.0, status="200", model="a", e2e=0.01),
    )
    assert all(_checks(state).values())


@pytest.mark.parametrize(
    ("outcome", "failing"),
    [
        # an error chunk, then [DONE]: the streaming form of a 5xx
        (soak.Outcome("stream", 10.0, status="stream_error:server_error", model="a", e2e=1.0), "no_5xx"),
        (soak.Outcome("probe", 10.0, status="503", model="a", e2e=0.1), "no_5xx"),
        (soak.Outcome("stream", 10.0, status="timeout", model="a", e2e=300.0), "no_hung_requests"),
        (soak.Outcome("malformed:nan_literal", 10.0, status="200", e2e=0.1), "malformed_all_4xx"),
        (soak.Outcome("admin:load", 60.0, status="400", model="a", e2e=0.1), "admin_ops_all_200"),
        (soak.Outcome("probe", 12.0, status="404", model="a", e2e=0.1), "probes_equal_reference"),
        (
            soak.Outcome("stream", 10.0, status="404", model="a", e2e=0.01),
            "valid_streams_refused_only_while_unloaded",
        ),
    ],
)
def test_a_bad_outcome_fails_its_check(outcome: object, failing: str) -> None:
    checks = _checks(_state(outcome))
    assert not checks[failing]


def test_a_probe_unequal_to_its_reference_fails() -> None:
    state = _state()
    state.probes.append(soak.Probe("a", "d2", "The cat", "drifted", reference="text"))
    assert not _checks(state)["probes_equal_reference"]


def test_rss_growth_over_the_limit_fails() -> None:
    state = _state()
    state.rss[:] = [(float(t), (400 if t < 1000 else 440) * 2**20) for t in range(0, 1201, 5)]
    assert not _checks(state)["rss_growth_under_limit"]
