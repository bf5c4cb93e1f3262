"""`sspsam serve --ray`: the same FastAPI app (routes, page, limits, micro-batching worker) as a
Ray Serve deployment, for replicas across the cores, GPUs or machines of a Ray cluster.

Each replica builds the app with :func:`sspsam.serve.app.create_app` on its own (a builder that
``serve.ingress`` runs in the replica), so each loads its models in the app's start-up, runs its
own inference thread and keeps its own 413 / 503 / 504 limits. Ray Serve's per-replica cap on
requests in flight is set above the app's queue, so the app, not Ray's proxy, decides when a
replica is busy (503 with Retry-After) and micro-batching sees every waiting request.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

from sspsam.errors import SSPSamError


def require_serve():
    try:
        from ray import serve
    except ImportError as exc:
        raise SSPSamError(f"`sspsam serve --ray` needs the ray-serve extra ({exc.name} is missing): "
                          "pip install 'sspsam[ray-serve]'") from None
    return serve


def build_app(app_options: dict[str, Any], replicas: int | None = 1, autoscaling: dict | None = None,
              replica_cpus: float = 1.0, threads: int | None = None):
    """The Ray Serve application (``serve.run`` it). ``app_options``: :func:`create_app`'s keyword
    arguments with model names (replicas load them; objects cannot travel); ``autoscaling``:
    Ray Serve's ``autoscaling_config`` (then ``replicas`` is ignored)."""
    serve = require_serve()
    options = dict(app_options)
    if options.get("segmenter") is not None or options.get("ovss") is not None:
        raise ValueError("replicas load their own models: pass model names, not loaded objects")

    def make_app():
        import torch

        if threads is not None:
            torch.set_num_threads(threads)
        from sspsam.serve.app import create_app

        return create_app(**options)

    @serve.ingress(make_app)
    class SSPSam:
        """One replica: everything is in the app."""

    in_flight = int(options.get("queue_size", 64)) + int(options.get("max_batch", 16)) + 8
    scale = {"autoscaling_config": autoscaling} if autoscaling else {"num_replicas": replicas or 1}
    deployment = serve.deployment(SSPSam, name="sspsam", max_ongoing_requests=in_flight,
                                  ray_actor_options={"num_cpus": replica_cpus}, **scale)
    return deployment.bind()


def run(app_options: dict[str, Any], host: str, port: int, replicas: int | None = 1, autoscaling: dict | None = None,
        address: str | None = None, replica_cpus: float = 1.0, threads: int | None = None,
        started: callable = None) -> None:
    """Start Ray (or join ``address``), deploy, and serve until interrupted."""
    import ray

    serve = require_serve()
    if address:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    else:
        need = replica_cpus * ((autoscaling or {}).get("max_replicas") or replicas or 1)
        ray.init(num_cpus=max(os.cpu_count() or 1, int(need + 0.999)), include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app(app_options, replicas, autoscaling, replica_cpus, threads), name="sspsam", route_prefix="/",
                  blocking=False)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):  # ray.init replaces Python's SIGINT handler
            signal.signal(sig, lambda *_: stop.set())
        if started is not None:
            started()
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


_require_serve = require_serve  # the earlier private name (cli/serve.py), kept for one release
