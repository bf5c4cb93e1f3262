"""Load and abuse run against a real `sspsam serve` on 127.0.0.1.

N concurrent clients (keep-alive connections, one thread each) send for D seconds a mix of valid
requests (/v1/segment multipart and JSON, /v1/ovss) and hostile ones (phrases of the wrong type,
deeply nested JSON, a 5,000-digit number, a decompression-bomb PNG, invalid base64, a wrong
content type, an oversize body), plus a few slowloris connections that never finish their head.

Reported: requests per status, 5xx count (must be 0), dropped connections (a connection error
without a response; 503s from a full queue are deliberate and counted apart), p50/p99 latency of
valid and hostile requests, the server's RSS after warm-up and after the run (growth must stay
under 10 %), whether /healthz is green at the end, and how many slowloris connections the server
closed by itself.

    python benchmarks/serve_abuse.py --clients 50 --seconds 60

(benchmarks/serve_load.py measures throughput with valid requests only; this one is the abuse run.)
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image


def _png(rng: random.Random) -> bytes:
    arr = np.full((96, 128, 3), rng.randrange(256), np.uint8)
    arr[20:60, 30:80] = (220, 30, 30)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _bomb() -> bytes:
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 20001 * 8, 9)) + chunk(b"IEND", b""))


def _multipart(fields: list[tuple[str, str | None, bytes]]) -> tuple[str, bytes]:
    boundary = uuid.uuid4().hex
    body = b""
    for name, filename, content in fields:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--{boundary}\r\nContent-Disposition: {disp}\r\n\r\n".encode() + content + b"\r\n"
    return f"multipart/form-data; boundary={boundary}", body + f"--{boundary}--\r\n".encode()


def requests_mix(seed: int = 0) -> list[tuple[str, str, str, bytes]]:
    """(label, path, content type, body); label 'valid-*' or 'hostile-*'."""
    rng = random.Random(seed)
    png = _png(rng)
    b64 = base64.b64encode(png).decode()
    J = "application/json"
    mix = [
        ("valid-segment-json", "/v1/segment", J, json.dumps({"image": b64, "phrases": ["the red square", "the background"]}).encode()),
        ("valid-ovss-json", "/v1/ovss", J, json.dumps({"image": b64, "classes": ["red", "green", "background"]}).encode()),
        ("valid-segment-multipart", "/v1/segment", *_multipart([("image", "a.png", png), ("phrases", None, b"the red square")])),
        ("hostile-phrases-int", "/v1/segment", J, json.dumps({"image": b64, "phrases": 5}).encode()),
        ("hostile-phrases-nested", "/v1/segment", J, json.dumps({"image": b64, "phrases": [[["x"]]]}).encode()),
        ("hostile-deep-json", "/v1/segment", J, b"[" * 50_000 + b"]" * 50_000),
        ("hostile-5000-digits", "/v1/segment", J, ('{"image": "%s", "phrases": %s}' % (b64, "9" * 5000)).encode()),
        ("hostile-bomb", "/v1/segment", J, json.dumps({"image": base64.b64encode(_bomb()).decode(), "phrases": ["x"]}).encode()),
        ("hostile-bad-base64", "/v1/ovss", J, json.dumps({"image": "!!!", "classes": ["a"]}).encode()),
        ("hostile-wrong-ctype", "/v1/segment", "text/plain", b"hello"),
        ("hostile-path-as-image", "/v1/segment", J, json.dumps({"image": "/etc/passwd", "phrases": ["x"]}).encode()),
        ("hostile-oversize", "/v1/segment", J, b"{" + b" " * 3_000_000 + b"}"),
        ("hostile-truncated-png", "/v1/segment", *_multipart([("image", "t.png", png[: len(png) // 2]), ("phrases", None, b"x")])),
        ("hostile-1000-phrases", "/v1/segment", J, json.dumps({"image": b64, "phrases": [f"p{i}" for i in range(1000)]}).encode()),
    ]
    return mix


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wait_healthy(port: int, timeout: float = 180) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/healthz")
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit("server did not come up")


def client_loop(port: int, mix, deadline: float, seed: int, out: list, lock: threading.Lock) -> None:
    rng = random.Random(seed)
    conn = None
    records = []
    while time.time() < deadline:
        label, path, ctype, body = mix[rng.randrange(len(mix))] if rng.random() < 0.5 else mix[rng.randrange(3)]
        if conn is None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        t0 = time.perf_counter()
        try:
            conn.request("POST", path, body=body, headers={"Content-Type": ctype})
            resp = conn.getresponse()
            resp.read()
            status = resp.status
            if resp.getheader("connection", "").lower() == "close":
                conn.close()
                conn = None
        except (OSError, http.client.HTTPException) as exc:
            # an oversize body is refused from its Content-Length and the connection closed while the
            # client is still sending: deliberate, like a 503, and counted apart from real drops
            status = "closed:oversize" if label == "hostile-oversize" else f"dropped:{type(exc).__name__}"
            conn.close()
            conn = None
        records.append((label, status, time.perf_counter() - t0))
    with lock:
        out.extend(records)


def slowloris(port: int, n: int, wait: float) -> int:
    """Open n connections that send half a request head; count those the server closes itself."""
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"POST /v1/segment HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        socks.append(s)
    time.sleep(wait)
    closed = 0
    for s in socks:
        s.settimeout(1)
        try:
            closed += s.recv(1) == b""
        except socket.timeout:
            pass
        except OSError:
            closed += 1
        s.close()
    return closed


def pct(values, q):
    return float(np.percentile(values, q)) * 1000 if values else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--slowloris", type=int, default=20)
    ap.add_argument("--header-timeout", type=float, default=5)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    server = subprocess.Popen(
        [sys.executable, "-m", "sspsam.cli.main", "serve", "--host", "127.0.0.1", "--port", str(args.port), "--max-upload-mb", "2",
         "--header-timeout", str(args.header_timeout), "--queue-size", "64"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_healthy(args.port)
        mix = requests_mix()
        warm = []
        client_loop(args.port, mix, time.time() + 5, 999, warm, threading.Lock())  # warm-up: every request kind
        rss_before = rss_mb(server.pid)
        records: list = []
        lock = threading.Lock()
        deadline = time.time() + args.seconds
        threads = [threading.Thread(target=client_loop, args=(args.port, mix, deadline, i, records, lock)) for i in range(args.clients)]
        loris = {}
        lt = threading.Thread(target=lambda: loris.setdefault("closed", slowloris(args.port, args.slowloris, args.header_timeout + 3)))
        t0 = time.time()
        for t in threads:
            t.start()
        lt.start()
        for t in threads:
            t.join()
        lt.join()
        elapsed = time.time() - t0
        time.sleep(2)
        rss_after = rss_mb(server.pid)
        c = http.client.HTTPConnection("127.0.0.1", args.port, timeout=10)
        c.request("GET", "/healthz")
        health = c.getresponse()
        health_body = json.loads(health.read())
    finally:
        server.terminate()
        server.wait(30)

    statuses = Counter(str(s) for _, s, _ in records)
    five = sum(n for s, n in statuses.items() if s.startswith("5") and s != "503")
    busy = statuses.get("503", 0)
    dropped = sum(n for s, n in statuses.items() if s.startswith("dropped"))
    closed = statuses.get("closed:oversize", 0)
    valid = [d for label, s, d in records if label.startswith("valid") and s == 200]
    hostile = [d for label, s, d in records if label.startswith("hostile") and isinstance(s, int)]
    hostile_ok = Counter(s for label, s, _ in records if label.startswith("hostile"))
    figures = {
        "clients": args.clients, "seconds": round(elapsed, 1), "requests": len(records),
        "requests_per_s": round(len(records) / elapsed, 1), "statuses": dict(sorted(statuses.items())),
        "5xx_other_than_503": five, "deliberate_503": busy, "dropped_connections": dropped,
        "oversize_closed_before_read": closed,
        "valid_200": len(valid), "valid_p50_ms": round(pct(valid, 50), 1), "valid_p99_ms": round(pct(valid, 99), 1),
        "hostile_p50_ms": round(pct(hostile, 50), 1), "hostile_p99_ms": round(pct(hostile, 99), 1),
        "hostile_statuses": dict(sorted((str(k), v) for k, v in hostile_ok.items())),
        "rss_before_mb": round(rss_before, 1), "rss_after_mb": round(rss_after, 1),
        "rss_growth_pct": round(100 * (rss_after - rss_before) / rss_before, 2),
        "healthz_after": f"{health.status} {health_body.get('status')}",
        "slowloris_closed_by_server": f"{loris.get('closed', 0)}/{args.slowloris}",
    }
    for k, v in figures.items():
        print(f"{k:>28}: {v}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    ok = five == 0 and dropped == 0 and figures["rss_growth_pct"] < 10 and health.status == 200
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
