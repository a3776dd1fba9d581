"""Admin routes on the real server, started with bad folders in its --adapter-dir: refusals are clear
4xx envelopes, load/unload/list work, snapshots build, serve and retire while others keep serving."""

from __future__ import annotations

import json
import pickle
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.api_server import ServerProcess, assert_error, start_server

pytestmark = pytest.mark.slow


class Boom:
    """Unpickling this creates a file: proof that a .bin was (never) unpickled."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str, str]]:
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory, demo_bundle: Any) -> tuple[Path, Path, list[str]]:
    root = tmp_path_factory.mktemp("admin")
    adapter_dir, outside = root / "adapters", root / "outside"
    names = list(demo_bundle.adapter_names)
    for name in names:
        shutil.copytree(demo_bundle.adapters / name, adapter_dir / name)
    shutil.copytree(demo_bundle.adapters / names[-1], outside / "stray")
    spare = adapter_dir / names[-1]
    # bad folders the server must skip at start
    pickled = adapter_dir / "pickled"
    pickled.mkdir()
    shutil.copy(spare / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(pickle.dumps(Boom(str(root / "pwned"))))
    for bad, change in (("bomb", {"r": 4096}), ("not-lora", {"peft_type": "IA3"})):
        shutil.copytree(spare, adapter_dir / bad)
        config = json.loads((spare / "adapter_config.json").read_text())
        (adapter_dir / bad / "adapter_config.json").write_text(json.dumps({**config, **change}))
    shutil.copytree(spare, adapter_dir / "bad name!")
    return adapter_dir, outside, names


@pytest.fixture(scope="module")
def server(
    dirs: tuple[Path, Path, list[str]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    adapter_dir, _, _ = dirs
    args = ["--adapter-dir", str(adapter_dir), "--max-model-len", "256", "--max-gpu-adapters", "2"]
    process = start_server(tmp_path_factory.mktemp("admin-log"), [*args, "--snapshot-policy", "manual"])
    yield process
    assert process.terminate() == 0, process.log_tail()


def adapters(http: httpx.Client) -> dict[str, dict[str, Any]]:
    response = http.get("/v1/adapters")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list"
    return {a["id"]: a for a in body["data"]}


def complete(http: httpx.Client, model: str) -> httpx.Response:
    return http.post("/v1/completions", json={"model": model, "prompt": "hello there", "max_tokens": 3})


def test_server_starts_with_bad_folders(server: ServerProcess, dirs: tuple[Path, Path, list[str]]) -> None:
    adapter_dir, _, names = dirs
    with server.http() as http:
        listed = adapters(http)
        assert sorted(listed) == sorted(names)
        for entry in listed.values():
            assert entry["tier"] in ("gpu", "cpu", "disk") and len(entry["digest"]) == 64
            assert entry["snapshot"] == "none" and entry["pinned"] == 0
        assert complete(http, names[0]).status_code == 200
    assert not (adapter_dir.parent / "pwned").exists()
    log = server.log_tail(100_000)
    for bad in ("pickled", "bomb", "not-lora", "bad name!"):
        assert bad in log


REFUSALS = [
    ("../evil", "{spare}", 400, "bad_name"),
    ("a/b", "{spare}", 400, "bad_name"),
    ("0", "0" * 4000, 400, "bad_path"),  # longer than a file name may be (was a 500, found by schemathesis)
    ("deep", "a/" * 2040, 400, "bad_path"),  # longer than a path may be
    ("tilde", "~no-such-user-here/x", 404, "not_found"),
    ("escape", "../outside/stray", 400, "path_escape"),
    ("absolute", "{outside}/stray", 400, "path_escape"),
    ("pickled2", "pickled", 422, "no_safetensors"),
    ("bomb2", "bomb", 422, "rank_too_high"),
    ("iaa", "not-lora", 422, "not_lora"),
    ("ghost", "does-not-exist", 404, "not_found"),
]


@pytest.mark.parametrize(
    ("name", "path", "status", "code"), REFUSALS, ids=[r[3] + ":" + r[0] for r in REFUSALS]
)
def test_load_refusals(
    server: ServerProcess, dirs: tuple[Path, Path, list[str]], name: str, path: str, status: int, code: str
) -> None:
    adapter_dir, outside, names = dirs
    path = path.format(spare=names[-1], outside=outside)
    with server.http() as http:
        response = http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})
        error = assert_error(response, status)
        assert error["code"] == code and len(error["message"]) > 20
        assert error["param"] == ("lora_name" if code == "bad_name" else "lora_path")
        assert sorted(adapters(http)) == sorted(names)  # nothing else changed
    assert not (adapter_dir.parent / "pwned").exists()


def test_load_bad_body_is_400(server: ServerProcess) -> None:
    with server.http() as http:
        assert_error(http.post("/v1/load_lora_adapter", json={"lora_name": "x"}), 400)
        assert_error(http.post("/v1/unload_lora_adapter", json={}), 400)


def test_load_serve_unload(server: ServerProcess, dirs: tuple[Path, Path, list[str]]) -> None:
    _, _, names = dirs
    with server.http() as http:
        response = http.post("/v1/load_lora_adapter", json={"lora_name": "copy", "lora_path": names[-1]})
        assert response.status_code == 200, response.text
        assert response.json()["adapter"]["id"] == "copy"
        assert complete(http, "copy").status_code == 200
        listed = adapters(http)
        assert listed["copy"]["digest"] == listed[names[-1]]["digest"]
        assert listed["copy"]["requests"] >= 1 and listed["copy"]["tier"] in ("gpu", "cpu")
        models = {m["id"] for m in http.get("/v1/models").json()["data"]}
        assert "copy" in models
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "copy"}).status_code == 200
        assert "copy" not in adapters(http)
        assert_error(complete(http, "copy"), 404)
        assert_error(http.post("/v1/unload_lora_adapter", json={"lora_name": "copy"}), 404)


def test_snapshot_build_serve_retire(server: ServerProcess, dirs: tuple[Path, Path, list[str]]) -> None:
    _, _, names = dirs
    hot, other = names[0], names[1]
    with server.http() as http:
        assert_error(http.post("/v1/adapters/nobody/snapshot"), 404)
        response = http.post(f"/v1/adapters/{hot}/snapshot")
        assert response.status_code == 202, response.text
        deadline = time.monotonic() + 240
        while adapters(http)[hot]["snapshot"] != "active":
            assert adapters(http)[hot]["snapshot"] in ("building", "none"), adapters(http)[hot]
            assert complete(http, other).status_code == 200  # others keep serving meanwhile
            assert time.monotonic() < deadline, "the snapshot never became active"
            time.sleep(0.2)
        assert complete(http, hot).status_code == 200
        assert complete(http, other).status_code == 200
        assert http.delete(f"/v1/adapters/{hot}/snapshot").status_code == 200
        assert adapters(http)[hot]["snapshot"] == "none"
        assert complete(http, hot).status_code == 200
        assert_error(http.delete(f"/v1/adapters/{hot}/snapshot"), 404)


@pytest.mark.parametrize("stream", [False, True])
def test_adapter_that_fails_to_load_is_a_4xx_even_when_streaming(
    server: ServerProcess, dirs: tuple[Path, Path, list[str]], stream: bool
) -> None:
    adapter_dir, _, names = dirs
    fragile = adapter_dir / f"fragile-{int(stream)}"
    shutil.copytree(adapter_dir / names[0], fragile)
    # the config passes registration (rank 1), the weights hold wider tensors: the background load fails
    config = json.loads((fragile / "adapter_config.json").read_text())
    (fragile / "adapter_config.json").write_text(json.dumps({**config, "r": 1, "lora_alpha": 1}))
    with server.http() as http:
        loaded = http.post(
            "/v1/load_lora_adapter", json={"lora_name": fragile.name, "lora_path": str(fragile)}
        )
        assert loaded.status_code == 200, loaded.text
        body = {"model": fragile.name, "prompt": "hello", "max_tokens": 3, "stream": stream}
        response = http.post("/v1/completions", json=body)
        assert 400 <= response.status_code < 500, response.text
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        assert complete(http, names[1]).status_code == 200  # everyone else keeps serving
