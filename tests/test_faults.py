"""Faults: a full disk (ENOSPC simulated by patching the writers; benchmarks/faults.py does it on a
real tmpfs), output paths that are files, and a kill in the middle of a batch job."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sspsam.io.checkpoint import atomic_write, save_checkpoint
from sspsam.errors import OutputError


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    save_checkpoint(path, {"model": "x"}, {"w": torch.ones(3)})
    before = path.read_bytes()

    def torch_save_full(obj, f, *a, **k):  # torch reports a full disk as a RuntimeError from its writer
        Path(f).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", torch_save_full)
    with pytest.raises(OutputError, match="cannot write .*model.pt.*nothing was changed"):
        save_checkpoint(path, {"model": "x"}, {"w": torch.zeros(3)})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no temp file left


def test_write_errors_are_named(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError, match="cannot write"):
        atomic_write(tmp_path / "afile" / "out.json", lambda p: Path(p).write_text("{}"))
    with pytest.raises(OutputError, match="No space left"):
        atomic_write(tmp_path / "b.json", _enospc)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def _folder(tmp_path: Path, n: int = 5) -> tuple[Path, Path]:
    src = tmp_path / "imgs"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        arr = np.full((48, 64, 3), 30 * i, np.uint8)
        arr[10:30, 10:40] = rng.integers(0, 255, 3)
        Image.fromarray(arr).save(src / f"{i}.png")
    (tmp_path / "p.txt").write_text("red circle\nblue square\n")
    return src, tmp_path / "p.txt"


def test_batch_full_disk_then_rerun(tmp_path, monkeypatch):
    import sspsam.predict.batch as batch

    src, phrases = _folder(tmp_path)
    ref = batch.run_batch(src, tmp_path / "ref", phrases).results.read_bytes()
    out = tmp_path / "out"
    calls = {"n": 0}

    class FullAfterTwo:  # the third unit's append hits a full disk after writing part of it
        def __init__(self, path, mode, buffering=-1):
            self.fh = open(path, mode, buffering=buffering)
            self.name = self.fh.name

        def write(self, data):
            calls["n"] += 1
            if calls["n"] == 3:
                self.fh.write(bytes(data[:10]))
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.fh.write(data)

        def fileno(self):
            return self.fh.fileno()

        def close(self):
            self.fh.close()

        def read(self, *args):
            return self.fh.read(*args)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.close()

    monkeypatch.setattr(batch, "open", FullAfterTwo, raising=False)
    with pytest.raises(batch.BatchError, match="No space left.*rerun"):
        batch.run_batch(src, out, phrases)
    kept = (out / "results.jsonl").read_bytes()
    assert kept.count(b"\n") == 4 and ref.startswith(kept)  # two whole units, the torn one cut off
    monkeypatch.undo()
    batch.run_batch(src, out, phrases)
    assert (out / "results.jsonl").read_bytes() == ref


def test_batch_output_is_a_file(tmp_path):
    from sspsam.predict.batch import BatchError, run_batch

    src, phrases = _folder(tmp_path, 1)
    (tmp_path / "out").write_text("keep me")
    with pytest.raises(BatchError, match="is a file"):
        run_batch(src, tmp_path / "out", phrases)
    assert (tmp_path / "out").read_text() == "keep me"


def test_batch_sigkill_then_rerun_is_identical(tmp_path):
    """Kill `sspsam batch` once it has written some results; the rerun gives the uninterrupted bytes."""
    src, phrases = _folder(tmp_path, 8)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "sspsam.cli.main", "batch", str(src), "--phrases", str(phrases), "--png"]
    subprocess.run(cmd + ["-o", str(tmp_path / "ref")], env=env, check=True, capture_output=True)
    out = tmp_path / "out"
    p = subprocess.Popen(cmd + ["-o", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = out / "results.jsonl"
    while p.poll() is None and not (results.exists() and results.read_bytes().count(b"\n") >= 4):
        time.sleep(0.01)
    if p.poll() is None:
        p.send_signal(signal.SIGKILL)
    p.wait()
    subprocess.run(cmd + ["-o", str(out)], env=env, check=True, capture_output=True)
    assert results.read_bytes() == (tmp_path / "ref" / "results.jsonl").read_bytes()
    assert not [q for q in out.rglob("*") if q.name.endswith(".tmp")]


# ---- the service under slow clients ----------------------------------------------------------------


class _Stub:
    name = "stub"

    def segment(self, image, texts):  # never reached by these tests
        raise AssertionError


def test_slow_body_gets_408():
    """A body that stops arriving is answered 408 after body_timeout_s, not held open forever."""
    import asyncio

    from sspsam.serve.app import create_app

    app = create_app(segmenter=_Stub(), ovss=None, body_timeout_s=0.3)
    sent = []

    async def main():
        chunks = [{"type": "http.request", "body": b'{"image": "', "more_body": True}]

        async def receive():
            if chunks:
                return chunks.pop()
            await asyncio.sleep(30)  # the client went quiet
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
                 "path": "/v1/segment", "raw_path": b"/v1/segment", "query_string": b"", "root_path": "",
                 "headers": [(b"content-type", b"application/json"), (b"content-length", b"100000")],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "state": {}}
        async with app.router.lifespan_context(app):
            await asyncio.wait_for(app(scope, receive, send), 10)

    asyncio.run(main())
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert start["status"] == 408 and json.loads(body)["error"]["code"] == "body_timeout"


def test_slow_request_head_is_closed():
    """A client that never finishes its request head is disconnected after header_timeout (slowloris)."""
    import socket
    import threading

    import uvicorn

    from sspsam.serve.app import create_app
    from sspsam.serve.protocol import timed_h11

    config = uvicorn.Config(create_app(segmenter=_Stub(), ovss=None), host="127.0.0.1", port=0, log_level="error",
                            http=timed_h11(0.5), lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        slow = socket.create_connection(("127.0.0.1", port))
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        slow.settimeout(10)
        assert slow.recv(1) == b""  # closed by the server, well before our 10 s
        ok = socket.create_connection(("127.0.0.1", port))  # a prompt client is served as usual
        ok.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        ok.settimeout(10)
        assert ok.recv(64).startswith(b"HTTP/1.1 200")
    finally:
        server.should_exit = True
        thread.join(10)
