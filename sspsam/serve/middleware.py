"""The ASGI layer around the whole app: request ids, one JSON log line per request, JSON 500s,
and the protection against clients that send too much or too slowly.

Why this is a pure ASGI middleware and not FastAPI parameters or ``@app.middleware``: the limits
have to hold before and while the body arrives, which only wrapping ``receive`` can do.

* Body size. A declared oversize body (Content-Length) is refused before a byte of it is read; a
  body that streams in without (or with a false) Content-Length is cut off at the limit. Reading
  and dropping a refused body up to a bound lets the client see the 413 instead of a reset.
* Slow clients. A client that trickles its body must not hold a connection (and its memory)
  forever: each pause is bounded (``body_timeout``) and so is the whole upload
  (``upload_timeout``: a byte every few seconds passes the first). The request head has its own
  deadline in :mod:`sspsam.serve.protocol`.
* Origins. A browser sends a cross-origin form POST (multipart, no preflight) without asking
  first; CORS headers only keep the answer from the page, not the work from the server, so a POST
  from a page on an origin the server was not started for is refused here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
import traceback
import uuid

from sspsam.serve.errors import ApiError, error_response

log = logging.getLogger("sspsam.serve")


def setup_logging() -> None:
    if not log.handlers:  # one JSON object per line on stderr, without logging's own prefix
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def request_id(raw: bytes | None) -> str:
    """The client's X-Request-ID when it is short and printable, else a fresh one."""
    rid = raw.decode("latin-1") if raw else ""
    return rid if 0 < len(rid) <= 128 and rid.isprintable() else uuid.uuid4().hex


class RequestMiddleware:
    """Request id, origin check, body-size limit, upload deadlines, JSON 500s for unexpected
    errors and one JSON log line per request (see the module docstring for why each is here)."""

    def __init__(self, app, max_body: int, body_timeout: float = 30.0, upload_timeout: float = 120.0,
                 cors_origins: list[str] | None = None):
        self.app, self.max_body, self.body_timeout, self.upload_timeout = app, max_body, body_timeout, upload_timeout
        self.cors_origins = set(cors_origins or ())

    def _foreign_origin(self, scope, headers: dict) -> str | None:
        """The Origin of a state-changing request from a page this server was not configured for.
        A browser sends a cross-origin form POST (multipart, no preflight) without asking first; the
        CORS headers only keep the answer from the page, not the work from the server. Requests
        without an Origin (curl, scripts) and same-origin pages are not affected."""
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return None
        origin = headers.get(b"origin")
        if origin is None:
            return None
        origin = origin.decode("latin-1").rstrip("/")
        host = headers.get(b"host", b"").decode("latin-1")
        if origin == f"{scope.get('scheme', 'http')}://{host}" or origin in self.cors_origins or "*" in self.cors_origins:
            return None
        return origin

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        headers = dict(scope["headers"])
        rid = request_id(headers.get(b"x-request-id"))
        scope.setdefault("state", {})["request_id"] = rid
        status, started = 500, False

        async def send_with_id(message):
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode("latin-1"))]
            await send(message)

        received = 0

        body_done = False
        deadline = time.monotonic() + self.upload_timeout

        async def limited_receive():
            nonlocal received, body_done
            if body_done:  # after the body only a disconnect can come; waiting for it is not a timeout
                return await receive()
            # a client that trickles its body must not hold a connection (and its memory) forever:
            # each pause is bounded, and so is the whole upload (a byte every few seconds passes the first)
            left = deadline - time.monotonic()
            wait = min(self.body_timeout, left)
            try:
                if wait <= 0:
                    raise asyncio.TimeoutError
                message = await asyncio.wait_for(receive(), wait)
            except asyncio.TimeoutError:
                if left <= self.body_timeout:
                    raise ApiError(408, "body_timeout", f"the request body did not finish within the server's "
                                   f"{self.upload_timeout:g} s upload limit", {"Connection": "close"}) from None
                raise ApiError(408, "body_timeout", f"the request body paused for over {self.body_timeout:g} s",
                               {"Connection": "close"}) from None
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    if not body_done:
                        received += await self._drain(receive)
                    raise ApiError(413, "too_large", f"the body is over the {self._limit_text()} limit")
            return message

        try:
            foreign = self._foreign_origin(scope, headers)
            if foreign is not None:
                response = error_response(403, "forbidden_origin",
                                           f"requests from pages on {foreign[:100]} are not allowed (start the server "
                                           "with --cors-origin to allow that page)", rid)
                await response(scope, receive, send_with_id)
                return
            declared = headers.get(b"content-length")
            if declared is not None and not declared.strip().isdigit():
                response = error_response(400, "bad_request", "Content-Length must be a whole number of bytes, got "
                                           f"{declared[:40].decode('latin-1')!r}", rid, {"Connection": "close"})
                await response(scope, receive, send_with_id)
                return
            if declared is not None and int(declared) > self.max_body:
                if int(declared) <= self._drain_cap():  # read and drop it, so the client sees the 413, not a reset
                    received += await self._drain(receive)
                response = error_response(413, "too_large",
                                           f"the body is {int(declared):,} bytes, over the {self._limit_text()} limit", rid,
                                           {"Connection": "close"})
                await response(scope, receive, send_with_id)
                return
            await self.app(scope, limited_receive, send_with_id)
        except Exception as exc:  # a bug or a model failure: a JSON 500 with the request id, the traceback logged
            if started:
                raise
            log.error(json.dumps({"request_id": rid, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}))
            response = error_response(500, "internal_error", f"{type(exc).__name__}: {exc}", rid)
            await response(scope, receive, send_with_id)
        finally:
            log.info(json.dumps({
                "request_id": rid, "method": scope["method"], "path": scope["path"], "status": status,
                "ms": round((time.perf_counter() - t0) * 1000, 2), "bytes_in": received,
            }))

    def _limit_text(self) -> str:
        return f"{self.max_body / 1e6:g} MB"

    def _drain_cap(self) -> int:
        return max(4 * self.max_body, 8 << 20)

    async def _drain(self, receive) -> int:
        """Read and discard the rest of a refused body, up to a bound and within the body timeout.

        Closing a socket with unread bytes in it makes the kernel send a reset, and a client that is
        still writing then gets a connection error instead of the 413 (a race that loses under load).
        Bodies past the bound are cut off: for those the reset is the deliberate answer.
        """
        drained = 0
        try:
            while drained <= self._drain_cap():
                message = await asyncio.wait_for(receive(), self.body_timeout)
                if message["type"] != "http.request":
                    break
                drained += len(message.get("body", b""))
                if not message.get("more_body", False):
                    break
        except asyncio.TimeoutError:
            pass
        return drained
