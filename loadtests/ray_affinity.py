"""Adapter affinity and replica failure on ``loraserve serve-ray`` (local Ray cluster, CPU, demo bundle).

One run, two deployments of the same application, each started fresh (cold tiers):

1. ``--routing affinity`` and 2. ``--routing round_robin`` (the baseline): 2 replicas, 8 adapters (copies of
   the demo adapters), each replica holding at most 2 in its GPU tier and 4 in its CPU tier (which also
   keeps the GPU ones), so the 8 fit only if each adapter stays on one replica. Warm-up (every adapter once, then Zipf traffic), then ``--requests``
   requests with Zipf popularity. A request is a *hit* when ``x-loraserve-adapter-tier`` (the adapter's
   tier on the serving replica when the request arrived, reported by that replica) is ``gpu`` or ``cpu``.
3. On the affinity deployment: non-streamed and streamed requests in flight while one replica's process is
   killed (SIGKILL); counts non-streamed requests lost (must be 0), streams ended by an error event, and
   how long until Ray has the killed replica back.

    python loadtests/ray_affinity.py --out loadtests/results/ray-affinity.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
from pathlib import Path
from typing import Any

import httpx

HIT_TIERS = {"gpu", "cpu"}


def zipf_weights(n: int, s: float) -> list[float]:
    return [1.0 / (k**s) for k in range(1, n + 1)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_adapters(source: Path, target: Path, count: int) -> list[str]:
    """``count`` adapters in ``target``, copies of the demo adapters in ``source`` (round robin)."""
    demos = sorted(p for p in source.iterdir() if p.is_dir())
    names = []
    for i in range(count):
        name = f"tenant-{i}"
        shutil.copytree(demos[i % len(demos)], target / name)
        names.append(name)
    return names


class Deployment:
    """``loraserve serve-ray`` as a subprocess on a free loopback port."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "server.cli", "serve-ray", "--port", str(self.port), *args]
        self.log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 300.0) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"serve-ray exited with {self.process.returncode}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2.0).status_code == 200:
                    return time.monotonic() - started
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError("serve-ray did not become ready")

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self.log.close()
        return code


async def complete(client: httpx.AsyncClient, model: str, *, stream: bool = False) -> dict[str, Any]:
    body = {"model": model, "prompt": "Say hello to the tenant", "max_tokens": 4, "stream": stream}
    if not stream:
        r = await client.post("/v1/completions", json=body)
        return {
            "status": r.status_code,
            "replica": r.headers.get("x-loraserve-replica"),
            "tier": r.headers.get("x-loraserve-adapter-tier"),
        }
    async with client.stream("POST", "/v1/completions", json=body) as r:
        events = [line async for line in r.aiter_lines() if line.startswith("data:")]
    return {
        "status": r.status_code,
        "replica": r.headers.get("x-loraserve-replica"),
        "done": bool(events) and events[-1] == "data: [DONE]",
        "error_event": any('"error"' in e for e in events),
    }


async def traffic(url: str, models: list[str], concurrency: int) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = [{} for _ in models]
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(models)):
        queue.put_nowait(i)
    async with httpx.AsyncClient(base_url=url, timeout=120.0) as client:

        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                results[i] = {"model": models[i], **await complete(client, models[i])}

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    hits = sum(1 for r in results if r["tier"] in HIT_TIERS)
    return {
        "requests": len(results),
        "ok": sum(1 for r in results if r["status"] == 200),
        "hits": hits,
        "hit_rate": round(hits / len(results), 4),
        "tiers": dict(Counter(r["tier"] for r in results)),
        "by_replica": dict(Counter(r["replica"] for r in results)),
    }


def replica_pid(name: str) -> int:
    """The pid of Ray's worker process for deployment ``name`` (its title names the replica)."""
    out = subprocess.run(["pgrep", "-f", f"ServeReplica:loraserve:{name}"], capture_output=True, text=True)
    pids = [int(p) for p in out.stdout.split()]
    if not pids:
        raise RuntimeError(f"no process for {name}")
    return min(pids)


async def long_stream(client: httpx.AsyncClient, model: str, started: asyncio.Event) -> dict[str, Any]:
    """A stream long enough to be cut by the kill; ``started`` is set at its first token."""
    body = {
        "model": model,
        "prompt": "Tell a long story",
        "max_tokens": 200,
        "ignore_eos": True,
        "stream": True,
    }
    events: list[str] = []
    async with client.stream("POST", "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data:"):
                events.append(line)
                started.set()
    return {
        "replica": r.headers.get("x-loraserve-replica"),
        "done": bool(events) and events[-1] == "data: [DONE]",
        "error_event": any('"error"' in e for e in events),
    }


async def kill_phase(url: str, adapters: list[str], rng: random.Random, n: int) -> dict[str, Any]:
    """``n`` non-streamed plus ``n // 4`` short streamed requests, 6 in flight, and one long stream per
    replica; replica-1 is killed once a quarter of the short ones finished and both long streams run."""
    victim = "replica-1"
    pid = replica_pid(victim)
    finished = 0
    killed_at: float | None = None
    first_ok_after_kill: float | None = None
    plain: list[dict[str, Any]] = []
    streams: list[dict[str, Any]] = []
    jobs = [(rng.choice(adapters), False) for _ in range(n)] + [
        (rng.choice(adapters), True) for _ in range(n // 4)
    ]
    rng.shuffle(jobs)
    queue: asyncio.Queue[tuple[str, bool]] = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    async with httpx.AsyncClient(base_url=url, timeout=120.0) as client:
        # one long stream on each replica: two adapters that live on different replicas
        listed = (await client.get("/v1/adapters")).json()["data"]
        home = {e["replica"]: e["id"] for e in listed if e["tier"] in HIT_TIERS}
        long_started = [asyncio.Event() for _ in home]
        long_streams = [
            asyncio.ensure_future(long_stream(client, model, started))
            for model, started in zip(home.values(), long_started, strict=True)
        ]

        async def worker() -> None:
            nonlocal finished, killed_at, first_ok_after_kill
            while not queue.empty():
                model, stream = queue.get_nowait()
                sent = time.monotonic()
                try:
                    result = await complete(client, model, stream=stream)
                except httpx.HTTPError as exc:
                    result = {"status": None, "exception": type(exc).__name__}
                (streams if stream else plain).append(result)
                finished += 1
                if (
                    killed_at is not None
                    and sent > killed_at
                    and result.get("status") == 200
                    and first_ok_after_kill is None
                ):
                    first_ok_after_kill = time.monotonic() - killed_at
                if killed_at is None and finished >= len(jobs) // 4:
                    await asyncio.gather(*(e.wait() for e in long_started))
                    killed_at = time.monotonic()
                    os.kill(pid, signal.SIGKILL)

        await asyncio.gather(*(worker() for _ in range(6)))
        long_results = await asyncio.gather(*long_streams)
        back_after = None
        assert killed_at is not None
        while time.monotonic() - killed_at < 180:
            listed = (await client.get("/v1/adapters")).json().get("data", [])
            if {e["replica"] for e in listed} == {"replica-0", "replica-1"}:
                back_after = round(time.monotonic() - killed_at, 1)
                break
            await asyncio.sleep(0.5)
    return {
        "killed": victim,
        "non_streamed": len(plain),
        "non_streamed_ok": sum(1 for r in plain if r.get("status") == 200),
        "non_streamed_lost": sum(1 for r in plain if r.get("status") != 200),
        "short_streams": len(streams),
        "short_streams_done": sum(1 for r in streams if r.get("done")),
        "short_streams_ended_with_error_event": sum(1 for r in streams if r.get("error_event")),
        "long_streams_in_flight_at_kill": long_results,
        "first_new_request_ok_after_kill_s": None
        if first_ok_after_kill is None
        else round(first_ok_after_kill, 2),
        "killed_replica_back_after_s": back_after,
        "new_pid": replica_pid(victim) if back_after is not None else None,
        "old_pid": pid,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from server.runtime.demo import ensure_demo

    bundle = ensure_demo(progress=False)
    work = Path(tempfile.mkdtemp(prefix="loraserve-ray-"))
    adapters = make_adapters(bundle.adapters, work / "adapters", args.adapters)
    rng = random.Random(args.seed)
    weights = zipf_weights(len(adapters), args.zipf)
    warmup = list(adapters) + rng.choices(adapters, weights, k=args.warmup)
    measured = rng.choices(adapters, weights, k=args.requests)
    common = [
        "--replicas", "2", "--num-cpus", "0.5", "--device", "cpu",
        "--adapter-dir", str(work / "adapters"),
        "--max-gpu-adapters", str(args.gpu_tier), "--max-cpu-adapters", str(args.cpu_tier),
        "--max-num-seqs", "8", "--max-model-len", "256", "--log-level", "warning",
    ]  # fmt: skip
    report: dict[str, Any] = {
        "machine": args.machine,
        "setup": {
            "replicas": 2,
            "adapters": len(adapters),
            "zipf_s": args.zipf,
            "per_replica_tiers": {"gpu": args.gpu_tier, "cpu": args.cpu_tier},
            "warmup_requests": len(warmup),
            "measured_requests": len(measured),
            "concurrency": args.concurrency,
            "hit": "x-loraserve-adapter-tier in {gpu, cpu} on the replica that served the request",
        },
    }
    for policy in ("affinity", "round_robin"):
        deployment = Deployment([*common, "--routing", policy], work / f"{policy}.log")
        try:
            ready_s = deployment.wait_ready()
            asyncio.run(traffic(deployment.url, warmup, 1))
            results = asyncio.run(traffic(deployment.url, measured, args.concurrency))
            report[policy] = {"ready_s": round(ready_s, 1), **summarize(results)}
            print(policy, report[policy], flush=True)
            if policy == "affinity":
                report["replica_killed"] = asyncio.run(
                    kill_phase(deployment.url, adapters, rng, args.kill_requests)
                )
                print("kill", report["replica_killed"], flush=True)
        finally:
            report.setdefault("exit_codes", {})[policy] = deployment.stop()
    shutil.rmtree(work, ignore_errors=True)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("loadtests/results/ray-affinity.json"))
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--zipf", type=float, default=1.0)
    parser.add_argument("--warmup", type=int, default=32, help="Zipf requests after one per adapter")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--gpu-tier", type=int, default=2)
    parser.add_argument("--cpu-tier", type=int, default=4)
    parser.add_argument("--kill-requests", type=int, default=48)
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument("--machine", default="AMD EPYC, 2 cores, AVX512-BF16, no GPU")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
