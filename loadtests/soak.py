"""Soak test of the CPU demo: long, mixed, hostile traffic; checks that nothing leaks, hangs or 500s.

Starts ``loraserve serve`` on the demo bundle with 20 adapters (copies of the demo adapters with perturbed
weights, in a temporary ``--adapter-dir``) and ``--max-gpu-adapters 2``, then for ``--duration`` seconds:

- open-loop Poisson arrivals of streamed completions, adapters drawn Zipf(``--skew``) over the 20;
- ``--disconnect-fraction`` of the clients hang up mid-stream;
- ``--malformed-fraction`` of the arrivals are malformed (bad JSON, out-of-range values, unknown models,
  an over-long adapter path, ...), each of which must get a 4xx;
- every minute one adapter gets new weights in place and is re-registered (``POST /v1/load_lora_adapter``),
  and another goes through an admin unload/load cycle;
- greedy probe requests (after each reload, and every ``--probe-every`` seconds) whose text is compared,
  after the run, with plain PEFT ``generate`` on a freshly loaded base for that adapter version;
- the server's RSS is sampled every few seconds.

Checks: no 5xx, no hung request (every request ends with ``[DONE]``, an error status or the client's own
hang-up, and the server reports nothing running or waiting afterwards), RSS growth after warm-up under
``--max-rss-growth``, every probe equal to its reference. Writes JSON and a plot; exit status 1 if a
check fails. Not part of CI (it runs for 20 minutes by default)::

    python loadtests/soak.py --out loadtests/results/soak-cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

NUM_ADAPTERS = 20
PROBE_PROMPTS = ["The cat", "Hello there, my friend", "The owl lives in the barn. The dog"]
PROBE_TOKENS = 16
SERVER_COMMAND = (sys.executable, "-c", "import sys; from server.cli import main; sys.exit(main())")
WORDS = [
    "the",
    "adapter",
    "serves",
    "a",
    "tenant",
    "while",
    "the",
    "base",
    "model",
    "stays",
    "resident",
    "on",
    "one",
    "small",
    "machine",
]


@dataclass(slots=True)
class Outcome:
    """One request the soak sent."""

    kind: str  # "stream", "malformed:<case>", "probe", "admin:<op>"
    start: float  # seconds since the run started
    # HTTP status, "done", "disconnect", "no_done", "timeout", "stream_error:<error type>", a transport error
    status: str = ""
    model: str = ""
    e2e: float | None = None
    detail: str = ""


@dataclass(slots=True)
class Probe:
    """A greedy request and the adapter version it ran on; ``reference`` is filled after the run."""

    adapter: str | None
    digest: str | None
    prompt: str
    text: str
    reference: str | None = None


@dataclass
class SoakState:
    t0: float
    outcomes: list[Outcome] = field(default_factory=list)
    probes: list[Probe] = field(default_factory=list)
    rss: list[tuple[float, int]] = field(default_factory=list)  # (s, bytes)
    versions: dict[str, Path] = field(default_factory=dict)  # digest -> frozen copy of that version
    digests: dict[str, str] = field(default_factory=dict)  # adapter -> current digest
    # (adapter, unload sent, load answered): requests for it that overlap may get a 404
    unload_windows: list[tuple[str, float, float]] = field(default_factory=list)
    capped_arrivals: int = 0  # arrivals that waited for the client's in-flight cap

    def now(self) -> float:
        return time.monotonic() - self.t0


# ----------------------------------------------------------------------------------------- adapters


def perturbed_copy(source: Path, target: Path, seed: int, scale: float = 0.5) -> None:
    """``source`` adapter with its LoRA B matrices perturbed by seeded noise, written to ``target``
    (the weights file is replaced atomically, so a concurrent reader sees one version or the other)."""
    import torch
    from safetensors.torch import load_file, save_file

    target.mkdir(parents=True, exist_ok=True)
    shutil.copy(source / "adapter_config.json", target / "adapter_config.json")
    tensors = load_file(str(source / "adapter_model.safetensors"))
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in tensors.items():
        if "lora_B" in name:
            noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
            std = float(tensor.float().std()) or 1e-3
            tensors[name] = (tensor.float() + scale * std * noise).to(tensor.dtype).contiguous()
    tmp = target / ".adapter_model.safetensors.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, target / "adapter_model.safetensors")


def freeze_version(state: SoakState, folder: Path, digest: str, store: Path) -> None:
    if digest not in state.versions:
        copy = store / digest[:16]
        shutil.copytree(folder, copy, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".*"))
        state.versions[digest] = copy


# ------------------------------------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(
    args: argparse.Namespace, adapter_dir: Path, log_path: Path
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    command = [
        *SERVER_COMMAND,
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
        "--adapter-dir",
        str(adapter_dir),
        "--max-gpu-adapters",
        "2",
        "--max-model-len",
        "256",
        "--quantization",
        args.quantization,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}; see {log_path}")
        try:
            if httpx.get(f"{url}/ready", timeout=2.0).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    process.kill()
    raise SystemExit(f"the server did not become ready; see {log_path}")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# ------------------------------------------------------------------------------------------ traffic


def _prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 40)))


async def stream_one(
    client: httpx.AsyncClient, state: SoakState, model: str, rng: random.Random, disconnect: bool
) -> None:
    outcome = Outcome("stream", state.now(), model=model)
    state.outcomes.append(outcome)
    body = {
        "model": model,
        "prompt": _prompt(rng),
        "max_tokens": rng.randint(8, 32),
        "temperature": rng.choice([0.0, 0.7, 1.0]),
        "stream": True,
    }
    hang_up_after = rng.randint(1, 4) if disconnect else None
    chunks = 0
    error_type: str | None = None  # an error chunk mid-stream: the stream's outcome, whatever follows
    sent = time.monotonic()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                outcome.status = str(response.status_code)
                outcome.detail = (await response.aread()).decode(errors="replace")[:200]
                return
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    outcome.status = "done" if error_type is None else f"stream_error:{error_type}"
                    return
                chunk = json.loads(data)
                if "error" in chunk and error_type is None:
                    error_type = str(chunk["error"].get("type"))
                    outcome.detail = str(chunk["error"])[:200]
                chunks += 1
                if hang_up_after is not None and chunks >= hang_up_after and error_type is None:
                    outcome.status = "disconnect"
                    return
            outcome.status = "no_done"
    except httpx.TimeoutException:
        outcome.status = "timeout"
    except httpx.TransportError as e:
        outcome.status = type(e).__name__
        outcome.detail = str(e)[:200]
    finally:
        outcome.e2e = time.monotonic() - sent


def malformed_cases(base_model: str) -> list[tuple[str, str, str, bytes | None, dict[str, Any] | None]]:
    """(case, method, path, raw body, json body): each must be answered with a 4xx."""
    return [
        ("bad_json", "POST", "/v1/completions", b'{"model": "x", "prompt": ', None),
        (
            "nan_literal",
            "POST",
            "/v1/completions",
            b'{"model": "m", "prompt": "a", "temperature": NaN}',
            None,
        ),
        (
            "negative_max_tokens",
            "POST",
            "/v1/completions",
            None,
            {"model": base_model, "prompt": "a", "max_tokens": -1},
        ),
        ("unknown_model", "POST", "/v1/completions", None, {"model": "no-such-adapter", "prompt": "a"}),
        ("token_out_of_range", "POST", "/v1/completions", None, {"model": base_model, "prompt": [10**9]}),
        ("wrong_type", "POST", "/v1/completions", None, {"model": base_model, "prompt": {"a": 1}}),
        ("chat_no_messages", "POST", "/v1/chat/completions", None, {"model": base_model}),
        (
            "too_long",
            "POST",
            "/v1/completions",
            None,
            {"model": base_model, "prompt": "a", "max_tokens": 10**6},
        ),
        (
            "long_lora_path",
            "POST",
            "/v1/load_lora_adapter",
            None,
            {"lora_name": "0", "lora_path": "0" * 4000},
        ),
        ("bad_lora_name", "POST", "/v1/load_lora_adapter", None, {"lora_name": "../x", "lora_path": "x"}),
        ("unload_unknown", "POST", "/v1/unload_lora_adapter", None, {"lora_name": "never-loaded"}),
        ("wrong_method", "PUT", "/v1/completions", None, {}),
    ]


async def malformed_one(client: httpx.AsyncClient, state: SoakState, rng: random.Random, base: str) -> None:
    case, method, path, raw, body = rng.choice(malformed_cases(base))
    outcome = Outcome(f"malformed:{case}", state.now())
    state.outcomes.append(outcome)
    sent = time.monotonic()
    try:
        if raw is not None:
            response = await client.request(
                method, path, content=raw, headers={"Content-Type": "application/json"}
            )
        else:
            response = await client.request(method, path, json=body)
        outcome.status = str(response.status_code)
        if not 400 <= response.status_code < 500:
            outcome.detail = response.text[:200]
    except httpx.TransportError as e:
        outcome.status = type(e).__name__
    finally:
        outcome.e2e = time.monotonic() - sent


async def probe(
    client: httpx.AsyncClient, state: SoakState, adapter: str | None, base: str, prompt: str
) -> None:
    outcome = Outcome("probe", state.now(), model=adapter or base)
    state.outcomes.append(outcome)
    body = {"model": adapter or base, "prompt": prompt, "max_tokens": PROBE_TOKENS, "temperature": 0.0}
    sent = time.monotonic()
    digest = None if adapter is None else state.digests[adapter]
    try:
        response = await client.post("/v1/completions", json=body)
        outcome.status = str(response.status_code)
        if response.status_code == 200:
            text = response.json()["choices"][0]["text"]
            state.probes.append(Probe(adapter, digest, prompt, text))
        else:
            outcome.detail = response.text[:200]
    except httpx.TransportError as e:
        outcome.status = type(e).__name__
    finally:
        outcome.e2e = time.monotonic() - sent


async def admin(client: httpx.AsyncClient, state: SoakState, op: str, body: dict[str, str]) -> dict[str, Any]:
    outcome = Outcome(f"admin:{op}", state.now(), model=body["lora_name"])
    state.outcomes.append(outcome)
    sent = time.monotonic()
    try:
        response = await client.post(f"/v1/{op}_lora_adapter", json=body)
        outcome.status = str(response.status_code)
        if response.status_code != 200:
            outcome.detail = response.text[:200]
            return {}
        result: dict[str, Any] = response.json()
        return result
    except httpx.TransportError as e:
        outcome.status = type(e).__name__
        return {}
    finally:
        outcome.e2e = time.monotonic() - sent


async def control(
    client: httpx.AsyncClient,
    state: SoakState,
    args: argparse.Namespace,
    names: list[str],
    sources: dict[str, Path],
    adapter_dir: Path,
    frozen: Path,
    base: str,
    stop_at: float,
) -> None:
    """The one coroutine that changes adapters and sends probes, so each probe knows its version."""
    rng = random.Random(args.seed + 1)
    next_reload = 60.0
    next_probe = 5.0
    version = 0
    while state.now() < stop_at:
        await asyncio.sleep(1.0)
        if state.now() >= next_reload:
            next_reload += 60.0
            version += 1
            # new weights for a popular adapter (the head of the Zipf distribution gets the traffic)
            name = names[min(int(rng.paretovariate(1.0)) - 1, len(names) - 1)]
            folder = adapter_dir / name
            await asyncio.to_thread(perturbed_copy, sources[name], folder, 1000 + version)
            answer = await admin(client, state, "load", {"lora_name": name, "lora_path": str(folder)})
            if answer:
                state.digests[name] = answer["adapter"]["digest"]
                await asyncio.to_thread(freeze_version, state, folder, state.digests[name], frozen)
                await probe(client, state, name, base, rng.choice(PROBE_PROMPTS))
            # an unload/load cycle of another adapter (requests for it meanwhile get 404)
            other = rng.choice([n for n in names if n != name])
            unload_sent = state.now()
            await admin(client, state, "unload", {"lora_name": other})
            await asyncio.sleep(rng.uniform(0.5, 3.0))
            answer = await admin(
                client, state, "load", {"lora_name": other, "lora_path": str(adapter_dir / other)}
            )
            state.unload_windows.append((other, unload_sent, state.now()))
            if answer:
                state.digests[other] = answer["adapter"]["digest"]
        if state.now() >= next_probe:
            next_probe += args.probe_every
            adapter = rng.choice([None, *names])
            await probe(client, state, adapter, base, rng.choice(PROBE_PROMPTS))


async def sample_rss(state: SoakState, pid: int, stop_at: float) -> None:
    while state.now() < stop_at:
        state.rss.append((state.now(), rss_bytes(pid)))
        await asyncio.sleep(5.0)


async def run(
    args: argparse.Namespace, state: SoakState, url: str, pid: int, ctx: dict[str, Any]
) -> dict[str, int]:
    names: list[str] = ctx["names"]
    base: str = ctx["base"]
    rng = random.Random(args.seed)
    weights = [1.0 / (rank + 1) ** args.skew for rank in range(len(names))]
    limits = httpx.Limits(max_connections=args.max_in_flight + 8)
    async with httpx.AsyncClient(base_url=url, timeout=args.request_timeout, limits=limits) as client:
        models = (await client.get("/v1/models")).json()["data"]
        for m in models:
            if m.get("parent"):
                state.digests.setdefault(m["id"], "")
        listed = (await client.get("/v1/adapters")).json()["data"]
        for entry in listed:
            state.digests[entry["id"]] = entry["digest"]
            freeze_version(state, ctx["adapter_dir"] / entry["id"], entry["digest"], ctx["frozen"])
        stop_at = args.duration
        tasks: set[asyncio.Task[None]] = set()
        helpers = [
            asyncio.create_task(
                control(
                    client,
                    state,
                    args,
                    names,
                    ctx["sources"],
                    ctx["adapter_dir"],
                    ctx["frozen"],
                    base,
                    stop_at,
                )
            ),
            asyncio.create_task(sample_rss(state, pid, stop_at)),
        ]
        in_flight = asyncio.Semaphore(args.max_in_flight)

        async def arrival() -> None:
            if in_flight.locked():
                state.capped_arrivals += 1
            async with in_flight:
                if rng.random() < args.malformed_fraction:
                    await malformed_one(client, state, rng, base)
                else:
                    model = rng.choices(names, weights)[0]
                    await stream_one(client, state, model, rng, rng.random() < args.disconnect_fraction)

        next_arrival = 0.0
        while True:
            next_arrival += rng.expovariate(args.rate)
            await asyncio.sleep(max(0.0, next_arrival - state.now()))
            if state.now() >= stop_at:
                break
            task = asyncio.create_task(arrival())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*helpers)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=args.request_timeout + 30)
            for task in pending:
                task.cancel()
        # the server's own view: nothing may be left running or waiting
        leftover = {"running": -1, "waiting": -1}
        for _ in range(60):
            text = (await client.get("/metrics")).text
            leftover = {
                "running": _gauge(text, "vllm:num_requests_running"),
                "waiting": _gauge(text, "vllm:num_requests_waiting"),
            }
            if leftover == {"running": 0, "waiting": 0}:
                break
            await asyncio.sleep(1.0)
        state.rss.append((state.now(), rss_bytes(pid)))
    return leftover


def _gauge(text: str, name: str) -> int:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


# --------------------------------------------------------------------------------------- references


def compute_references(state: SoakState, base_path: Path, quantization: str) -> None:
    """Plain PEFT ``generate`` on a freshly loaded base per adapter version (wrapped before any forward)."""
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from server.runtime.loader import ModelSpec, load_model

    tokenizer = AutoTokenizer.from_pretrained(base_path)
    by_version: dict[str | None, list[Probe]] = {}
    for p in state.probes:
        by_version.setdefault(p.digest, []).append(p)
    for digest, probes in by_version.items():
        model: Any = load_model(ModelSpec(source=str(base_path), quantization=quantization))  # type: ignore[arg-type]
        if digest is not None:
            model = PeftModel.from_pretrained(model, str(state.versions[digest]))
        model.eval()
        for p in probes:
            ids = torch.tensor([tokenizer.encode(p.prompt, add_special_tokens=True)])
            with torch.inference_mode():
                out = model.generate(ids, max_new_tokens=PROBE_TOKENS, do_sample=False)
            p.reference = str(tokenizer.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True))
        del model


# ------------------------------------------------------------------------------------------- report


def summarize(state: SoakState, args: argparse.Namespace, leftover: dict[str, int]) -> dict[str, Any]:
    statuses = Counter(o.status for o in state.outcomes)
    # a 5xx, or a stream that reported a server error mid-way (the streaming form of a 5xx)
    server_errors = [
        asdict(o)
        for o in state.outcomes
        if o.status.startswith("5") or o.status == "stream_error:server_error"
    ]
    hung = [asdict(o) for o in state.outcomes if o.status in ("", "no_done", "timeout")]
    unexpected = [
        asdict(o)
        for o in state.outcomes
        if o.kind.startswith("malformed:") and not (o.status.isdigit() and 400 <= int(o.status) < 500)
    ]
    warm = [b for t, b in state.rss if args.warmup <= t < args.warmup + 60]
    tail = [b for t, b in state.rss if t >= max(args.warmup + 60, state.rss[-1][0] - 60)]
    last = state.rss[-1][1] if state.rss else 0
    baseline = sum(warm) / len(warm) if warm else last
    final = sum(tail) / len(tail) if tail else last
    growth = final / baseline - 1.0 if baseline else math.inf
    mismatched = [asdict(p) for p in state.probes if p.reference != p.text]
    failed_probes = [asdict(o) for o in state.outcomes if o.kind == "probe" and o.status != "200"]
    failed_admin = [asdict(o) for o in state.outcomes if o.kind.startswith("admin:") and o.status != "200"]
    refused_streams = [asdict(o) for o in state.outcomes if o.kind == "stream" and not _stream_ok(o, state)]
    kinds = Counter(o.kind.split(":")[0] for o in state.outcomes)
    checks = {
        "no_5xx": not server_errors,
        "no_hung_requests": not hung and leftover == {"running": 0, "waiting": 0},
        "malformed_all_4xx": not unexpected,
        "valid_streams_refused_only_while_unloaded": not refused_streams,
        "admin_ops_all_200": not failed_admin,
        "rss_growth_under_limit": growth < args.max_rss_growth,
        "probes_equal_reference": bool(state.probes) and not mismatched and not failed_probes,
    }
    return {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {"cpus": os.cpu_count(), "platform": sys.platform, "cpu": _cpu_model()},
        "checks": checks,
        "passed": all(checks.values()),
        "requests": dict(kinds),
        "statuses": dict(statuses),
        "admin_ops": sum(1 for o in state.outcomes if o.kind.startswith("admin:")),
        "versions_served": len(state.versions),
        "rss_mib": {"after_warmup": round(baseline / 2**20, 1), "end": round(final / 2**20, 1)},
        "rss_growth": round(growth, 4),
        "server_leftover": leftover,
        "probes": len(state.probes),
        "probed_versions": len({p.digest for p in state.probes}),  # None (the base) counts as one
        "probe_mismatches": mismatched,
        "probes_failed": failed_probes[:50],
        "admin_failed": failed_admin[:50],
        "streams_refused": refused_streams[:50],
        "unload_windows": [(a, round(t0, 2), round(t1, 2)) for a, t0, t1 in state.unload_windows],
        "arrivals_capped_by_client": state.capped_arrivals,
        "server_errors": server_errors[:50],
        "hung": hung[:50],
        "malformed_not_4xx": unexpected[:50],
        "rss_samples": [(round(t, 1), b) for t, b in state.rss],
        "timeline": [
            (round(o.start, 2), o.kind, o.status, None if o.e2e is None else round(o.e2e, 3))
            for o in state.outcomes
        ],
    }


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")


def _stream_ok(outcome: Outcome, state: SoakState) -> bool:
    """A valid stream may end only in ``[DONE]``, a hang-up of ours, or (a 404 or an error naming the request)
    while its adapter was between an admin unload and the load that follows it."""
    if outcome.status in ("done", "disconnect"):
        return True
    refused = outcome.status == "404" or outcome.status == "stream_error:invalid_request_error"
    end = outcome.start + (outcome.e2e or 0.0)
    return refused and any(
        a == outcome.model and outcome.start <= t1 and end >= t0 for a, t0, t1 in state.unload_windows
    )


def write_plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_rss, ax_req, ax_lat) = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    samples = summary["rss_samples"]
    ax_rss.plot([t / 60 for t, _ in samples], [b / 2**20 for _, b in samples])
    ax_rss.axvline(summary["config"]["warmup"] / 60, color="grey", linestyle="--", label="end of warm-up")
    limit = summary["rss_mib"]["after_warmup"] * (1 + summary["config"]["max_rss_growth"])
    ax_rss.axhline(limit, color="red", linestyle=":", label="growth limit over the warm-up baseline")
    ax_rss.set_ylabel("server RSS (MiB)")
    ax_rss.legend()
    buckets: dict[str, Counter[int]] = {}
    for start, _kind, status, _ in summary["timeline"]:
        group = "5xx" if status.startswith("5") else "4xx" if status.startswith("4") else status
        group = group if group in ("done", "disconnect", "4xx", "5xx", "200") else "other"
        buckets.setdefault(group, Counter())[int(start // 30)] += 1
    for group, counts in sorted(buckets.items()):
        xs = sorted(counts)
        ax_req.plot([x / 2 for x in xs], [counts[x] for x in xs], marker=".", label=group)
    ax_req.set_ylabel("requests per 30 s")
    ax_req.legend(ncol=3, fontsize="small")
    streams = [
        (s, e) for s, kind, status, e in summary["timeline"] if kind == "stream" and status == "done" and e
    ]
    ax_lat.scatter([s / 60 for s, _ in streams], [e for _, e in streams], s=3)
    ax_lat.set_yscale("log")
    ax_lat.set_ylabel("e2e latency, completed streams (s)")
    ax_lat.set_xlabel("minutes")
    verdict = "PASS" if summary["passed"] else "FAIL"
    fig.suptitle(f"soak on the CPU demo ({summary['config']['quantization']}): {verdict}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# --------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="JSON result file; the plot goes next to it")
    p.add_argument("--duration", type=float, default=1200.0, help="seconds of traffic")
    p.add_argument("--warmup", type=float, default=300.0, help="seconds before the RSS baseline")
    p.add_argument("--rate", type=float, default=1.0, help="arrivals per second (Poisson)")
    p.add_argument("--max-in-flight", type=int, default=24)
    p.add_argument("--skew", type=float, default=1.0, help="Zipf exponent over the adapters")
    p.add_argument("--disconnect-fraction", type=float, default=0.10)
    p.add_argument("--malformed-fraction", type=float, default=0.05)
    p.add_argument("--probe-every", type=float, default=20.0, help="seconds between random probes")
    p.add_argument("--max-rss-growth", type=float, default=0.05)
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--quantization", choices=["nf4", "int8", "none"], default="nf4")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--server-log", type=Path, default=None, help="where the server's output goes")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from server.runtime.demo import ensure_demo

    demo = ensure_demo()
    work = Path(tempfile.mkdtemp(prefix="loraserve-soak-"))
    adapter_dir, frozen = work / "adapters", work / "versions"
    frozen.mkdir(parents=True)
    sources: dict[str, Path] = {}
    names: list[str] = []
    for i in range(NUM_ADAPTERS):
        origin = demo.adapter_names[i % len(demo.adapter_names)]
        name = f"{origin}-{i:02d}"
        sources[name] = demo.adapters / origin
        perturbed_copy(sources[name], adapter_dir / name, seed=i)
        names.append(name)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    log_path = args.server_log or work / "server.log"
    process, url = start_server(args, adapter_dir, log_path)
    base = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    state = SoakState(t0=time.monotonic())
    ctx = {"names": names, "base": base, "sources": sources, "adapter_dir": adapter_dir, "frozen": frozen}
    try:
        leftover = asyncio.run(run(args, state, url, process.pid, ctx))
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
    compute_references(state, demo.base, args.quantization)
    summary = summarize(state, args, leftover)
    args.out.write_text(json.dumps(summary, indent=1))
    write_plot(summary, args.out.with_suffix(".png"))
    shutil.rmtree(work, ignore_errors=True)
    print(
        json.dumps(
            {k: summary[k] for k in ("checks", "requests", "statuses", "rss_mib", "rss_growth", "probes")},
            indent=1,
        )
    )
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
