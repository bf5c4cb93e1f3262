"""The sspsam HTTP service: FastAPI in front of one inference thread that micro-batches requests.

Why one thread: the model is not thread-safe (the Segmenter caches one image embedding) and on a
CPU or a single GPU parallel calls only fight over the same cores. Requests are queued (bounded:
a full queue answers 503 with ``Retry-After`` instead of letting latency grow without limit); the
thread takes everything waiting (up to ``max_batch`` requests), groups it by image hash and runs
each image once with the phrases of all its requests, so N clients asking about the same image
pay for one image encoding.

Kept over Ray Serve's @serve.batch / LitServe (measured with benchmarks/serve_load.py, shapes-demo, 20 clients, 15 s, 2 busy CPU cores): the batching is the ~80 lines of ``_Worker`` and its same-image grouping would stay ours under either; the same endpoint on Ray Serve 2.60 served 23.6 req/s (p50 839 ms) against 25.6 (750 ms) here, but took 34.5 s instead of 12.9 s to start and ran 11 processes in ~1.8 GiB instead of 1 in 0.45 GiB; Ray Serve pays off once replicas span GPUs or machines.

Endpoints (see ``/docs`` or ``/openapi.json``)::

    POST /v1/segment   multipart (file ``image``, fields ``phrases``/``phrase``, ``overlay``)
                       or JSON {"image": base64, "phrases": [...] | "phrase": "...", "overlay": bool}
                       -> {"image_size", "results": [{"phrase","score","no_target","area","rle"}], ...}
    POST /v1/ovss      the same with ``classes`` (a list, or one comma-separated string; names are
                       cleaned as ``sspsam.predict.ovss.clean_classes`` does: empties and repeats dropped)
                       -> {"image_size","classes","shares","label_png","masks": [{"class","rle",...}]}
    GET  /healthz, GET /v1/models, GET / (web page), GET /docs (no CDN), GET /openapi.json

Masks are COCO RLE with pycocotools' compressed string ``counts`` (column-major, as
``pycocotools.mask.decode`` reads them); the web page decodes that string in JavaScript.
``label_png`` is a base64 PNG whose pixel value is the index into ``classes``: a palette PNG
(8-bit, the overlay's class colours, 255 = unlabelled) up to 255 classes, else 16-bit greyscale
with 65535 = unlabelled.

Errors are JSON ``{"error": {"code", "message", "request_id"}}`` with these statuses:

=====  =========================================================================================
400    ``bad_image`` (bytes are not an image PIL can read), ``bad_request`` (invalid JSON, invalid
       base64, malformed multipart, a Content-Length that is not a byte count, a malformed request)
403    ``forbidden_origin`` (a POST from a browser page on an origin not given to ``--cors-origin``)
413    ``too_large`` (body over ``max_upload_mb``: refused from Content-Length before reading, or
       while streaming), ``image_too_large`` (over the pixel limit, ``SSPSAM_MAX_PIXELS``)
415    ``unsupported_media_type`` (body neither multipart/form-data nor application/json)
408    ``body_timeout`` (the body paused for over ``body_timeout_s``, or did not finish within
       ``upload_timeout_s``: a trickling client)
413    ``image_too_large`` also when pixels × phrases (or classes) exceed ``SSPSAM_MAX_WORK``;
       ``too_much_work`` when an OVSS request's model work (classes × image views × the model's
       per-class cost, in GFLOP) exceeds ``SSPSAM_MAX_OVSS_GFLOP``: refused before it is queued
422    ``missing_field`` / ``invalid_field`` (empty phrase, too many phrases or classes, wrong type)
500    ``model_error`` (the model produced NaN/inf: damaged weights), ``internal_error`` (a bug; the
       server logs the traceback and carries on)
503    ``busy`` (queue full; ``Retry-After`` says when to retry), ``unavailable`` (no OVSS model)
504    ``timeout`` (no answer within ``timeout_s``, counted from when the request was queued)
=====  =========================================================================================

Every request is logged as one JSON object (method, path, status, ms, request_id) on the
``sspsam.serve`` logger; the request id is echoed in ``X-Request-ID`` (a client's own is kept).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures as cf
import html
import io
import json
import logging
import math
import queue
import sys
import threading
import time
import traceback
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from sspsam import __version__
from sspsam.errors import ImageLoadError, ImageTooLargeError, ModelOutputError, OutputError, TextError, WorkLimitError
from sspsam.io.images import load_image
from sspsam.io.masks import class_colours, encode_rle, label_overlay, label_png, segmentation_overlay
from sspsam.predict.ovss import clean_classes
from sspsam.predict.results import Segmentation, clean_phrases
from sspsam.io.transforms import image_key

log = logging.getLogger("sspsam.serve")
STATIC = Path(__file__).with_name("static")
_TRUE = {"1", "true", "yes", "on"}


class ApiError(Exception):
    """An error the client caused or can act on; rendered as the JSON error body."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def _error_response(status: int, code: str, message: str, request_id: str | None, headers=None) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "request_id": request_id}}
    return JSONResponse(body, status_code=status, headers=headers)


# ---- the inference thread ---------------------------------------------------------------------


@dataclass
class _Job:
    kind: str  # "segment" or "ovss"
    key: str  # image hash: jobs with the same key share one image encoding
    rgb: np.ndarray
    texts: list[str]  # cleaned phrases or classes
    future: cf.Future = field(default_factory=cf.Future)
    allow_unknown: bool = False  # ask the model even phrases with no word it knows


def _subset(res: Segmentation, idx: list[int]) -> Segmentation:
    return res.subset(idx)


class _Worker:
    """The single inference thread and its bounded queue."""

    def __init__(self, segmenter, ovss, queue_size: int, max_batch: int):
        self.segmenter, self.ovss = segmenter, ovss
        self.queue: queue.Queue[_Job | None] = queue.Queue(maxsize=queue_size)
        self.max_batch = max_batch
        self.batch_s = 0.1  # moving average of one drain's wall time, for Retry-After
        self.stats = {"batches": 0, "jobs": 0, "model_calls": 0}
        self._thread = threading.Thread(target=self._run, name="sspsam-inference", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        try:
            self.queue.put(None, timeout=timeout)
        except queue.Full:  # the thread is stuck in a model call; it is a daemon, let it go
            return
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def retry_after(self) -> int:
        """Seconds until the queue has probably drained: waiting batches times the recent batch time."""
        return max(1, math.ceil(self.batch_s * (self.queue.qsize() / self.max_batch + 1)))

    def submit(self, job: _Job) -> cf.Future:
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            after = self.retry_after()
            raise ApiError(503, "busy", f"the server is busy ({self.queue.maxsize} requests waiting); retry in {after} s",
                           {"Retry-After": str(after)}) from None
        return job.future

    def _run(self) -> None:
        stopping = False
        while not stopping:
            job = self.queue.get()
            if job is None:
                return
            jobs = [job]
            while len(jobs) < self.max_batch:
                try:
                    nxt = self.queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                    break
                jobs.append(nxt)
            t0 = time.perf_counter()
            # a job whose client timed out is cancelled and skipped here
            self._run_batch([j for j in jobs if j.future.set_running_or_notify_cancel()])
            self.batch_s = 0.8 * self.batch_s + 0.2 * (time.perf_counter() - t0)

    def _run_batch(self, jobs: list[_Job]) -> None:
        self.stats["batches"] += 1
        self.stats["jobs"] += len(jobs)
        groups: dict[tuple, list[_Job]] = {}
        for j in jobs:
            groups.setdefault((j.kind, j.key, j.allow_unknown) if j.kind == "segment" else (j.kind, j.key, tuple(j.texts)), []).append(j)
        for (kind, *_), group in groups.items():
            self.stats["model_calls"] += 1
            try:
                if kind == "segment":
                    phrases = list(dict.fromkeys(p for j in group for p in j.texts))
                    if hasattr(self.segmenter, "surface"):
                        self.segmenter.surface = "http"
                    res = self.segmenter.segment(group[0].rgb, phrases,
                                                 **({"allow_unknown_words": True} if group[0].allow_unknown else {}))
                    index = {p: i for i, p in enumerate(res.phrases)}
                    for j in group:
                        j.future.set_result(_subset(res, [index[p] for p in j.texts]))
                else:
                    res = self.ovss.segment(group[0].rgb, group[0].texts)
                    for j in group:
                        j.future.set_result(res)
            except Exception as exc:  # one bad group must not take the thread (and the others) down
                for j in group:
                    if not j.future.done():
                        j.future.set_exception(exc)


# ---- request parsing ----------------------------------------------------------------------------


@dataclass
class _Payload:
    image: bytes
    texts: Any  # raw phrases or classes as sent
    overlay: bool
    allow_unknown: bool = False


async def _read_payload(request: Request, text_fields: tuple[str, str]) -> _Payload:
    """Multipart or JSON body -> image bytes, the raw text field and the overlay flag."""
    plural, singular = text_fields
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=1000)
        upload = form.get("image")
        if upload is None:
            raise ApiError(422, "missing_field", "missing field 'image': attach the image file as multipart field 'image'")
        if not isinstance(upload, UploadFile):
            raise ApiError(422, "invalid_field", "field 'image' must be a file upload, not a text field")
        data = await upload.read()
        texts = [str(v) for v in form.getlist(plural) + form.getlist(singular)]
        if len(texts) == 1:
            texts = texts[0]
        flag = str(form.get("overlay", "")).strip().lower() in _TRUE
        allow = str(form.get("allow_unknown", "")).strip().lower() in _TRUE
    elif ctype == "application/json":
        body = _parse_json(await request.body())
        if not isinstance(body, dict):
            raise ApiError(422, "invalid_field", "the JSON body must be an object")
        b64 = body.get("image")
        if b64 is None:
            raise ApiError(422, "missing_field", "missing field 'image': base64 of the image file")
        if not isinstance(b64, str):
            raise ApiError(422, "invalid_field", "field 'image' must be a base64 string")
        if b64.startswith("data:") and "," in b64:  # a data URL from a browser
            b64 = b64.split(",", 1)[1]
        try:
            data = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "bad_request", "field 'image' is not valid base64") from None
        texts = body.get(plural, body.get(singular))
        flag = body.get("overlay", False)
        if not isinstance(flag, bool):
            raise ApiError(422, "invalid_field", "field 'overlay' must be true or false")
        allow = body.get("allow_unknown", False)
        if not isinstance(allow, bool):
            raise ApiError(422, "invalid_field", "field 'allow_unknown' must be true or false")
    else:
        raise ApiError(415, "unsupported_media_type",
                       f"send multipart/form-data or application/json, not {ctype or 'a body without Content-Type'}")
    if texts is None or texts == []:
        raise ApiError(422, "missing_field", f"missing field '{plural}': give one or more (or '{singular}')")
    return _Payload(data, texts, flag, allow)


MAX_JSON_DEPTH = 32
MAX_NUMBER_CHARS = 64


def _big_number(text: str):
    raise ValueError(f"a number of {len(text):,} characters (at most {MAX_NUMBER_CHARS})")


def _no_constant(text: str):
    raise ValueError(f"{text} is not JSON")


def _parse_json(raw: bytes) -> Any:
    """json.loads with the hostile cases named: deep nesting, giant numbers, NaN/Infinity, bad UTF-8."""
    try:
        body = json.loads(
            raw,
            parse_int=lambda t: int(t) if len(t) <= MAX_NUMBER_CHARS else _big_number(t),
            parse_float=lambda t: float(t) if len(t) <= MAX_NUMBER_CHARS else _big_number(t),
            parse_constant=_no_constant,
        )
    except RecursionError:
        raise ApiError(400, "bad_request", f"the JSON body is nested too deeply (at most {MAX_JSON_DEPTH} levels)") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise ApiError(400, "bad_request", f"the body is not valid JSON ({str(exc)[:200]})") from None
    stack = [(body, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ApiError(400, "bad_request", f"the JSON body is nested too deeply (at most {MAX_JSON_DEPTH} levels)")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)
    return body


def _decode_image(data: bytes, items: int = 1, max_pixels: int | None = None) -> tuple[np.ndarray, str]:
    if not data:
        raise ApiError(400, "bad_image", "the image is empty (0 bytes)")
    try:
        rgb = load_image(data, items, max_pixels)
    except ImageTooLargeError as exc:
        raise ApiError(413, "image_too_large", str(exc)) from None
    except ImageLoadError as exc:
        raise ApiError(400, "bad_image", str(exc).replace("<bytes>", "the uploaded image")) from None
    return rgb, image_key(rgb)


def _png_b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _label_png(labels: np.ndarray, classes: list[str]) -> str:
    return _png_b64(label_png(labels, classes))


# ---- the ASGI layer around everything -----------------------------------------------------------


def _request_id(raw: bytes | None) -> str:
    rid = raw.decode("latin-1") if raw else ""
    return rid if 0 < len(rid) <= 128 and rid.isprintable() else uuid.uuid4().hex


class _RequestMiddleware:
    """Request id, body-size limit, JSON 500s for unexpected errors and one JSON log line per request.

    Pure ASGI, not ``@app.middleware``: the limit has to wrap ``receive`` to stop a body that
    streams in without (or with a false) Content-Length, and a declared oversize body is refused
    before a byte of it is read.
    """

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
        rid = _request_id(headers.get(b"x-request-id"))
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
                response = _error_response(403, "forbidden_origin",
                                           f"requests from pages on {foreign[:100]} are not allowed (start the server "
                                           "with --cors-origin to allow that page)", rid)
                await response(scope, receive, send_with_id)
                return
            declared = headers.get(b"content-length")
            if declared is not None and not declared.strip().isdigit():
                response = _error_response(400, "bad_request", "Content-Length must be a whole number of bytes, got "
                                           f"{declared[:40].decode('latin-1')!r}", rid, {"Connection": "close"})
                await response(scope, receive, send_with_id)
                return
            if declared is not None and int(declared) > self.max_body:
                if int(declared) <= self._drain_cap():  # read and drop it, so the client sees the 413, not a reset
                    received += await self._drain(receive)
                response = _error_response(413, "too_large",
                                           f"the body is {int(declared):,} bytes, over the {self._limit_text()} limit", rid,
                                           {"Connection": "close"})
                await response(scope, receive, send_with_id)
                return
            await self.app(scope, limited_receive, send_with_id)
        except Exception as exc:  # a bug or a model failure: a JSON 500 with the request id, the traceback logged
            if started:
                raise
            log.error(json.dumps({"request_id": rid, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}))
            response = _error_response(500, "internal_error", f"{type(exc).__name__}: {exc}", rid)
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


def _setup_logging() -> None:
    if not log.handlers:  # one JSON object per line on stderr, without logging's own prefix
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


# ---- OpenAPI documentation ------------------------------------------------------------------------


class SegmentInstance(BaseModel):
    bbox: list[float]  # COCO [x, y, width, height], original pixels
    bbox_xyxy: list[float]  # x0, y0, x1, y1; x1/y1 one past the last pixel
    score: float
    area: int
    rle: dict


class SegmentResult(BaseModel):
    phrase: str
    score: float
    no_target: bool
    area: int
    rle: dict
    bbox: list[float] | None = None  # COCO [x, y, width, height] of the whole mask; null when empty
    instances: list[SegmentInstance] = []


class SegmentResponse(BaseModel):
    image_size: list[int]
    results: list[SegmentResult]
    model: str
    dtype: str = "float32"  # what the model ran in: float32, bfloat16 or float16
    request_id: str
    overlay_png: str | None = None


class OvssResponse(BaseModel):
    image_size: list[int]
    classes: list[str]
    shares: dict[str, float]
    label_png: str
    colours: list[list[int]] | None = None
    masks: list[dict]
    model: str
    dtype: str = "float32"
    request_id: str
    overlay_png: str | None = None


class ErrorResponse(BaseModel):
    error: dict


def _body_doc(text_field: str, text_doc: str) -> dict:
    fields = {
        "image": {"type": "string", "format": "binary", "description": "Image file (JPEG, PNG, WebP, TIFF…)."},
        text_field: {"type": "array", "items": {"type": "string"}, "description": text_doc},
        "overlay": {"type": "boolean", "description": "Also return a base64 PNG of the masks drawn on the image."},
    }
    json_fields = {**fields, "image": {"type": "string", "description": "base64 of the image file (a data: URL works)"}}
    return {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["image", text_field], "properties": fields}},
        "application/json": {"schema": {"type": "object", "required": ["image", text_field], "properties": json_fields}},
    }}}


_ERRORS = {code: {"model": ErrorResponse} for code in (400, 413, 415, 422, 503, 504)}


def _docs_page(spec: dict) -> str:
    """A plain HTML rendering of the OpenAPI spec: FastAPI's Swagger page would load its JS from a CDN."""
    rows = []
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            bodies = ", ".join(op.get("requestBody", {}).get("content", {}))
            codes = ", ".join(op.get("responses", {}))
            rows.append(
                f"<tr><td><code>{method.upper()}</code></td><td><code>{html.escape(path)}</code></td>"
                f"<td>{html.escape(op.get('summary', ''))}<br><small>{html.escape(op.get('description', ''))}</small></td>"
                f"<td>{html.escape(bodies)}</td><td>{html.escape(codes)}</td></tr>"
            )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(spec['info']['title'])} API</title>"
        "<link rel='stylesheet' href='/static/style.css'></head><body class='docs'>"
        f"<h1>{html.escape(spec['info']['title'])} {html.escape(spec['info']['version'])}</h1>"
        "<p>Machine-readable spec: <a href='/openapi.json'>/openapi.json</a>. Try it on <a href='/'>the web page</a>.</p>"
        "<table><tr><th>Method</th><th>Path</th><th>What</th><th>Body</th><th>Statuses</th></tr>"
        + "".join(rows) + "</table></body></html>"
    )


# ---- the app ----------------------------------------------------------------------------------


def load_models(model: str | None, ovss_model: str | None, device: str = "cpu", dtype: str = "auto"):
    """(Segmenter or None, OVSS or None), warmed up: the first call through a model is several times slower.
    What ``dtype="auto"`` picked is logged once per model, so an operator sees it at start-up."""
    seg = ovss = None
    if model:
        from sspsam.predict.segmenter import Segmenter

        seg = Segmenter.from_pretrained(model, device=device, dtype=dtype)
        seg.segment(np.full((64, 64, 3), 128, np.uint8), "warm up")
        _log_dtype(seg)
    if ovss_model:
        from sspsam.predict.ovss import OVSS

        ovss = OVSS.from_pretrained(ovss_model, device=device, dtype=dtype)
        _log_dtype(ovss)
        ovss.unit_gflop()  # counted now, so a request's work check is arithmetic on the event loop
    return seg, ovss


def _log_dtype(model) -> None:
    _setup_logging()
    log.info(json.dumps({"event": "model_loaded", "model": _name(model), "dtype": _dtype(model),
                         "dtype_reason": getattr(model, "dtype_reason", None)}))


def create_app(
    model: str = "shapes-demo",
    ovss_model: str | None = "ovss-shapes-demo",
    device: str = "cpu",
    max_upload_mb: float = 20.0,
    timeout_s: float = 30.0,
    queue_size: int = 64,
    max_batch: int = 16,
    max_classes: int = 256,
    max_phrases: int = 64,
    segmenter=None,
    ovss=None,
    body_timeout_s: float = 30.0,
    cors_origins: list[str] | None = None,
    max_pixels: int = 25_000_000,
    upload_timeout_s: float = 120.0,
    dtype: str = "auto",
) -> FastAPI:
    """The service. Models load once at start-up (lifespan), unless ready objects are passed in
    (``segmenter``/``ovss``: anything with the Segmenter / OVSS ``segment`` method, e.g. test stubs).
    ``ovss_model=None`` (and no ``ovss``) runs without the OVSS endpoint (it answers 503)."""
    if queue_size < 1 or max_batch < 1 or timeout_s <= 0 or max_upload_mb <= 0:
        raise ValueError("queue_size and max_batch must be >= 1, timeout_s and max_upload_mb > 0")
    _setup_logging()
    limits = {"max_upload_mb": max_upload_mb, "timeout_s": timeout_s, "queue_size": queue_size,
              "max_batch": max_batch, "max_classes": max_classes, "max_phrases": max_phrases,
              "max_pixels": max_pixels, "body_timeout_s": body_timeout_s, "upload_timeout_s": upload_timeout_s}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        seg, ov = await run_in_threadpool(load_models, model if segmenter is None else None,
                                          ovss_model if ovss is None else None, device, dtype)
        worker = _Worker(seg if segmenter is None else segmenter, ov if ovss is None else ovss, queue_size, max_batch)
        worker.start()
        app.state.worker = worker
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(
        title="sspsam",
        version=__version__,
        description="Language-guided segmentation (SSP-SAM) and open-vocabulary semantic segmentation.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.add_middleware(_RequestMiddleware, max_body=int(max_upload_mb * 1e6), body_timeout=body_timeout_s,
                       upload_timeout=upload_timeout_s, cors_origins=cors_origins)
    if cors_origins:  # off unless asked for: a page on another origin must not drive this server by default
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"], allow_headers=["*"])
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return _error_response(exc.status, exc.code, exc.message, request.state.request_id, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error_response(exc.status_code, code, str(exc.detail), request.state.request_id, exc.headers)

    async def _infer(request: Request, kind: str, rgb: np.ndarray, key: str, texts: list[str], allow_unknown: bool = False):
        worker: _Worker = request.app.state.worker
        future = worker.submit(_Job(kind, key, rgb, texts, allow_unknown=allow_unknown))
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout_s)
        except asyncio.TimeoutError:
            future.cancel()  # still queued: the worker skips it
            raise ApiError(504, "timeout", f"no answer within {timeout_s:g} s; the server is overloaded or the image is huge") from None
        except TextError as exc:  # the model's own check of the phrases or classes
            raise ApiError(422, "invalid_field", str(exc)) from None
        except ImageTooLargeError as exc:
            raise ApiError(413, "image_too_large", str(exc)) from None
        except WorkLimitError as exc:
            raise ApiError(413, "too_much_work", str(exc)) from None
        except ImageLoadError as exc:
            raise ApiError(400, "bad_image", str(exc)) from None
        except ModelOutputError as exc:  # broken weights: the operator's problem, said plainly, logged once per request
            log.error(json.dumps({"request_id": request.state.request_id, "error": str(exc)}))
            raise ApiError(500, "model_error", str(exc)) from None

    async def _parse(request: Request, fields: tuple[str, str], clean, limit: int, noun: str):
        """The body's image and texts, checked: 422 for bad texts before the image is decoded."""
        payload = await _read_payload(request, fields)
        try:
            items = clean(payload.texts)
        except TextError as exc:
            raise ApiError(422, "invalid_field", str(exc)) from None
        if len(items) > limit:
            raise ApiError(422, "invalid_field", f"{len(items)} {noun} given; at most {limit} per request")
        rgb, key = await run_in_threadpool(_decode_image, payload.image, len(items), max_pixels)
        return payload, items, rgb, key

    @app.post("/v1/segment", summary="Segment what each phrase refers to",
              description="Masks are COCO RLE (compressed string counts, column-major).",
              response_model=SegmentResponse, responses=_ERRORS,
              openapi_extra=_body_doc("phrases", "One or more phrases (repeat the field; 'phrase' also works)."))
    async def segment(request: Request):
        payload, phrases, rgb, key = await _parse(request, ("phrases", "phrase"), clean_phrases, max_phrases, "phrases")
        res = await _infer(request, "segment", rgb, key, phrases, payload.allow_unknown)

        def render() -> dict:
            out = res.to_json()
            if payload.overlay:
                out["overlay_png"] = _png_b64(segmentation_overlay(rgb, res.phrases, res.masks, res.scores, res.no_target,
                                                                   res.warnings, res.instances))
            return out

        try:
            out = await run_in_threadpool(render)
        except OutputError as exc:  # an overlay too long to draw
            raise ApiError(413, "image_too_large", str(exc)) from None
        seg = request.app.state.worker.segmenter
        return JSONResponse({**out, "model": _name(seg), "dtype": _dtype(seg), "request_id": request.state.request_id})

    @app.post("/v1/ovss", summary="Label every pixel with one of the given classes",
              description="label_png: palette PNG, pixel = index into classes (255 / 65535 = unlabelled); "
                          "masks: COCO RLE per class present.",
              response_model=OvssResponse, responses=_ERRORS,
              openapi_extra=_body_doc("classes", "Class names: repeat the field, or one comma-separated string."))
    async def ovss_endpoint(request: Request):
        worker: _Worker = request.app.state.worker
        if worker.ovss is None:
            raise ApiError(503, "unavailable", "this server runs without an OVSS model (start it with --ovss-model)")
        payload, classes, rgb, key = await _parse(request, ("classes", "class"), clean_classes, max_classes, "classes")
        if hasattr(worker.ovss, "check_cost"):  # before the queue: a request the model cannot finish in time waits for nothing
            try:
                worker.ovss.check_cost(rgb.shape[:2], len(classes))
            except WorkLimitError as exc:
                raise ApiError(413, "too_much_work", str(exc)) from None
        res = await _infer(request, "ovss", rgb, key, classes)

        def render() -> dict:
            labels = np.asarray(res.labels)
            out = res.to_json()
            out["label_png"] = _label_png(labels, list(res.classes))
            out["colours"] = [list(c) for c in class_colours(list(res.classes))]  # the overlay's and label PNG's
            masks = [(i, c, labels == i) for i, c in enumerate(res.classes)]
            masks = [(i, c, m) for i, c, m in masks if m.any()]
            out["masks"] = [{"index": i, "class": c, "share": float(res.shares.get(c, m.mean())), "area": int(m.sum()),
                             "rle": encode_rle(m)} for i, c, m in masks]
            if payload.overlay:
                out["overlay_png"] = _png_b64(label_overlay(rgb, labels, list(res.classes), out.get("shares"),
                                                            warnings=res.warnings))
            return out

        try:
            out = await run_in_threadpool(render)
        except OutputError as exc:  # an overlay too long to draw
            raise ApiError(413, "image_too_large", str(exc)) from None
        return JSONResponse({**out, "model": _name(worker.ovss), "dtype": _dtype(worker.ovss), "request_id": request.state.request_id})

    @app.head("/healthz", include_in_schema=False)
    @app.get("/healthz", summary="Liveness: 200 while the inference thread runs")
    async def healthz(request: Request):
        worker: _Worker = request.app.state.worker
        body = {"status": "ok" if worker.alive else "down", "queued": worker.queue.qsize(),
                "queue_size": worker.queue.maxsize, **worker.stats}
        return JSONResponse(body, status_code=200 if worker.alive else 503)

    @app.head("/v1/models", include_in_schema=False)
    @app.get("/v1/models", summary="The loaded models and the request limits")
    async def models(request: Request):
        worker: _Worker = request.app.state.worker
        seg = {"name": _name(worker.segmenter), "device": str(getattr(worker.segmenter, "device", device)),
               "dtype": _dtype(worker.segmenter),
               "examples": _examples(worker.segmenter, "example_phrases")}
        ov = None if worker.ovss is None else {"name": _name(worker.ovss), "device": str(getattr(worker.ovss, "device", device)),
                                               "dtype": _dtype(worker.ovss),
                                               "examples": _examples(worker.ovss, "example_classes")}
        return {"segment": seg, "ovss": ov, "limits": limits}

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return HTMLResponse(_docs_page(app.openapi()))

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html")

    return app


def _name(model) -> str:
    return str(getattr(model, "name", type(model).__name__))


def _dtype(model) -> str:
    """The dtype a model runs in, for responses ('float32' for stubs and runtimes without a choice)."""
    return str(getattr(model, "dtype_name", "float32"))


# What the bundled demo models know, for checkpoints saved before they carried ``example_*`` in meta.
_BUILTIN_EXAMPLES = {
    ("shapes-demo", "example_phrases"): ["the blue circle", "the red square", "the triangle on the left", "the green shape"],
    ("ovss-shapes-demo", "example_classes"): ["background", "red", "green", "blue", "yellow"],
}


def _examples(model, key: str) -> list[str]:
    """Example phrases / classes the page suggests: the checkpoint's own (``meta[key]``), else the
    built-in list for a bundled demo, else none (a general model needs no hint about its domain)."""
    meta = getattr(model, "meta", None)
    if isinstance(meta, dict) and isinstance(meta.get(key), (list, tuple)):
        return [str(x) for x in meta[key]]
    return list(_BUILTIN_EXAMPLES.get((_name(model), key), []))
