"""A Hugging Face Hub stand-in on 127.0.0.1: the read side of the Hub's HTTP API that
``huggingface_hub`` uses (repository tree listing, HEAD/GET of ``resolve`` URLs, its error
headers), serving folders as repositories. Tests point ``HF_ENDPOINT`` at it.

Faults on request: ``faults[path] = "get404"`` answers the metadata request but 404s the
download; ``"corrupt"`` sends other bytes than the advertised sha256. ``downloads`` counts GETs
of each file, so a test can tell a cached answer from a fresh download.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LFS_MIN_BYTES = 1024  # files at least this big are served as LFS files (named by their sha256), as the Hub does


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubServer:
    def __init__(self, repos: dict[str, Path]):
        self.repos = {k: Path(v) for k, v in repos.items()}
        self.faults: dict[str, str] = {}
        self.downloads: Counter = Counter()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, str(v))
                if "Content-Length" not in (headers or {}):
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _error(self, code: int, error_code: str, message: str, head: bool = False) -> None:
                body = json.dumps({"error": message}).encode()
                self._send(code, body, {"X-Error-Code": error_code, "X-Error-Message": message,
                                        "Content-Type": "application/json"}, head)

            def _repo(self, owner: str, name: str) -> Path | None:
                return server.repos.get(f"{owner}/{name}")

            def do_GET(self):
                self._handle(head=False)

            def do_HEAD(self):
                self._handle(head=True)

            def _handle(self, head: bool) -> None:
                parts = [unquote(p) for p in urlparse(self.path).path.strip("/").split("/")]
                if len(parts) >= 6 and parts[:2] == ["api", "models"] and parts[4] == "tree":
                    return self._tree(parts[2], parts[3], parts[5], "/".join(parts[6:]), head)
                if len(parts) >= 5 and parts[2] == "resolve":
                    return self._resolve(parts[0], parts[1], parts[3], "/".join(parts[4:]), head)
                self._error(404, "EntryNotFound", f"no route {self.path}", head)

            def _revision_ok(self, rev: str) -> bool:
                return rev in ("main", COMMIT)

            def _tree(self, owner, name, rev, sub, head) -> None:
                root = self._repo(owner, name)
                if root is None:
                    return self._error(404, "RepoNotFound", "Repository not found", head)
                if not self._revision_ok(rev):
                    return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
                entries = []
                for p in sorted((root / sub).rglob("*")):
                    rel = p.relative_to(root).as_posix()
                    if p.is_dir():
                        entries.append({"type": "directory", "oid": "0" * 40, "path": rel})
                        continue
                    data = p.read_bytes()
                    e = {"type": "file", "oid": _git_oid(data), "size": len(data), "path": rel}
                    if len(data) >= LFS_MIN_BYTES:
                        e["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                    entries.append(e)
                self._send(200, json.dumps(entries).encode(), {"Content-Type": "application/json"}, head)

            def _resolve(self, owner, name, rev, path, head) -> None:
                root = self._repo(owner, name)
                if root is None:
                    return self._error(404, "RepoNotFound", "Repository not found", head)
                if not self._revision_ok(rev):
                    return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
                f = root / path
                if not f.is_file():
                    return self._error(404, "EntryNotFound", f"{path} does not exist on {rev}", head)
                data = f.read_bytes()
                headers = {"X-Repo-Commit": COMMIT, "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
                if len(data) >= LFS_MIN_BYTES:
                    sha = hashlib.sha256(data).hexdigest()
                    headers.update({"ETag": f'"{sha}"', "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": len(data)})
                else:
                    headers["ETag"] = f'"{_git_oid(data)}"'
                fault = server.faults.get(path)
                if head:
                    headers["Content-Length"] = len(data)
                    return self._send(200, b"", headers, head=True)
                server.downloads[path] += 1
                if fault == "get404":
                    return self._error(404, "EntryNotFound", f"{path} vanished", False)
                if fault == "corrupt":
                    data = bytes(b ^ 0xFF for b in data[:64]) + data[64:]
                start = 0
                rng = self.headers.get("Range", "")
                if rng.startswith("bytes=") and rng[6:].split("-")[0].isdigit():
                    start = int(rng[6:].split("-")[0])
                body = data[start:]
                headers["Content-Length"] = len(body)
                if start:
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                self._send(206 if start else 200, body, headers)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "HubServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
