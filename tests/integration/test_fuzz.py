"""schemathesis against the running demo server's own ``/openapi.json``: every operation, generated bodies
(valid and invalid), checked for ``not_a_server_error`` (no 5xx) and response-schema conformance.

Bounded to a few examples per operation (``MAX_EXAMPLES``) without shrinking, so the whole module stays
within a few minutes on two cores. Generation bodies for the OpenAI routes name the served base model most
of the time, so they reach the engine instead of stopping at the 404 of an unknown model.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import response_schema_conformance  # noqa: E402

from tests.integration.api_server import ServerProcess, start_server  # noqa: E402

pytestmark = pytest.mark.slow

MAX_EXAMPLES = 12


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = start_server(tmp_path_factory.mktemp("fuzz"), ["--max-model-len", "256"])
    yield process
    assert process.terminate() == 0, process.log_tail()


@pytest.fixture(scope="module")
def base_model(fuzz_server: ServerProcess) -> str:
    with fuzz_server.http() as http:
        return str(next(m["id"] for m in http.get("/v1/models").json()["data"] if not m.get("parent")))


def _operations(fuzz_server: ServerProcess) -> list[Any]:
    schema = schemathesis.openapi.from_url(f"{fuzz_server.base_url}/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


def _prepare(case: Any, base_model: str) -> None:
    body = case.body
    if isinstance(body, dict) and case.path in ("/v1/completions", "/v1/chat/completions"):
        # most generated bodies name the base, so the fuzzer reaches the engine (3 in 4, by the body's shape)
        if len(body) % 4 != 0:
            body["model"] = base_model
        if isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 8:
            body["max_tokens"] = 8  # a short generation: the point is the input handling, not decoding


def test_no_server_error_and_responses_match_the_schema(fuzz_server: ServerProcess, base_model: str) -> None:
    operations = _operations(fuzz_server)
    assert len(operations) >= 10  # every route is documented, admin ones included
    failures: list[str] = []
    for operation in operations:
        # valid bodies and invalid ones (schemathesis' negative mode), each a bounded hypothesis run
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=MAX_EXAMPLES,
                deadline=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
                derandomize=True,
                database=None,
            )
            def run(case: Any) -> None:
                _prepare(case, base_model)
                case.call_and_validate(
                    base_url=fuzz_server.base_url,
                    checks=[not_a_server_error, response_schema_conformance],
                    timeout=120,
                )

            try:
                run()
            except Unsatisfiable:
                continue  # no input to make invalid (a GET without parameters, a path-only route)
            except Exception as exc:  # a check failed: collect every operation's first failure
                failures.append(f"{operation.label} ({mode.value}): {exc}")
    assert not failures, "\n\n".join(failures)


def test_the_server_survived_the_fuzzing(fuzz_server: ServerProcess, base_model: str) -> None:
    # after every generated case (run above, in this module), the server still serves and logged no traceback
    with fuzz_server.http() as http:
        response = http.post("/v1/completions", json={"model": base_model, "prompt": "hi", "max_tokens": 2})
    assert response.status_code == 200, response.text
    log = Path(fuzz_server.log_path).read_text(errors="replace")
    assert "Traceback" not in log, fuzz_server.log_tail()
