"""The endpoints. Each reads its settings and the inference worker from ``request.app.state``
(``create_app`` puts them there), so the routes are plain module-level functions."""

from __future__ import annotations

import asyncio
import html
import json
import logging
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import APIRouter, File, Form, Request, Response, UploadFile
from fastapi.responses import FileResponse, HTMLResponse
from starlette.concurrency import run_in_threadpool

from sspsam.errors import ImageLoadError, ImageTooLargeError, ModelOutputError, OutputError, TextError, WorkLimitError
from sspsam.io.masks import class_colours, encode_rle, label_overlay, label_png, segmentation_overlay
from sspsam.predict.ovss import clean_classes
from sspsam.predict.results import clean_phrases
from sspsam.serve import payload as body
from sspsam.serve.errors import ApiError
from sspsam.serve.schemas import ERRORS, Health, Models, OvssJson, OvssResponse, SegmentJson, SegmentResponse, json_body_doc
from sspsam.serve.worker import Job, Worker

log = logging.getLogger("sspsam.serve")
STATIC = Path(__file__).with_name("static")
router = APIRouter()

# What the bundled demo models know, for checkpoints saved before they carried ``example_*`` in meta.
BUILTIN_EXAMPLES = {
    ("shapes-demo", "example_phrases"): ["the blue circle", "the red square", "the triangle on the left", "the green shape"],
    ("ovss-shapes-demo", "example_classes"): ["background", "red", "green", "blue", "yellow"],
}

ImageFile = Annotated[UploadFile | None, File(description="Image file (JPEG, PNG, WebP, TIFF…).")]
Flag = Annotated[str | None, Form(description="true / 1 / yes / on: also return a base64 PNG of the masks drawn on the image.")]


def model_name(model) -> str:
    return str(getattr(model, "name", type(model).__name__))


def model_dtype(model) -> str:
    """The dtype a model runs in, for responses ('float32' for stubs and runtimes without a choice)."""
    return str(getattr(model, "dtype_name", "float32"))


def examples(model, key: str) -> list[str]:
    """Example phrases / classes the page suggests: the checkpoint's own (``meta[key]``), else the
    built-in list for a bundled demo, else none (a general model needs no hint about its domain)."""
    meta = getattr(model, "meta", None)
    if isinstance(meta, dict) and isinstance(meta.get(key), (list, tuple)):
        return [str(x) for x in meta[key]]
    return list(BUILTIN_EXAMPLES.get((model_name(model), key), []))


async def _payload(request: Request, fields: tuple[str, str], image, texts: list[str], overlay, allow_unknown=None):
    ctype = body.content_type(request.headers)
    if ctype == "multipart/form-data":
        return await body.from_form(image, texts, overlay, allow_unknown, fields)
    if ctype == "application/json":
        return body.from_json(await request.body(), fields)
    raise ApiError(415, "unsupported_media_type",
                   f"send multipart/form-data or application/json, not {ctype or 'a body without Content-Type'}")


async def _checked(request: Request, payload: body.Payload, clean, limit_key: str, noun: str):
    """The texts cleaned and counted (422 before the image is decoded), then the image."""
    settings = request.app.state.settings
    try:
        items = clean(payload.texts)
    except TextError as exc:
        raise ApiError(422, "invalid_field", str(exc)) from None
    if len(items) > settings[limit_key]:
        raise ApiError(422, "invalid_field", f"{len(items)} {noun} given; at most {settings[limit_key]} per request")
    rgb, key = await run_in_threadpool(body.decode_image, payload.image, len(items), settings["max_pixels"])
    return items, rgb, key


async def _infer(request: Request, kind: str, rgb: np.ndarray, key: str, texts: list[str], allow_unknown: bool = False):
    worker: Worker = request.app.state.worker
    timeout_s = request.app.state.settings["timeout_s"]
    future = worker.submit(Job(kind, key, rgb, texts, allow_unknown=allow_unknown))
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


async def _rendered(render) -> dict:
    """The response body drawn off the event loop; an overlay too long to draw is the client's 413."""
    try:
        return await run_in_threadpool(render)
    except OutputError as exc:
        raise ApiError(413, "image_too_large", str(exc)) from None


_ANSWER = {"response_model_exclude_unset": True, "responses": ERRORS}


@router.post("/v1/segment", summary="Segment what each phrase refers to",
             description="Multipart form or JSON body. Masks are COCO RLE (compressed string counts, column-major).",
             response_model=SegmentResponse, openapi_extra=json_body_doc(SegmentJson), **_ANSWER)
async def segment(
    request: Request,
    image: ImageFile = None,
    phrases: Annotated[list[str] | None, Form(description="One or more phrases (repeat the field).")] = None,
    phrase: Annotated[list[str] | None, Form(description="The same as 'phrases'.")] = None,
    overlay: Flag = None,
    allow_unknown: Annotated[str | None, Form(description="true: ask the model even phrases with no word it knows.")] = None,
):
    payload = await _payload(request, ("phrases", "phrase"), image, (phrases or []) + (phrase or []), overlay, allow_unknown)
    items, rgb, key = await _checked(request, payload, clean_phrases, "max_phrases", "phrases")
    res = await _infer(request, "segment", rgb, key, items, payload.allow_unknown)

    def render() -> dict:
        out = res.to_json()
        if payload.overlay:
            out["overlay_png"] = body.png_b64(segmentation_overlay(rgb, res.phrases, res.masks, res.scores, res.no_target,
                                                                   res.warnings, res.instances))
        return out

    out = await _rendered(render)
    seg = request.app.state.worker.segmenter
    return {**out, "model": model_name(seg), "dtype": model_dtype(seg), "request_id": request.state.request_id}


@router.post("/v1/ovss", summary="Label every pixel with one of the given classes",
             description="Multipart form or JSON body. label_png: palette PNG, pixel = index into classes "
                         "(255 / 65535 = unlabelled); masks: COCO RLE per class present.",
             response_model=OvssResponse, openapi_extra=json_body_doc(OvssJson), **_ANSWER)
async def ovss(
    request: Request,
    image: ImageFile = None,
    classes: Annotated[list[str] | None, Form(description="Class names: repeat the field, or one comma-separated string.")] = None,
    class_: Annotated[list[str] | None, Form(alias="class", description="The same as 'classes'.")] = None,
    overlay: Flag = None,
):
    worker: Worker = request.app.state.worker
    if worker.ovss is None:
        raise ApiError(503, "unavailable", "this server runs without an OVSS model (start it with --ovss-model)")
    payload = await _payload(request, ("classes", "class"), image, (classes or []) + (class_ or []), overlay)
    items, rgb, key = await _checked(request, payload, clean_classes, "max_classes", "classes")
    if hasattr(worker.ovss, "check_cost"):  # before the queue: a request the model cannot finish in time waits for nothing
        try:
            worker.ovss.check_cost(rgb.shape[:2], len(items))
        except WorkLimitError as exc:
            raise ApiError(413, "too_much_work", str(exc)) from None
    res = await _infer(request, "ovss", rgb, key, items)

    def render() -> dict:
        labels = np.asarray(res.labels)
        out = res.to_json()
        out["label_png"] = body.png_b64(label_png(labels, list(res.classes)))
        out["colours"] = [list(c) for c in class_colours(list(res.classes))]  # the overlay's and label PNG's
        masks = [(i, c, labels == i) for i, c in enumerate(res.classes)]
        masks = [(i, c, m) for i, c, m in masks if m.any()]
        out["masks"] = [{"index": i, "class": c, "share": float(res.shares.get(c, m.mean())), "area": int(m.sum()),
                         "rle": encode_rle(m)} for i, c, m in masks]
        if payload.overlay:
            out["overlay_png"] = body.png_b64(label_overlay(rgb, labels, list(res.classes), out.get("shares"),
                                                            warnings=res.warnings))
        return out

    out = await _rendered(render)
    return {**out, "model": model_name(worker.ovss), "dtype": model_dtype(worker.ovss), "request_id": request.state.request_id}


@router.head("/healthz", include_in_schema=False)
@router.get("/healthz", summary="Liveness: 200 while the inference thread runs, else 503", response_model=Health)
async def healthz(request: Request, response: Response):
    worker: Worker = request.app.state.worker
    response.status_code = 200 if worker.alive else 503
    return {"status": "ok" if worker.alive else "down", "queued": worker.queue.qsize(),
            "queue_size": worker.queue.maxsize, **worker.stats}


def _model_info(model, device: str, key: str) -> dict:
    return {"name": model_name(model), "device": str(getattr(model, "device", device)), "dtype": model_dtype(model),
            "examples": examples(model, key)}


@router.head("/v1/models", include_in_schema=False)
@router.get("/v1/models", summary="The loaded models and the request limits", response_model=Models)
async def models(request: Request):
    worker: Worker = request.app.state.worker
    settings = request.app.state.settings
    return {"segment": _model_info(worker.segmenter, settings["device"], "example_phrases"),
            "ovss": None if worker.ovss is None else _model_info(worker.ovss, settings["device"], "example_classes"),
            "limits": settings["limits"]}


@router.get("/docs", include_in_schema=False)
async def docs(request: Request):
    return HTMLResponse(docs_page(request.app.openapi()))


@router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
async def index():
    return FileResponse(STATIC / "index.html")


def docs_page(spec: dict) -> str:
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
