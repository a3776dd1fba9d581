"""``loraserve serve-ray``: start (or join) a Ray cluster, run the application of ``deployments`` with Ray
Serve's HTTP proxy on ``--host``/``--port``, and on SIGTERM/SIGINT drain every replica (running requests
finish for up to ``--shutdown-timeout`` seconds) before shutting Serve down. Exit status 0 after a drain.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import threading
import time

from server.config import ScaleSettings, Settings

log = logging.getLogger("loraserve.scale")


def _start_ray(scale: ScaleSettings) -> bool:
    """Connect to ``--ray-address`` or start a local cluster on loopback; True when we started it."""
    import ray

    # Ray reads these when it starts its processes: no usage reports, no dashboard (nothing leaves loopback)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DISABLE_IMPORT_WARNING", "1")
    env_vars = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "RAY_USAGE_STATS_ENABLED") if k in os.environ}
    if scale.ray_address is not None:
        ray.init(address=scale.ray_address, runtime_env={"env_vars": env_vars}, log_to_driver=True)
        return False
    needed = scale.replicas * scale.num_cpus
    ray.init(
        num_cpus=max(os.cpu_count() or 1, math.ceil(needed)),
        num_gpus=None if scale.num_gpus == 0 else max(1, round(scale.replicas * scale.num_gpus + 0.5)),
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": env_vars},
    )
    return True


def serve_ray(settings: Settings, scale: ScaleSettings) -> int:
    from ray import serve

    from server.scale.deployments import APP_NAME, build_application, replica_name

    started = time.monotonic()
    local = _start_ray(scale)
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port, "location": "HeadOnly"})
        serve.run(build_application(settings, scale), name=APP_NAME, route_prefix="/")
        log.info(
            "ready in %.1f s: http://%s:%d (%d replicas, %s routing)",
            time.monotonic() - started,
            settings.host,
            settings.port,
            scale.replicas,
            scale.routing,
        )
        stop = threading.Event()
        received: list[int] = []

        def on_signal(sig: int, _frame: object) -> None:
            received.append(sig)
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        stop.wait()
        log.warning(
            "%s: draining %d replicas for up to %.0f s",
            signal.Signals(received[0]).name,
            scale.replicas,
            settings.shutdown_timeout,
        )
        handles = [
            serve.get_deployment_handle(replica_name(i), app_name=APP_NAME) for i in range(scale.replicas)
        ]

        async def drain_all() -> None:
            await asyncio.gather(
                *(h.drain.remote(settings.shutdown_timeout) for h in handles), return_exceptions=True
            )

        asyncio.run(drain_all())
        time.sleep(0.2)  # let the last events reach their streams through the proxy
        serve.delete(APP_NAME)
        serve.shutdown()
    finally:
        if local:
            import ray

            ray.shutdown()
    log.info("stopped")
    return 0
