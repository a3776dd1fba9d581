"""A grammar that takes long to compile stalls nobody else (in process: the real engine, store and app; HTTP
over ASGI). Proved by the order of events, not by time: one tenant's schema compile is held on an ``Event``
(the injected fault: a schema that compiles slowly) while another tenant's unconstrained request streams to
its end and a constrained request with another schema is answered; only then is the compile released, and
the held request completes with output that validates against its schema."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import pytest

from server.api.app import create_app
from server.bootstrap import build_engine
from server.config import Settings
from server.engine.engine import AsyncEngine
from server.structured.grammar import GrammarSpec
from tests.integration.api_server import sse_data

pytestmark = pytest.mark.slow

HOLD_S = 60.0  # a held compile gives up after this long, so a broken build fails instead of hanging
KEYS = {
    "keys": [
        {"key": "acme-compile-isolation-key", "tenant": "acme", "adapters": "*"},
        {"key": "lab-compile-isolation-key", "tenant": "lab", "adapters": "*"},
    ]
}
SLOW = {  # the schema whose compile is held
    "type": "object",
    "properties": {
        "animal": {"enum": ["cat", "dog", "owl"]},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["animal", "n"],
    "additionalProperties": False,
}
# closed (no other keys): the answer ends within max_tokens whatever the model would add, on any CPU
OTHER = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}},
    "required": ["ok"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def parts(
    demo_bundle: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[AsyncEngine, Any, Settings]]:
    keys = tmp_path_factory.mktemp("compile-isolation") / "keys.json"
    keys.write_text(json.dumps(KEYS))
    settings = Settings(
        device="cpu",
        model=str(demo_bundle.base),
        adapter_dir=demo_bundle.adapters,
        api_keys=keys,
        max_num_seqs=8,
        max_model_len=256,
    )
    engine, store = build_engine(settings)
    engine.start()
    yield engine, store, settings
    engine.stop()
    store.close()


def schema_body(schema: dict[str, Any], model: str) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "Name an animal."}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
        "max_tokens": 60,
        "temperature": 0.0,
    }


def test_a_held_schema_compile_stalls_no_other_tenant(
    parts: tuple[AsyncEngine, Any, Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, store, settings = parts
    compiling, release = threading.Event(), threading.Event()
    real_grammar_text = GrammarSpec.grammar_text
    slow_source = json.dumps(SLOW, sort_keys=True)

    def held_grammar_text(spec: GrammarSpec) -> str:  # runs inside GrammarCompiler.compile
        if spec.source == slow_source:
            compiling.set()
            release.wait(HOLD_S)
        return real_grammar_text(spec)

    monkeypatch.setattr(GrammarSpec, "grammar_text", held_grammar_text)
    app = create_app(settings, engine, store=store)
    base = engine.model_id
    order: list[str] = []

    async def scenario() -> tuple[httpx.Response, list[dict[str, Any]], httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=HOLD_S) as client:
            acme = {"Authorization": f"Bearer {KEYS['keys'][0]['key']}"}
            lab = {"Authorization": f"Bearer {KEYS['keys'][1]['key']}"}

            async def held_request() -> httpx.Response:
                response = await client.post(
                    "/v1/chat/completions", json=schema_body(SLOW, base), headers=acme
                )
                order.append("held request answered")
                return response

            held = asyncio.ensure_future(held_request())
            await asyncio.to_thread(compiling.wait, HOLD_S)
            order.append("compile held")
            # another tenant's unconstrained stream runs through the engine to its end
            body = {
                "model": "pirate",
                "prompt": "The cat",
                "max_tokens": 12,
                "temperature": 0.0,
                "stream": True,
            }
            async with client.stream("POST", "/v1/completions", json=body, headers=lab) as r:
                assert r.status_code == 200
                lines = [line async for line in r.aiter_lines()]
            data = list(sse_data(iter(lines)))
            assert data[-1] == "[DONE]"
            chunks: list[dict[str, Any]] = [json.loads(d) for d in data[:-1]]
            order.append("other stream done")
            # and its constrained request with another schema is compiled and answered meanwhile
            other = await client.post("/v1/chat/completions", json=schema_body(OTHER, "pirate"), headers=lab)
            order.append("other constrained answered")
            assert not held.done()
            release.set()
            return await held, chunks, other

    try:
        held, chunks, other = asyncio.run(asyncio.wait_for(scenario(), HOLD_S * 2))
    finally:
        release.set()
    assert order == [
        "compile held",
        "other stream done",
        "other constrained answered",
        "held request answered",
    ]
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]]
    assert len(finish) == 1 and finish[0] in ("stop", "length")  # the stream ran to its own end
    assert other.status_code == 200, other.text
    jsonschema.validate(json.loads(other.json()["choices"][0]["message"]["content"]), OTHER)
    assert held.status_code == 200, held.text
    choice = held.json()["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    jsonschema.validate(json.loads(choice["message"]["content"]), SLOW)
