"""`sspsam serve --ray --replicas 2` answers exactly as `sspsam serve`: the same requests (found,
not found, JSON and multipart bodies, the limits' error answers, the models listing) give the same
statuses and the same body bytes. Both servers run as real subprocesses on loopback ports.

Slow: Ray starts a local cluster, a proxy, a controller and two replicas (each loading the demo).
"""

from __future__ import annotations

import base64
import io
import signal
import socket
import subprocess
import sys
import time

import pytest

import httpx
import ray.serve  # noqa: F401 — the [dev] extras install it: a missing Ray Serve fails here, never skips
from PIL import Image

from sspsam.data.shapes import make_scene

CLI = "from sspsam.cli.main import app; app(prog_name='sspsam')"
pytestmark = pytest.mark.slow


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(log, *extra: str):
    """The server and its URL once /healthz answers; its output goes to ``log`` (shown on failure)."""
    port = _port()
    proc = subprocess.Popen([sys.executable, "-c", CLI, "serve", "--port", str(port), "--ovss-model", "none",
                             "--device", "cpu", "--max-upload-mb", "1", "--threads", "1", *extra],
                            stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the server exited with {proc.returncode}: {_tail(log)}"
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise AssertionError(f"no answer from /healthz: {_tail(log)}")


def _tail(log) -> str:
    log.flush()
    with open(log.name, errors="replace") as fh:
        return fh.read()[-3000:]


def _stop(proc) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(make_scene(seed).render()).save(buf, format="PNG")
    return buf.getvalue()


def _requests():
    a, b = _png(1), _png(2)
    yield "get", "/v1/models", {}
    yield "post", "/v1/segment", {"files": {"image": ("a.png", a, "image/png")}, "data": {"phrases": ["red circle", "the blue square"]}}
    yield "post", "/v1/segment", {"json": {"image": base64.b64encode(b).decode(), "phrase": "the purple triangle", "overlay": True}}
    yield "post", "/v1/segment", {"files": {"image": ("a.png", a, "image/png")}, "data": {"phrases": [""]}}  # 422
    yield "post", "/v1/segment", {"files": {"image": ("x.png", b"not an image", "image/png")}, "data": {"phrase": "x"}}  # 400
    yield "post", "/v1/segment", {"content": b"x" * 2_000_000, "headers": {"content-type": "application/json"}}  # 413
    yield "post", "/v1/ovss", {"files": {"image": ("a.png", a, "image/png")}, "data": {"classes": ["red"]}}  # 503: no OVSS


def _answers(url: str) -> list[tuple[int, bytes]]:
    out = []
    with httpx.Client(timeout=60) as client:
        for n, (method, path, kw) in enumerate(_requests()):
            headers = {"X-Request-ID": f"same-{n}", **kw.pop("headers", {})}
            r = client.request(method.upper(), url + path, headers=headers, **kw)
            out.append((r.status_code, r.content))
    return out


def test_ray_serve_answers_with_the_same_bytes(tmp_path):
    log = open(tmp_path / "servers.log", "w")
    plain, url = _start(log)
    try:
        expected = _answers(url)
    finally:
        _stop(plain)
    t0 = time.monotonic()
    ray, url = _start(log, "--ray", "--replicas", "2", "--replica-cpus", "0.5")
    started = time.monotonic() - t0
    try:
        got = _answers(url)
        got_again = _answers(url)  # the other replica (round-robin) answers the same
        health = httpx.get(url + "/healthz", timeout=10).json()
    finally:
        _stop(ray)
    print(f"Ray Serve with 2 replicas answered /healthz after {started:.1f} s")
    assert [s for s, _ in expected] == [200, 200, 200, 422, 400, 413, 503]
    for (s0, b0), (s1, b1), (s2, b2) in zip(expected, got, got_again):
        assert (s1, b1) == (s0, b0)
        assert (s2, b2) == (s0, b0)
    assert health["status"] == "ok"
