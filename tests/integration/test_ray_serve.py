"""``loraserve serve-ray`` end to end: a local Ray cluster on loopback, two engine replicas of the demo
bundle behind the ingress, spoken to with the official OpenAI client and httpx; tenancy at the ingress,
admin fan-out, merged metrics, disconnect -> abort on the replica, and a clean SIGTERM shutdown."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.api_server import (
    SERVER_COMMAND,
    ServerProcess,
    assert_error,
    free_port,
    metric_value,
    read_stream,
    validate,
)

pytest.importorskip("ray.serve")
pytestmark = pytest.mark.slow

ADMIN, ACME, LAB = "sk-ray-admin", "sk-ray-acme", "sk-ray-lab"
REPLICAS = {"replica-0", "replica-1"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, demo_bundle: object) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("ray")
    keys = root / "keys.json"
    keys.write_text(
        json.dumps(
            {
                "keys": [
                    {"key": ADMIN, "tenant": "ops", "admin": True},
                    {"key": ACME, "tenant": "acme", "adapters": ["shout"], "allow_base": False},
                    {"key": LAB, "tenant": "lab", "adapters": "*"},
                ]
            }
        )
    )
    port = free_port()
    log_path = root / "serve-ray.log"
    command = [
        *SERVER_COMMAND,
        "serve-ray",
        "--replicas", "2", "--num-cpus", "0.5", "--device", "cpu",
        "--host", "127.0.0.1", "--port", str(port), "--api-keys", str(keys),
        "--max-num-seqs", "4", "--max-model-len", "512", "--shutdown-timeout", "10",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    running = ServerProcess(process, port, log_path)
    deadline = time.monotonic() + 300
    while True:
        assert process.poll() is None, running.log_tail()
        try:
            # /ready answers once one replica is; wait for both (their metrics are in the ingress's)
            metrics = httpx.get(f"{running.base_url}/metrics", timeout=5.0).text
            if all(f'replica="{r}"' in metrics for r in REPLICAS):
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, running.log_tail()
        time.sleep(0.5)
    yield running
    running.terminate()


def test_openai_client_base_and_adapter_plain_and_streamed(server: ServerProcess) -> None:
    client = server.openai(LAB)
    base = next(m.id for m in client.models.list().data if m.parent is None)  # type: ignore[attr-defined]
    for model in (base, "shout"):
        completion = client.completions.create(model=model, prompt="Hello", max_tokens=4)
        assert completion.model == model and completion.usage is not None
        chat = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert chat.choices[0].finish_reason in ("length", "stop")
        chunks = list(
            client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True
            )
        )
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    # the raw bodies, against the contract
    with server.http(LAB) as http:
        plain = http.post("/v1/completions", json={"model": "shout", "prompt": "Hello", "max_tokens": 4})
        validate("CreateCompletionResponse", plain.json())
        chat = {
            "model": "shout",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
            "stream": True,
        }
        with http.stream("POST", "/v1/chat/completions", json=chat) as streamed:
            raw_chunks, done = read_stream(streamed)
    assert done and raw_chunks
    for chunk in raw_chunks:
        validate("CreateChatCompletionStreamResponse", chunk)


def test_every_answer_names_its_replica_and_an_adapter_stays_where_it_is_resident(
    server: ServerProcess,
) -> None:
    body = {"model": "pirate", "prompt": "Ahoy", "max_tokens": 3}
    with server.http(LAB) as http:
        first = http.post("/v1/completions", json=body)
        second = http.post("/v1/completions", json=body)
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as streamed:
            chunks, done = read_stream(streamed)
            stream_replica = streamed.headers["x-loraserve-replica"]
        refused = http.post("/v1/completions", json={**body, "model": "no-such-adapter"})
    assert first.status_code == second.status_code == 200
    assert first.headers["x-loraserve-replica"] in REPLICAS
    # the second request goes where the first left the adapter, and finds it resident there
    assert second.headers["x-loraserve-replica"] == first.headers["x-loraserve-replica"] == stream_replica
    assert second.headers["x-loraserve-adapter-tier"] in ("gpu", "cpu")
    assert done and chunks
    assert_error(refused, 404, "model")
    assert refused.headers["x-loraserve-replica"] in REPLICAS


def test_tenancy_holds_at_the_ingress(server: ServerProcess) -> None:
    body = {"model": "digits", "prompt": "1 2 3", "max_tokens": 2}
    with server.http() as anonymous:
        missing = anonymous.post("/v1/completions", json=body)
    with server.http("sk-wrong") as wrong:
        bad = wrong.get("/v1/models")
    with server.http(ACME) as acme:
        other_tenants = acme.post("/v1/completions", json=body)
        base_refused = acme.get("/v1/models").json()
        admin_refused = acme.get("/v1/adapters")
        own = acme.post("/v1/completions", json={**body, "model": "shout"})
    assert_error(missing, 401)
    assert missing.headers["x-loraserve-replica"] == "ingress"
    assert_error(bad, 401)
    assert_error(other_tenants, 404, "model")
    assert [m["id"] for m in base_refused["data"]] == ["shout"]
    assert_error(admin_refused, 403)
    assert own.status_code == 200


def test_admin_routes_fan_out_to_every_replica(server: ServerProcess, demo_bundle: object) -> None:
    path = str(Path(demo_bundle.adapters) / "digits")  # type: ignore[attr-defined]
    with server.http(ADMIN) as admin, server.http(LAB) as lab:
        listed = admin.get("/v1/adapters").json()["data"]
        assert {(e["id"], e["replica"]) for e in listed} >= {
            (n, r) for n in ("digits", "shout") for r in REPLICAS
        }
        unloaded = admin.post("/v1/unload_lora_adapter", json={"lora_name": "digits"})
        assert unloaded.status_code == 200
        assert set(unloaded.headers["x-loraserve-replica"].split(",")) == REPLICAS
        # gone from every replica: whichever one the request lands on answers 404
        for _ in range(2):
            assert_error(
                lab.post("/v1/completions", json={"model": "digits", "prompt": "1", "max_tokens": 1}), 404
            )
        assert_error(admin.post("/v1/unload_lora_adapter", json={"lora_name": "digits"}), 404)
        loaded = admin.post("/v1/load_lora_adapter", json={"lora_name": "digits", "lora_path": path})
        assert loaded.status_code == 200, loaded.text
        assert set(loaded.headers["x-loraserve-replica"].split(",")) == REPLICAS
        assert_error(
            admin.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/nope"}),
            404,
            "lora_path",
        )
        again = lab.post("/v1/completions", json={"model": "digits", "prompt": "1", "max_tokens": 1})
        assert again.status_code == 200


def test_metrics_hold_the_ingress_and_every_replica(server: ServerProcess) -> None:
    text = httpx.get(f"{server.base_url}/metrics").text
    type_lines = [line for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(type_lines) == len(set(type_lines))
    running = [line for line in text.splitlines() if line.startswith("vllm:num_requests_running{")]
    for replica in REPLICAS:
        assert any('model_name="loraserve-demo"' in s and f'replica="{replica}"' in s for s in running), (
            running
        )
    assert metric_value(text, "loraserve_ingress_routed_total") > 0


def _aborted(server: ServerProcess) -> float:
    text = httpx.get(f"{server.base_url}/metrics").text
    return sum(
        metric_value(text, "loraserve_requests_aborted_total", {"reason": "disconnect", "replica": r})
        for r in REPLICAS
    )


def test_a_client_that_leaves_is_aborted_on_the_replica(server: ServerProcess) -> None:
    before = _aborted(server)
    body = {
        "model": "shout",
        "prompt": "Tell a long story",
        "max_tokens": 400,
        "stream": True,
        "ignore_eos": True,
    }
    with server.http(LAB) as http, http.stream("POST", "/v1/completions", json=body) as streamed:
        for line in streamed.iter_lines():
            if line.startswith("data:"):
                break  # one token, then hang up
    deadline = time.monotonic() + 60
    while _aborted(server) <= before:
        assert time.monotonic() < deadline, "the replica never aborted the abandoned stream"
        time.sleep(0.2)


def test_sigterm_drains_and_exits_cleanly(server: ServerProcess) -> None:
    assert server.terminate() == 0, server.log_tail()
    assert "draining 2 replicas" in server.log_tail(20000)
