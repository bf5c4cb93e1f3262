"""The HTTP service, over real sockets: uvicorn serves the app in a thread on 127.0.0.1:<random>.

Two servers: one with the bundled shapes-demo model (answers are compared with the Python API),
one with a stub model that blocks on an event, which makes the full queue (503), the timeout
(504) and micro-batching deterministic.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import socket
import threading
import time

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image

from sspsam.data.shapes import make_scene
from sspsam.io.masks import decode_rle
from sspsam.predict.results import Segmentation
from sspsam.predict.segmenter import Segmenter
from sspsam.serve import create_app

PHRASES = ["red circle", "the blue square", "green triangle on the left"]


# ---- helpers shared with test_browser.py ---------------------------------------------------------


@contextlib.contextmanager
def running_server(app, startup_s: float = 60.0):
    """Serve ``app`` with uvicorn in a thread on a free 127.0.0.1 port; yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def scene_png(seed: int = 3) -> tuple[np.ndarray, bytes]:
    rgb = make_scene(seed).render()
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return rgb, buf.getvalue()


def make_ovss():
    """The real bundled OVSS model (tiny ESC-Net trained on generated shapes)."""
    from sspsam.predict.ovss import OVSS

    return OVSS.from_pretrained("ovss-shapes-demo")


# ---- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ovss_model():
    return make_ovss()


@pytest.fixture(scope="module")
def server(ovss_model):
    app = create_app(model="shapes-demo", ovss=ovss_model, max_upload_mb=0.2, max_classes=8, timeout_s=60)
    with running_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def reference():
    """A separate Segmenter for expected answers (the server's own one belongs to its worker thread)."""
    return Segmenter.from_pretrained("shapes-demo")


class BlockingSegmenter:
    """Holds every call until ``release`` is set; records the phrases of each call."""

    name = "blocking-stub"

    def __init__(self):
        self.entered, self.release = threading.Event(), threading.Event()
        self.calls: list[list[str]] = []

    def segment(self, image, phrases):
        self.calls.append(list(phrases))
        self.entered.set()
        self.release.wait(30)
        if "explode" in phrases:
            raise RuntimeError("the model broke")
        h, w = image.shape[:2]
        n = len(phrases)
        return Segmentation(list(phrases), np.zeros((n, h, w), bool), np.full(n, 0.5), np.zeros(n, bool))


@pytest.fixture(scope="module")
def stub():
    seg = BlockingSegmenter()
    app = create_app(segmenter=seg, ovss_model=None, queue_size=2, max_batch=8, timeout_s=1.0)
    with running_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        seg.client = client
        yield seg
        seg.release.set()


def _post(client: httpx.Client, png: bytes, phrases, path="/v1/segment", field="phrases", **data):
    return client.post(path, files={"image": ("scene.png", png, "image/png")}, data={field: phrases, **data})


def _error(resp, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["message"] and err["request_id"] == resp.headers["x-request-id"]
    if code:
        assert err["code"] == code
    return err


def _still_answers(client: httpx.Client) -> None:
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"


# ---- answers -----------------------------------------------------------------------------------


def test_segment_one_phrase_matches_python_api(server, reference):
    rgb, png = scene_png()
    r = _post(server, png, PHRASES[0])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["image_size"] == list(rgb.shape[:2]) and body["model"] == "shapes-demo"
    (item,) = body["results"]
    want = reference.segment(rgb, PHRASES[0])
    got = decode_rle(item["rle"])
    assert got.shape == rgb.shape[:2]
    assert np.array_equal(got, want.masks[0]) and item["area"] == int(want.masks[0].sum())
    assert item["score"] == pytest.approx(float(want.scores[0]), abs=1e-6)
    assert item["no_target"] == bool(want.no_target[0])


def test_segment_many_phrases_json_body_and_overlay(server, reference):
    rgb, png = scene_png(5)
    r = server.post("/v1/segment", json={"image": base64.b64encode(png).decode(), "phrases": PHRASES, "overlay": True})
    assert r.status_code == 200, r.text
    body = r.json()
    want = reference.segment(rgb, PHRASES)
    assert [x["phrase"] for x in body["results"]] == PHRASES
    for item, mask in zip(body["results"], want.masks):
        assert np.array_equal(decode_rle(item["rle"]), mask)
    assert any(x["area"] > 0 for x in body["results"]), "the demo model should find something in its own scenes"
    overlay = Image.open(io.BytesIO(base64.b64decode(body["overlay_png"])))
    from sspsam.io.masks import overlay_scale

    k = overlay_scale(*rgb.shape[:2])  # a small image is drawn enlarged so its labels can be read
    assert overlay.height == k * rgb.shape[0] and overlay.width > k * rgb.shape[1]  # the image, then the legend panel


def test_ovss_label_map_and_shares(server, ovss_model):
    rgb, png = scene_png(7)
    classes = ["circle", "square", "triangle", "background"]
    r = _post(server, png, ", ".join(classes), path="/v1/ovss", field="classes")
    assert r.status_code == 200, r.text
    body = r.json()
    want = np.asarray(ovss_model.segment(rgb, classes).labels)
    assert body["classes"] == classes and body["image_size"] == list(rgb.shape[:2])
    label_img = Image.open(io.BytesIO(base64.b64decode(body["label_png"])))
    assert label_img.mode == "P"  # a palette PNG: viewers show colours, the values stay class indices
    labels = np.asarray(label_img)
    assert np.array_equal(labels.astype(np.int64), np.where(want < 0, 255, want))
    assert sum(body["shares"].values()) == pytest.approx(1.0, abs=1e-3)
    for m in body["masks"]:
        assert np.array_equal(decode_rle(m["rle"]), want == m["index"]) and m["class"] == classes[m["index"]]


def test_healthz_models_openapi_docs_page(server):
    assert server.get("/healthz").json()["status"] == "ok"
    models = server.get("/v1/models").json()
    assert models["segment"]["name"] == "shapes-demo" and models["ovss"]["name"]
    assert models["limits"]["max_classes"] == 8
    spec = server.get("/openapi.json").json()
    assert {"/v1/segment", "/v1/ovss", "/healthz", "/v1/models"} <= set(spec["paths"])
    assert set(spec["paths"]["/v1/segment"]["post"]["requestBody"]["content"]) == {"multipart/form-data", "application/json"}
    docs = server.get("/docs")
    assert docs.status_code == 200 and "/v1/segment" in docs.text
    assert "<script" not in docs.text and "cdn" not in docs.text.lower()
    page = server.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text and "//cdn" not in page.text
    assert server.get("/static/app.js").status_code == 200


def test_json_log_line_per_request(server):
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("sspsam.serve").addHandler(handler)
    try:
        r = server.get("/v1/models", headers={"X-Request-ID": "req-abc-123"})
        assert r.headers["x-request-id"] == "req-abc-123"
        deadline = time.monotonic() + 5
        while not lines and time.monotonic() < deadline:  # logged once the response is sent
            time.sleep(0.01)
    finally:
        logging.getLogger("sspsam.serve").removeHandler(handler)
    entry = json.loads(lines[0])
    assert entry["request_id"] == "req-abc-123" and entry["method"] == "GET" and entry["path"] == "/v1/models"
    assert entry["status"] == 200 and entry["ms"] >= 0


# ---- errors: each is a clear JSON answer and the server carries on -----------------------------------


def test_corrupt_and_missing_image(server):
    _, png = scene_png()
    _error(_post(server, b"this is not an image", "red circle"), 400, "bad_image")
    _error(_post(server, png[: len(png) // 2], "red circle"), 400, "bad_image")  # truncated PNG
    _error(server.post("/v1/segment", json={"image": "%%% not base64", "phrase": "x"}), 400, "bad_request")
    _error(server.post("/v1/segment", data={"phrases": "red circle"}, files={"other": ("a", b"x")}), 422, "missing_field")
    _error(server.post("/v1/segment", json={"phrase": "red circle"}), 422, "missing_field")
    _error(server.post("/v1/segment", content=b"{not json", headers={"content-type": "application/json"}), 400, "bad_request")
    _error(server.post("/v1/segment", content=b"abc", headers={"content-type": "text/plain"}), 415)
    _still_answers(server)


def test_empty_or_missing_phrase_and_bad_classes(server):
    _, png = scene_png()
    assert "empty phrase" in _error(_post(server, png, "   "), 422, "invalid_field")["message"]
    _error(server.post("/v1/segment", files={"image": ("s.png", png, "image/png")}), 422, "missing_field")
    too_many = ",".join(f"class {i}" for i in range(9))
    assert "at most 8" in _error(_post(server, png, too_many, path="/v1/ovss", field="classes"), 422)["message"]
    _error(_post(server, png, " , ,", path="/v1/ovss", field="classes"), 422, "invalid_field")
    r = _post(server, png, "circle,,square,", path="/v1/ovss", field="classes")  # empties dropped, as the library does
    assert r.status_code == 200 and r.json()["classes"] == ["circle", "square"]
    _still_answers(server)


def test_oversized_upload_is_refused(server):
    big = bytes(300_000)  # limit is 0.2 MB
    r = server.post("/v1/segment", files={"image": ("big.png", big, "image/png")}, data={"phrases": "x"})
    assert "over the 0.2 MB limit" in _error(r, 413, "too_large")["message"]

    def chunks():  # no Content-Length: the limit has to hold while the body streams in
        for _ in range(30):
            yield bytes(10_000)

    r = server.post("/v1/segment", content=chunks(), headers={"content-type": "application/json"})
    _error(r, 413, "too_large")
    _still_answers(server)
    _, png = scene_png()
    assert _post(server, png, "red circle").status_code == 200


def test_full_queue_answers_503_with_retry_after_then_micro_batches(stub):
    client = stub.client
    _, png = scene_png()
    stub.release.clear()
    stub.entered.clear()
    stub.calls.clear()
    results: dict[str, httpx.Response] = {}

    def send(tag):
        results[tag] = _post(client, png, f"phrase {tag}")

    threads = [threading.Thread(target=send, args=("a",))]
    threads[0].start()
    assert stub.entered.wait(10), "the first request never reached the model"
    for tag in ("b", "c"):  # these two wait in the queue (queue_size=2)
        threads.append(threading.Thread(target=send, args=(tag,)))
        threads[-1].start()
    deadline = time.monotonic() + 10
    while client.get("/healthz").json()["queued"] < 2:
        assert time.monotonic() < deadline, "requests b and c never got queued"
        time.sleep(0.01)
    r = _post(client, png, "phrase d")
    _error(r, 503, "busy")
    assert int(r.headers["retry-after"]) >= 1
    stub.release.set()
    for t in threads:
        t.join(10)
    assert [results[t].status_code for t in "abc"] == [200, 200, 200]
    # b and c came together for the same image: one model call decodes both phrases
    assert len(stub.calls) == 2 and stub.calls[0] == ["phrase a"]
    assert sorted(stub.calls[1]) == ["phrase b", "phrase c"]  # b and c may arrive in either order
    assert [x["phrase"] for x in results["c"].json()["results"]] == ["phrase c"]
    assert _post(client, png, "phrase e").status_code == 200


def test_timeout_answers_504_and_server_recovers(stub):
    client = stub.client
    _, png = scene_png()
    stub.release.clear()
    t0 = time.monotonic()
    _error(_post(client, png, "slow"), 504, "timeout")
    assert time.monotonic() - t0 < 5  # timeout_s=1
    _still_answers(client)
    stub.release.set()
    assert _post(client, png, "fast again").status_code == 200


def test_model_failure_is_a_json_500_and_the_worker_survives(stub):
    client = stub.client
    _, png = scene_png()
    stub.release.set()
    assert "the model broke" in _error(_post(client, png, "explode"), 500, "internal_error")["message"]
    assert _post(client, png, "fine").status_code == 200


def test_models_suggest_examples_the_model_knows(server):
    """The page's examples: the checkpoint's meta example_phrases / example_classes, else the
    built-in list of a bundled demo; the OVSS ones are classes the model was trained on."""
    from importlib import resources
    from types import SimpleNamespace

    import torch

    from sspsam.serve.routes import examples as _examples

    models = server.get("/v1/models").json()
    assert models["segment"]["examples"] and all(isinstance(p, str) and p for p in models["segment"]["examples"])
    ckpt = torch.load(str(resources.files("sspsam") / "assets" / "ovss-shapes-demo.pt"), map_location="cpu", weights_only=False)
    trained = ckpt["classes"]  # the class names the bundled OVSS demo was trained on
    assert set(models["ovss"]["examples"]) <= set(trained) and models["ovss"]["examples"]
    own = SimpleNamespace(name="shapes-demo", meta={"example_phrases": ["the tiny dot"]})
    assert _examples(own, "example_phrases") == ["the tiny dot"]  # the checkpoint's own list wins
    assert _examples(SimpleNamespace(name="my-model", meta={}), "example_phrases") == []


def test_ovss_colours_match_the_label_png_palette(server):
    _, png = scene_png(7)
    classes = ["background", "red", "green", "blue", "yellow"]
    r = _post(server, png, ", ".join(classes), path="/v1/ovss", field="classes")
    body = r.json()
    img = Image.open(io.BytesIO(base64.b64decode(body["label_png"])))
    pal = img.getpalette()
    assert body["colours"] == [pal[3 * i:3 * i + 3] for i in range(len(classes))]
    assert body["colours"][3] == [0, 0, 255] and body["colours"][0] == [128, 128, 128]
