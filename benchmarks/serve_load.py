"""Load test for ``sspsam serve``: N concurrent clients post an image + phrase for a fixed time.

Examples::

    python benchmarks/serve_load.py                                  # tiny bundled model, 50 clients, 20 s
    python benchmarks/serve_load.py --queue-size 8                   # force deliberate 503s
    python benchmarks/serve_load.py --model ssp-sam-vitb --real-size # real weights (from the cache), 1024x768 images
    python benchmarks/serve_load.py --url http://127.0.0.1:8000      # a server that is already running
    python benchmarks/serve_load.py --servers plain,ray1,ray2        # one process vs Ray Serve, 1 and 2 replicas

Without ``--url`` it starts the server in a subprocess on a free 127.0.0.1 port and stops it
afterwards. Clients are httpx async tasks on one connection pool; a client that gets a 503
sleeps for its ``Retry-After`` (as a polite client would) before trying again. Latency
percentiles are over successful (200) requests; "errors" are everything that is neither a 200
nor a deliberate 503 (other statuses, connection failures, client timeouts). The last column is
the server's own count of queued requests per model call, i.e. how much micro-batching happened.

Why the service batches in its own thread rather than with Ray Serve's ``@serve.batch`` or
LitServe (``sspsam/serve/worker.py``), measured with ``--servers plain,ray1`` (shapes-demo, 20
clients, 15 s, 2 busy CPU cores): the same endpoint on Ray Serve 2.60 served 23.6 req/s (p50
839 ms) against 25.6 (750 ms) in one process, but took 34.5 s instead of 12.9 s to start and ran
11 processes in ~1.8 GiB instead of 1 in 0.45 GiB.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import numpy as np
from PIL import Image

from sspsam.data.shapes import make_scene

SERVE = "import typer; from sspsam.cli.serve import serve; typer.run(serve)"
# --servers: what each name starts (extra `sspsam serve` arguments); rows come out in the order given
SERVERS = {"plain": [], "ray1": ["--ray", "--replicas", "1"], "ray2": ["--ray", "--replicas", "2"]}
PHRASES = ["red circle", "the blue square", "green triangle", "the largest shape", "a circle on the left", "yellow"]


@dataclass
class Stats:
    latencies_ms: list[float] = field(default_factory=list)
    busy: int = 0
    errors: Counter = field(default_factory=Counter)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _images(n: int, real_size: bool) -> list[bytes]:
    out = []
    for i in range(n):
        scene = make_scene(i, width=1024, height=768) if real_size else make_scene(i)
        buf = io.BytesIO()
        Image.fromarray(scene.render()).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def start_server(args, extra: list[str] | None = None) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-c", SERVE, "--host", "127.0.0.1", "--port", str(port), "--model", args.model,
           "--ovss-model", "none", "--device", args.device, "--queue-size", str(args.queue_size),
           "--max-batch", str(args.max_batch), "--timeout", str(args.timeout), "--log-level", "warning", *(extra or [])]
    log = open(args.server_log, "w") if args.server_log else subprocess.DEVNULL  # one JSON line per request
    proc = subprocess.Popen(cmd, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.startup_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode} while starting (see --server-log)")
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                proc.started_s = time.monotonic() - (deadline - args.startup_timeout)
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the server did not answer /healthz within {args.startup_timeout} s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown (and Ray Serve's)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def _client(client: httpx.AsyncClient, url: str, images: list[bytes], seed: int, deadline: float,
                  phrases_per_request: int, stats: Stats) -> None:
    rng = np.random.default_rng(seed)
    while time.monotonic() < deadline:
        png = images[int(rng.integers(len(images)))]
        phrases = [PHRASES[int(k)] for k in rng.choice(len(PHRASES), phrases_per_request, replace=False)]
        t0 = time.perf_counter()
        try:
            r = await client.post(url + "/v1/segment", files={"image": ("scene.png", png, "image/png")},
                                  data={"phrases": phrases})
        except httpx.HTTPError as exc:
            stats.errors[type(exc).__name__] += 1
            continue
        if r.status_code == 200:
            stats.latencies_ms.append((time.perf_counter() - t0) * 1000)
        elif r.status_code == 503:
            stats.busy += 1
            await asyncio.sleep(min(float(r.headers.get("retry-after", "1")), max(0.0, deadline - time.monotonic())))
        else:
            stats.errors[f"HTTP {r.status_code}"] += 1


async def load(url: str, args) -> tuple[Stats, float, dict]:
    images = _images(args.images, args.real_size)
    stats = Stats()
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(limits=limits, timeout=args.timeout + 30) as client:
        before = (await client.get(url + "/healthz")).json()
        t0 = time.monotonic()
        deadline = t0 + args.seconds
        await asyncio.gather(*(_client(client, url, images, i, deadline, args.phrases_per_request, stats)
                               for i in range(args.clients)))
        elapsed = time.monotonic() - t0
        after = (await client.get(url + "/healthz")).json()
    server = {k: after.get(k, 0) - before.get(k, 0) for k in ("jobs", "batches", "model_calls")}
    return stats, elapsed, server


HEADER = [
    "| server | model | images | clients | seconds | start s | ok | req/s | p50 ms | p95 ms | p99 ms | errors | 503s | requests per model call |",
    "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
]


def row(args, name: str, started_s: float | None, stats: Stats, elapsed: float, server: dict) -> str:
    """One table row. Ray's /healthz comes from whichever replica answers, so its batching count
    covers one replica only: shown as '-'."""
    lat = np.asarray(stats.latencies_ms)
    pct = [f"{np.percentile(lat, q):.0f}" if lat.size else "-" for q in (50, 95, 99)]
    errors = sum(stats.errors.values())
    per_call = f"{server['jobs'] / server['model_calls']:.2f}" if server.get("model_calls") and not name.startswith("ray") else "-"
    size = "1024x768" if args.real_size else "scenes ~300px"
    start = "-" if started_s is None else f"{started_s:.1f}"
    out = (f"| {name} | {args.model} | {size} | {args.clients} | {elapsed:.1f} | {start} | {lat.size} | {lat.size / elapsed:.1f} | "
           f"{' | '.join(pct)} | {errors} | {stats.busy} | {per_call} |")
    if stats.errors:
        out += "\n\nerrors: " + ", ".join(f"{k}: {v}" for k, v in stats.errors.most_common()) + "\n"
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", help="target a running server instead of starting one")
    p.add_argument("--model", default="shapes-demo", help="model the started server loads (e.g. ssp-sam-vitb)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--real-size", action="store_true", help="post 1024x768 images instead of small scenes")
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--images", type=int, default=8, help="distinct images the clients pick from")
    p.add_argument("--phrases-per-request", type=int, default=1)
    p.add_argument("--queue-size", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--timeout", type=float, default=30.0, help="server's per-request timeout, s")
    p.add_argument("--startup-timeout", type=float, default=180.0)
    p.add_argument("--server-log", help="file for the started server's output (JSON request logs)")
    p.add_argument("--servers", default="plain", help=f"comma-separated, each started in turn: {', '.join(SERVERS)}")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.servers.split(",") if n.strip()]
    if any(n not in SERVERS for n in names):
        p.error(f"--servers takes {', '.join(SERVERS)}")
    rows, failed = [], False
    for name in (["url"] if args.url else names):
        proc, url = (None, args.url) if args.url else start_server(args, SERVERS[name])
        try:
            stats, elapsed, server = asyncio.run(load(url.rstrip("/"), args))
        finally:
            if proc is not None:
                stop_server(proc)
        rows.append(row(args, name, getattr(proc, "started_s", None), stats, elapsed, server))
        failed |= bool(stats.errors)
    print("\n".join(HEADER + rows))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
