"""Reliability on the demo bundle, in process (the real engine, store and app; HTTP over ASGI): the loop
waits instead of spinning while a load is held, nothing blocks the event loop while a new adapter is
hashed, a failing post-processing ends every request it touched, and the log line is the README's.

The only mocks are the faults themselves: a load or a hash held by an ``Event`` (a slow disk), and a
post-processing step that raises.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import shutil
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import adapter_store.registry
import adapter_store.store
from server.api.app import create_app
from server.bootstrap import build_engine
from server.cli import KeyValueFormatter
from server.config import Settings
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.engine import AsyncEngine
from server.engine.types import FinishReason, GenerationRequest, SamplingParams, TokenEvent

pytestmark = pytest.mark.slow

README = Path(__file__).parents[2] / "README.md"
HOLD_S = 60.0  # a held fault gives up after this long, so a broken build fails instead of hanging


@dataclasses.dataclass
class Parts:
    engine: AsyncEngine
    store: Any
    settings: Settings
    adapter_dir: Path
    names: tuple[str, ...]


@pytest.fixture(scope="module")
def parts(demo_bundle: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Parts]:
    adapter_dir = tmp_path_factory.mktemp("reliability") / "adapters"
    shutil.copytree(demo_bundle.adapters, adapter_dir)
    settings = Settings(
        device="cpu",
        model=str(demo_bundle.base),
        adapter_dir=adapter_dir,
        max_num_seqs=8,
        max_model_len=256,
        max_gpu_adapters=2,
    )
    engine, store = build_engine(settings)
    engine.start()
    yield Parts(engine, store, settings, adapter_dir, tuple(demo_bundle.adapter_names))
    engine.stop()
    store.close()


def request(prompt: str, adapter: str | None = None, max_tokens: int = 4) -> GenerationRequest:
    return GenerationRequest(
        request_id=uuid.uuid4().hex,
        sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0),
        prompt=prompt,
        adapter=adapter,
    )


async def final_event(engine: AsyncEngine, req: GenerationRequest) -> TokenEvent:
    stream = await engine.add_requests([req])
    async for event in stream:
        if event.finished:
            return event
    raise AssertionError("the stream ended without a final event")


def copy_adapter(parts: Parts, name: str, *, pad_bytes: int = 0) -> Path:
    """A new adapter folder (a demo adapter's files); ``pad_bytes`` of safetensors metadata make its weights
    file that much bigger without changing a tensor."""
    source = parts.adapter_dir / parts.names[0]
    target = parts.adapter_dir / name
    shutil.copytree(source, target)
    if pad_bytes:
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(source / "adapter_model.safetensors"))
        save_file(tensors, str(target / "adapter_model.safetensors"), metadata={"pad": "x" * pad_bytes})
    return target


# ------------------------------------------------------------------------------------------ busy spin


def test_the_loop_waits_while_every_request_waits_on_a_load(
    parts: Parts, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = parts.engine
    copy_adapter(parts, "held-load")
    started, release = threading.Event(), threading.Event()
    real_read = adapter_store.store.read_adapter
    at_start: list[int] = []

    def held_read(source: Any, **kwargs: Any) -> Any:
        if source.name == "held-load":
            at_start.append(engine.stats.iterations)  # the pass that asked for the load
            started.set()
            release.wait(HOLD_S)
        return real_read(source, **kwargs)

    monkeypatch.setattr(adapter_store.store, "read_adapter", held_read)
    # a wait long enough that only a wake-up (the finished load) can end it within the test
    monkeypatch.setattr(engine, "config", dataclasses.replace(engine.config, idle_wait_s=HOLD_S))

    async def scenario() -> tuple[int, int, TokenEvent]:
        task = asyncio.ensure_future(final_event(engine, request("The cat", "held-load")))
        await asyncio.to_thread(started.wait, HOLD_S)
        for _ in range(50):  # the event loop keeps running meanwhile; the engine loop must not
            await asyncio.sleep(0.01)
        before = at_start[0]
        during = engine.stats.iterations - before
        release.set()
        event = await asyncio.wait_for(task, HOLD_S / 2)  # the load's completion woke the loop
        return during, engine.stats.iterations - before, event

    try:
        during, total, event = asyncio.run(scenario())
    finally:
        release.set()
    # at most one more pass (one that had started before the request came in); a spinning loop makes
    # thousands in half a second
    assert during <= 1, f"the engine loop iterated {during} times while the only request waited on a load"
    assert event.finish_reason in (FinishReason.LENGTH, FinishReason.STOP) and event.error is None
    assert total >= 1


# ---------------------------------------------------------------------------------- post-processing


def test_a_failing_postprocess_ends_every_request_of_the_batch(
    parts: Parts, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = parts.engine
    real_add = IncrementalDetokenizer.add
    calls = {"n": 0}

    def failing_add(self: IncrementalDetokenizer, token_id: int) -> str:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected post-processing fault")
        return real_add(self, token_id)

    monkeypatch.setattr(IncrementalDetokenizer, "add", failing_add)

    async def scenario() -> list[TokenEvent]:
        requests = [request(p, max_tokens=24) for p in ("The cat", "The dog says", "Hello", "One two")]
        return list(await asyncio.gather(*(final_event(engine, r) for r in requests)))

    events = asyncio.run(asyncio.wait_for(scenario(), HOLD_S))
    assert len(events) == 4  # every client got its final event (before the fix, some waited forever)
    failed = [e for e in events if e.finish_reason is FinishReason.ERROR]
    assert failed and all(e.error is not None and e.error.status == 500 for e in failed)
    monkeypatch.setattr(IncrementalDetokenizer, "add", real_add)
    after = asyncio.run(asyncio.wait_for(final_event(engine, request("The cat")), HOLD_S))
    assert after.finish_reason is FinishReason.LENGTH and after.error is None  # the engine still serves


def test_a_failing_postprocess_is_a_500_envelope_and_an_error_event_over_http(
    parts: Parts, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_add(self: IncrementalDetokenizer, token_id: int) -> str:
        raise RuntimeError("injected post-processing fault")

    monkeypatch.setattr(IncrementalDetokenizer, "add", failing_add)
    app = create_app(parts.settings, parts.engine, store=parts.store)
    body = {"model": parts.engine.model_id, "prompt": "The cat", "max_tokens": 4}

    async def scenario() -> tuple[httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            plain = await client.post("/v1/completions", json=body)
            streamed = await client.post("/v1/completions", json={**body, "stream": True})
            return plain, streamed

    plain, streamed = asyncio.run(asyncio.wait_for(scenario(), HOLD_S))
    assert plain.status_code == 500
    assert plain.json()["error"]["code"] == "step_failed"
    # the first token failed: a streamed request answers with the status too (headers were not sent)
    assert streamed.status_code == 500 and streamed.json()["error"]["code"] == "step_failed"


# --------------------------------------------------------------------------------- event-loop blocking


def test_health_answers_while_a_new_adapter_folder_is_hashed(
    parts: Parts, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy_adapter(parts, "dropped-in", pad_bytes=50 << 20)  # a 50 MB weights file appears after start
    assert (parts.adapter_dir / "dropped-in/adapter_model.safetensors").stat().st_size > 50 << 20
    hashing, release = threading.Event(), threading.Event()
    real_sha = adapter_store.registry.sha256_file

    def held_sha(path: Path) -> str:
        if "dropped-in" in str(path):
            hashing.set()
            release.wait(HOLD_S)
        return real_sha(path)

    monkeypatch.setattr(adapter_store.registry, "sha256_file", held_sha)
    app = create_app(parts.settings, parts.engine, store=parts.store)
    order: list[str] = []

    async def scenario() -> tuple[httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:

            async def first_request() -> httpx.Response:
                body = {"model": "dropped-in", "prompt": "The cat", "max_tokens": 2}
                response = await client.post("/v1/completions", json=body)
                order.append("discovery done")
                return response

            completion = asyncio.ensure_future(first_request())
            await asyncio.to_thread(hashing.wait, HOLD_S)
            health = await client.get("/health")
            order.append("health")
            release.set()
            return health, await completion

    try:
        health, completion = asyncio.run(asyncio.wait_for(scenario(), HOLD_S * 2))
    finally:
        release.set()
    assert order == ["health", "discovery done"]
    assert health.status_code == 200
    assert completion.status_code == 200, completion.text


# ------------------------------------------------------------------------------------------- logging


def _readme_log_line() -> str:
    text = README.read_text()
    section = text[text.index("`request finished` line") :]
    return re.search(r"```\n(.+?)\n```", section, re.S).group(1).strip()  # type: ignore[union-attr]


def _shape(line: str) -> tuple[str, list[str]]:
    """(logger and message, field names in order) of a key=value log line."""
    head = re.match(r"\S+ \S+ INFO (\S+): request finished", line)
    assert head is not None, line
    return head.group(1), re.findall(r" (\w+)=", line)


@pytest.mark.parametrize("stream", [False, True])
def test_every_request_logs_the_readme_line(
    parts: Parts, caplog: pytest.LogCaptureFixture, stream: bool
) -> None:
    app = create_app(parts.settings, parts.engine, store=parts.store)
    body = {"model": parts.names[0], "prompt": "The cat", "max_tokens": 3, "stream": stream}

    async def scenario() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/v1/completions", json=body)

    with caplog.at_level(logging.INFO, logger="loraserve.requests"):
        response = asyncio.run(asyncio.wait_for(scenario(), HOLD_S))
    assert response.status_code == 200
    request_id = (
        response.json()["id"]
        if not stream
        else json.loads(response.text.split("data:", 1)[1].split("\n", 1)[0])["id"]
    )
    records = [r for r in caplog.records if r.getMessage() == "request finished"]
    mine = [r for r in records if getattr(r, "request_id", None) == request_id]
    assert len(mine) == 1
    printed = KeyValueFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s").format(mine[0])
    assert _shape(printed) == _shape(_readme_log_line())
