"""Tenancy on the real server with a keys file: no key, wrong key, another tenant's adapter, base not
allowed, admin route with a tenant key, keys stored as sha256 digests."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.integration.api_server import ServerProcess, assert_error, metric_value, start_server, validate

pytestmark = pytest.mark.slow

OPS, ACME, LAB, SCRAPE = "sk-ops-0123456789", "sk-acme-123", "sk-lab-456", "sk-prometheus-789"
KEYS = {
    "keys": [
        {"key": "sha256:" + hashlib.sha256(OPS.encode()).hexdigest(), "tenant": "ops", "admin": True},
        {"key": ACME, "tenant": "acme", "adapters": ["pirate"], "allow_base": False},
        {"key": "sha256:" + hashlib.sha256(LAB.encode()).hexdigest(), "tenant": "lab", "adapters": "*"},
        {"key": SCRAPE, "tenant": "prometheus", "metrics": True},
    ]
}
ADMIN_ROUTE = "/v1/adapters"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    directory = tmp_path_factory.mktemp("tenancy")
    keys = directory / "keys.json"
    keys.write_text(json.dumps(KEYS))
    process = start_server(directory, ["--api-keys", str(keys), "--max-model-len", "256"])
    yield process
    assert process.terminate() == 0, process.log_tail()


@pytest.fixture(scope="module")
def base_id(server: ServerProcess) -> str:
    with server.http(LAB) as http:
        return str(next(m["id"] for m in http.get("/v1/models").json()["data"] if m.get("parent") is None))


def complete(server: ServerProcess, key: str | None, model: str) -> httpx.Response:
    with server.http(key) as http:
        return http.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2})


@pytest.mark.parametrize("key", [None, "sk-wrong", "sha256:" + hashlib.sha256(LAB.encode()).hexdigest()])
@pytest.mark.parametrize(
    ("method", "path"), [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")]
)
def test_no_or_wrong_key_is_401(server: ServerProcess, key: str | None, method: str, path: str) -> None:
    with server.http(key) as http:
        response = http.request(method, path, json={"model": "pirate", "prompt": "hi"})
    error = assert_error(response, 401)
    assert error["type"] == "authentication_error"


def test_models_are_filtered_per_tenant(server: ServerProcess, base_id: str) -> None:
    def listed(key: str) -> set[str]:
        with server.http(key) as http:
            body = http.get("/v1/models").json()
        validate("ListModelsResponse", body)
        return {m["id"] for m in body["data"]}

    assert listed(ACME) == {"pirate"}
    assert listed(LAB) == {base_id, "shout", "digits", "pirate"}
    assert listed(OPS) == {base_id}  # admin, no adapters listed, base allowed by default


def test_allowed_models_are_served(server: ServerProcess, base_id: str) -> None:
    assert complete(server, ACME, "pirate").status_code == 200
    assert complete(server, LAB, "shout").status_code == 200
    assert complete(server, LAB, base_id).status_code == 200


def test_forbidden_models_look_unknown(server: ServerProcess, base_id: str) -> None:
    unknown = assert_error(complete(server, ACME, "no-such-adapter"), 404, "model")
    other = assert_error(complete(server, ACME, "shout"), 404, "model")  # exists, not acme's
    base = assert_error(complete(server, ACME, base_id), 404, "model")  # allow_base: false
    assert unknown["code"] == other["code"] == base["code"] == "model_not_found"
    assert other["message"] == unknown["message"].replace("no-such-adapter", "shout")


def test_model_route_tokenize_and_detokenize_follow_the_tenant(server: ServerProcess, base_id: str) -> None:
    with server.http(ACME) as acme:
        card = acme.get("/v1/models/pirate")
        assert card.status_code == 200 and card.json()["parent"] == base_id
        validate("Model", card.json())
        # the base (allow_base false), another adapter and an unknown one answer alike
        unknown = assert_error(acme.get("/v1/models/no-such-model"), 404, "model")
        for hidden in (base_id, "shout"):
            assert assert_error(acme.get(f"/v1/models/{hidden}"), 404, "model")["code"] == unknown["code"]
            body = {"model": hidden, "prompt": "hi"}
            assert_error(acme.post("/tokenize", json=body), 404, "model")
            assert_error(acme.post("/detokenize", json={"model": hidden, "tokens": [7]}), 404, "model")
        ids = acme.post("/tokenize", json={"model": "pirate", "prompt": "Hello world"}).json()
        assert ids["count"] == len(ids["tokens"]) and ids["max_model_len"] == 256
        text = acme.post("/detokenize", json={"model": "pirate", "tokens": ids["tokens"]}).json()
        assert text == {"prompt": "Hello world"}
    with server.http(None) as anonymous:
        assert_error(anonymous.post("/tokenize", json={"model": "pirate", "prompt": "x"}), 401)
        assert_error(anonymous.get("/v1/models/pirate"), 401)


def test_admin_route(server: ServerProcess) -> None:
    with server.http() as http:
        assert_error(http.get(ADMIN_ROUTE), 401)
    with server.http("sk-wrong") as http:
        assert_error(http.get(ADMIN_ROUTE), 401)
    with server.http(LAB) as http:
        error = assert_error(http.get(ADMIN_ROUTE), 403)
        assert error["type"] == "permission_error"
    with server.http(OPS) as http:
        assert http.get(ADMIN_ROUTE).status_code == 200


def test_openai_client_with_keys(server: ServerProcess) -> None:
    with pytest.raises(openai.AuthenticationError):
        server.openai("sk-wrong").models.list()
    with pytest.raises(openai.NotFoundError):
        server.openai(ACME).completions.create(model="shout", prompt="hi", max_tokens=2)
    chat = server.openai(ACME).chat.completions.create(
        model="pirate", messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert chat.model == "pirate"


def test_rejections_are_counted(server: ServerProcess) -> None:
    with server.http(SCRAPE) as http:
        text = http.get("/metrics").text
    assert metric_value(text, "loraserve_requests_rejected_total", {"reason": "unauthorized"}) > 0
    assert metric_value(text, "loraserve_requests_rejected_total", {"reason": "not_found"}) > 0
    assert metric_value(text, "loraserve_requests_rejected_total", {"reason": "forbidden"}) > 0


@pytest.mark.parametrize(
    ("key", "status"), [(None, 401), ("sk-wrong", 401), (ACME, 403), (LAB, 403), (SCRAPE, 200), (OPS, 200)]
)
def test_metrics_need_a_scrape_or_admin_key(server: ServerProcess, key: str | None, status: int) -> None:
    assert complete(server, ACME, "pirate").status_code == 200  # so that /metrics names an adapter
    with server.http(key) as http:
        response = http.get("/metrics")
    if status == 200:
        assert 'model_name="pirate"' in response.text
    else:
        error = assert_error(response, status)
        assert "pirate" not in response.text
        assert error["type"] == ("authentication_error" if status == 401 else "permission_error")


@pytest.mark.parametrize("path", ["/health", "/ready", "/openapi.json", "/docs"])
def test_open_routes_name_no_adapter(server: ServerProcess, path: str) -> None:
    assert complete(server, ACME, "pirate").status_code == 200
    with server.http() as http:
        response = http.get(path)
    assert response.status_code == 200
    for name in ("pirate", "shout", "digits"):
        assert name not in response.text, (path, name)


def test_bad_keys_file_fails_at_start(tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text('{"keys": [{"key": "sha256:nothex", "tenant": "x"}]}')
    with pytest.raises(RuntimeError, match="64 hex digits"):
        start_server(tmp_path, ["--api-keys", str(keys)])
