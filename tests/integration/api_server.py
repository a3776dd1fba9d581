"""Support for the API integration tests: the real server as a subprocess on a free port, raw SSE reading,
and validation against the OpenAI contract (``tests/contracts/openai-schemas.json``, a copy of the public spec's subset)."""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai

CONTRACT = Path(__file__).parents[1] / "contracts/openai-schemas.json"
START_TIMEOUT_S = 300.0  # the first start may build the demo bundle
SERVER_COMMAND = (sys.executable, "-c", "import sys; from server.cli import main; sys.exit(main())")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    """``loraserve serve`` running on ``port``; its output goes to ``log_path``."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def http(self, key: str | None = None, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(
            base_url=self.base_url, headers=headers, timeout=kwargs.pop("timeout", 60.0), **kwargs
        )

    def openai(self, key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.base_url}/v1", api_key=key or "unused", max_retries=0, timeout=60.0
        )

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def terminate(self) -> int:
        """SIGTERM, then wait for the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def start_server(log_dir: Path, args: Sequence[str] = ()) -> ServerProcess:
    """Start the server on the embedded demo bundle (CPU) and wait until ``/ready`` answers 200."""
    port = free_port()
    log_path = log_dir / f"server-{port}.log"
    command = [
        *SERVER_COMMAND,
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
        *args,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = ServerProcess(process, port, log_path)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(f"{server.base_url}/ready", timeout=2.0).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    server.process.kill()
    raise RuntimeError(f"the server did not become ready in {START_TIMEOUT_S}s:\n{server.log_tail()}")


# ------------------------------------------------------------------------------------------- SSE


def sse_data(lines: Iterator[str]) -> Iterator[str]:
    """The ``data:`` payloads of an SSE stream, in order (comments and blank lines skipped)."""
    for line in lines:
        if line.startswith("data:"):
            yield line[len("data:") :].strip()


def read_stream(response: httpx.Response) -> tuple[list[dict[str, Any]], bool]:
    """All JSON chunks of a stream and whether it ended with ``[DONE]`` (nothing may follow it)."""
    chunks: list[dict[str, Any]] = []
    done = False
    for data in sse_data(response.iter_lines()):
        assert not done, f"data after [DONE]: {data}"
        if data == "[DONE]":
            done = True
        else:
            chunks.append(json.loads(data))
    return chunks, done


# -------------------------------------------------------------------------------------- the contract


@cache
def _contract() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(CONTRACT.read_text())
    return document


@cache
def _validator(
    name: str, *, streamed_completion: bool = False, aborted: bool = False, echo: bool = False
) -> jsonschema.Draft202012Validator:
    document = copy.deepcopy(_contract())
    schemas = document["components"]["schemas"]
    completion_choice = schemas["CreateCompletionResponse"]["properties"]["choices"]["items"]
    if aborted:
        # vLLM reports an aborted request (drain timeout) as finish_reason "abort", which OpenAI never sends.
        completion_choice["properties"]["finish_reason"]["enum"].append("abort")
    if echo:
        # echo with logprobs: nothing predicts the prompt's first token, so its logprob and top logprobs are
        # null (as OpenAI's own legacy endpoint and vLLM answer); the spec's item types omit that null.
        logprobs = completion_choice["properties"]["logprobs"]["anyOf"][0]["properties"]
        for key in ("token_logprobs", "top_logprobs"):
            logprobs[key]["items"] = {"anyOf": [logprobs[key]["items"], {"type": "null"}]}
    if streamed_completion:
        # The spec says completion chunks share the plain response's shape, whose finish_reason is a required
        # string; OpenAI itself streams ``null`` until the last chunk, and so do we. Allow exactly that.
        choice = document["components"]["schemas"]["CreateCompletionResponse"]["properties"]["choices"][
            "items"
        ]
        choice["properties"]["finish_reason"] = {
            "anyOf": [choice["properties"]["finish_reason"], {"type": "null"}]
        }
    schema = {**document, "$ref": f"#/components/schemas/{name}"}
    return jsonschema.Draft202012Validator(schema)


def validate(
    name: str, instance: Any, *, streamed_completion: bool = False, aborted: bool = False, echo: bool = False
) -> None:
    """Raise ``jsonschema.ValidationError`` unless ``instance`` is a valid ``name`` of the contract
    (``aborted`` and ``echo`` admit the two documented departures, see ``_validator``)."""
    _validator(name, streamed_completion=streamed_completion, aborted=aborted, echo=echo).validate(instance)


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    """``response`` is ``status`` with the OpenAI error envelope (and ``param`` when given)."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    validate("ErrorResponse", body)
    assert set(body["error"]) == {"message", "type", "param", "code"}
    if param is not None:
        assert body["error"]["param"] == param, body
    error: dict[str, Any] = body["error"]
    return error


def metric_value(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    """The value of one sample in Prometheus text (0 when absent)."""
    want = labels or {}
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, label_text = head.partition("{")
        if metric != name:
            continue
        found = dict(_LABEL.findall(label_text))
        if all(found.get(k) == v for k, v in want.items()):
            return float(value)
    return 0.0
