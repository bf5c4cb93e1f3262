"""The sspsam HTTP service: FastAPI in front of one inference thread that micro-batches requests.

The rooms: :mod:`~sspsam.serve.worker` (the inference thread and its queue),
:mod:`~sspsam.serve.routes` (the endpoints), :mod:`~sspsam.serve.payload` (request bodies),
:mod:`~sspsam.serve.schemas` (the JSON in and out, validated), :mod:`~sspsam.serve.middleware`
(body limits, slow clients, origins, request ids, logs), :mod:`~sspsam.serve.errors` (the error
shape); this module wires them together.

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

import inspect
import json
from contextlib import asynccontextmanager

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from sspsam import __version__
from sspsam.serve.errors import ApiError, error_response
from sspsam.serve.middleware import RequestMiddleware, log, setup_logging
from sspsam.serve.routes import STATIC, model_dtype, model_name, router
from sspsam.serve.worker import Worker

# Form parsing limits: one file (the image) and a bounded number of text fields. FastAPI takes
# them per app from 0.165; older releases parse with Starlette's defaults (the body limit holds).
FORM_LIMITS = {"max_files": 1, "max_fields": 1000}


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
    setup_logging()
    log.info(json.dumps({"event": "model_loaded", "model": model_name(model), "dtype": model_dtype(model),
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
    setup_logging()
    limits = {"max_upload_mb": max_upload_mb, "timeout_s": timeout_s, "queue_size": queue_size,
              "max_batch": max_batch, "max_classes": max_classes, "max_phrases": max_phrases,
              "max_pixels": max_pixels, "body_timeout_s": body_timeout_s, "upload_timeout_s": upload_timeout_s}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        seg, ov = await run_in_threadpool(load_models, model if segmenter is None else None,
                                          ovss_model if ovss is None else None, device, dtype)
        worker = Worker(seg if segmenter is None else segmenter, ov if ovss is None else ovss, queue_size, max_batch)
        worker.start()
        app.state.worker = worker
        try:
            yield
        finally:
            worker.stop()

    extra = {"form_limits": FORM_LIMITS} if "form_limits" in inspect.signature(FastAPI.__init__).parameters else {}
    app = FastAPI(
        title="sspsam",
        version=__version__,
        description="Language-guided segmentation (SSP-SAM) and open-vocabulary semantic segmentation.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        **extra,
    )
    app.state.settings = {"timeout_s": timeout_s, "max_pixels": max_pixels, "max_phrases": max_phrases,
                          "max_classes": max_classes, "device": device, "limits": limits}
    app.add_middleware(RequestMiddleware, max_body=int(max_upload_mb * 1e6), body_timeout=body_timeout_s,
                       upload_timeout=upload_timeout_s, cors_origins=cors_origins)
    if cors_origins:  # off unless asked for: a page on another origin must not drive this server by default
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"], allow_headers=["*"])
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.include_router(router)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.code, exc.message, request.state.request_id, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), request.state.request_id, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return error_response(422, "invalid_field", _validation_message(exc), request.state.request_id)

    return app


def _validation_message(exc: RequestValidationError) -> str:
    """FastAPI's check of the multipart fields, in one line: a text where the image file belongs,
    or a file where a text belongs."""
    first = (exc.errors() or [{}])[0]
    name = str((first.get("loc") or ("", "body"))[-1])
    if name == "image":
        return "field 'image' must be a file upload, not a text field"
    return f"field '{name}' is invalid: {str(first.get('msg', 'bad value'))[:200]}".replace("\n", " ")
