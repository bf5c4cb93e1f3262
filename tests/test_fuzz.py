"""Fuzz suite: several hundred seeded hostile inputs through the Python API, the CLI (in process)
and the HTTP app, each run asserting a sensible result or one of sspsam's named errors — never a
traceback, an HTTP 5xx, a partial output file, runaway memory or a hang.

The inputs come from tests/helpers/hostile.py, generated at test time from fixed seeds. At the
end a table (input kind × outcome) is printed in the pytest summary.
"""

from __future__ import annotations

import base64
import json
import math
import resource
import signal
import sys
import traceback
import warnings
from collections import Counter, defaultdict
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
import hostile  # noqa: E402

from sspsam.errors import SSPSamError  # noqa: E402
from conftest import write_report  # noqa: E402

GUARD_S = 120  # per case: generous, only to turn a hang into a failure instead of a stuck suite
MEM_MB = 600  # per case: growth of the process's peak RSS; a decoded bomb would be several GB
# ESC-Net's forward holds class × feature maps (the class-aggregation attention needs all classes at
# once): about 2 MB per class for the bundled 128-px model, so 1000 classes (the API's maximum) peak
# near 2 GB. That is the model's own cost, bounded by MAX_CLASSES; it gets its own ceiling here.
MEM_LIMITS = {("classes", "many-1000"): 3000}
TABLE: dict[tuple[str, str], Counter] = defaultdict(Counter)
FAILURES: list[str] = []
SURFACES_SEEN: set[str] = set()


class Hang(Exception):
    pass


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def _guard():
    def on_alarm(signum, frame):
        raise Hang(f"no answer within {GUARD_S} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(GUARD_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def run(surface: str, case: hostile.Case, fn) -> str:
    """Run one case; record 'ok' / 'named error' / 'crash' / 'hang' / 'memory' / 'bad result'."""
    SURFACES_SEEN.add(surface)
    before = _peak_mb()
    outcome, detail = "ok", ""
    try:
        with _guard(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            verdict = fn(case.value)
        if verdict:  # the function found the result itself wrong (not sensible, partial output…)
            outcome, detail = "bad result", verdict
        elif verdict is None:
            outcome = "ok"
        else:
            outcome = "named error"
    except SSPSamError as exc:
        outcome = "named error"
        if "\n" in str(exc).strip():
            outcome, detail = "bad result", f"multi-line error message: {str(exc)[:200]!r}"
    except Hang as exc:
        outcome, detail = "hang", str(exc)
    except Exception as exc:
        outcome, detail = "crash", "".join(traceback.format_exception_only(type(exc), exc)).strip()[:300]
    grown = _peak_mb() - before
    if grown > MEM_LIMITS.get((case.kind, case.name), MEM_MB) and outcome not in ("crash", "hang"):
        outcome, detail = "memory", f"peak RSS grew {grown:.0f} MB"
    TABLE[(case.kind, surface)][outcome] += 1
    if outcome not in ("ok", "named error"):
        FAILURES.append(f"{surface} {case.kind}/{case.name}: {outcome}: {detail}")
    return outcome


# ---- shared fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models():
    from sspsam.predict.ovss import OVSS
    from sspsam.predict.segmenter import Segmenter

    torch.manual_seed(0)
    return Segmenter.from_pretrained("shapes-demo"), OVSS.from_pretrained("ovss-shapes-demo")


@pytest.fixture(scope="module")
def valid_png() -> bytes:
    return hostile.encode(hostile.scene(__import__("random").Random(7)), "PNG")


@pytest.fixture(autouse=True)
def _own_failures():
    FAILURES.clear()  # each test answers for its own cases
    yield


@pytest.fixture(scope="module", autouse=True)
def summary():
    yield
    outcomes = ["ok", "named error", "crash", "hang", "memory", "bad result"]
    lines = ["", "fuzz summary (runs per input kind × surface × outcome):",
             f"{'kind':<11} {'surface':<8} " + " ".join(f"{o:>11}" for o in outcomes) + f" {'runs':>6}"]
    total = Counter()
    for (kind, surface), c in sorted(TABLE.items()):
        lines.append(f"{kind:<11} {surface:<8} " + " ".join(f"{c[o]:>11}" for o in outcomes) + f" {sum(c.values()):>6}")
        total.update(c)
    lines.append(f"{'total':<20} " + " ".join(f"{total[o]:>11}" for o in outcomes) + f" {sum(total.values()):>6}")
    write_report("fuzz", lines)


def _sensible_segmentation(res, hw) -> str | None:
    if res.masks.shape[1:] != tuple(hw) or res.masks.dtype != bool:
        return f"masks of shape {res.masks.shape} for an image of {hw}"
    if not np.isfinite(res.scores).all() or ((res.scores < 0) | (res.scores > 1)).any():
        return f"scores {res.scores}"
    json.dumps(res.to_json(), allow_nan=False)  # raises on NaN: counted as a crash
    return None


# ---- images ------------------------------------------------------------------------------------------

IMAGE_CASES = hostile.image_cases(seed=0)


def test_images_api(models):
    from sspsam.io.images import load_image

    seg, ovss = models

    def api(value):
        rgb = load_image(value)
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            return f"load_image gave {rgb.dtype} {rgb.shape}"
        res = seg.segment(value if not isinstance(value, Image.Image) else rgb, ["the red circle", "a blue square"])
        bad = _sensible_segmentation(res, rgb.shape[:2])
        if bad:
            return bad
        sem = ovss.segment(rgb, ["red", "green", "background"])
        if sem.labels.shape != rgb.shape[:2] or not math.isclose(sum(sem.shares.values()), 1.0, abs_tol=1e-6):
            return f"labels {sem.labels.shape}, shares summing to {sum(sem.shares.values())}"
        return None

    outcomes = [run("api", c, api) for c in IMAGE_CASES]
    assert not FAILURES, "\n".join(FAILURES)
    assert len(IMAGE_CASES) >= 130
    named = {c.name: o for c, o in zip(IMAGE_CASES, outcomes)}
    # known answers: every mode and format is read; bombs and non-images are refused by name
    assert all(named[f"pil-mode-{m}"] == "ok" for m in hostile.MODES)
    assert all(named[f"jpeg-corrupt-exif-{s}"] == "ok" for s in hostile.EXIF_SEEDS)
    assert named["png-bomb-400MP"] == named["png-bomb-1x200M"] == named["empty-bytes"] == "named error"
    assert named["file-ico-multisize"] == named["file-gif-animated"] == "ok"


def test_ico_uses_largest_size():
    from sspsam.io.images import load_image

    img = Image.new("RGB", (64, 64), (255, 0, 0))
    assert load_image(hostile.encode(img, "ICO", sizes=[(16, 16), (64, 64)])).shape == (64, 64, 3)


def test_pixel_budget_depends_on_the_work(monkeypatch):
    """A header within the pixel cap but over pixels × phrases is refused before decoding."""
    import sspsam.io.images as imageio
    from sspsam.errors import ImageTooLargeError

    monkeypatch.setattr(imageio, "MAX_WORK", 10_000_000)
    data = hostile.declared_png(3000, 3000)  # 9 MP: one phrase fits, two do not
    before = _peak_mb()
    with pytest.raises(ImageTooLargeError, match="pixel-outputs"):
        imageio.load_image(data, items=2)
    assert _peak_mb() - before < 50  # refused from the header, nothing decoded
    assert imageio.load_image(data, items=1).shape == (3000, 3000, 3)


def test_images_cli(tmp_path, valid_png, monkeypatch):
    from typer.testing import CliRunner

    from sspsam.cli.main import app

    _cache_bundled(monkeypatch)
    runner = CliRunner()
    files = [c for c in IMAGE_CASES if isinstance(c.value, bytes)]
    ext = {b"\x89PNG": ".png", b"\xff\xd8": ".jpg", b"GIF8": ".gif", b"BM": ".bmp", b"II*\x00": ".tif", b"RIFF": ".webp"}

    def cli(data, name):
        suffix = next((e for magic, e in ext.items() if data.startswith(magic)), ".png")
        src = tmp_path / "in" / f"{name}{suffix}"
        src.parent.mkdir(exist_ok=True)
        src.write_bytes(data)
        out = tmp_path / "out" / name
        return _cli_check(runner, app, ["segment", str(src), "the red circle", "a blue square", "-o", str(out)], out, 4)

    for i, c in enumerate(files):
        run("cli", c, lambda v, n=f"{i:03d}-{c.name}": cli(v, n))
    # a file that cannot be read, and a name full of Rich markup
    unreadable = tmp_path / "in" / "[bold]locked[red].png"
    unreadable.write_bytes(valid_png)
    unreadable.chmod(0)
    out = tmp_path / "out" / "locked"
    verdict = _cli_check(runner, app, ["segment", str(unreadable), "x", "-o", str(out)], out, 2)
    if Path("/proc/self/status").read_text().find("Uid:\t0\t") < 0:  # root reads anything
        assert verdict is False
    assert not FAILURES, "\n".join(FAILURES)


def _cli_check(runner, app, args, out: Path, n_files: int):
    """Run a CLI command in process: exit 0 with every output file, or a one-line error and no files."""
    res = runner.invoke(app, args, catch_exceptions=True)
    text = res.output
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception  # counted as a crash
    if "Traceback" in text:
        return f"traceback in output: {text[-300:]}"
    leftovers = [p.name for p in out.rglob("*.tmp")] if out.exists() else []
    if leftovers:
        return f"partial files left: {leftovers}"
    written = sorted(p.name for p in out.iterdir()) if out.exists() else []
    if res.exit_code == 0:  # n_files None: one mask per distinct phrase name, an overlay and the JSON
        complete = len(written) == n_files if n_files is not None else len(written) >= 3 and any(w.endswith(".json") for w in written)
        return None if complete else f"exit 0 but wrote {written}"
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    if res.exit_code not in (1, 2) or len(errors) != 1:
        return f"exit {res.exit_code} with output {text[-300:]!r}"
    if written:
        return f"failed but left {written}"
    return False  # a named error


_BUNDLED_CACHE: dict = {}


def _cache_bundled(monkeypatch):
    """The CLI loads its model per call; for bundled names reuse one (checkpoint cases load for real)."""
    from sspsam.predict.ovss import OVSS
    from sspsam.predict.segmenter import Segmenter

    for cls, name in ((Segmenter, "shapes-demo"), (OVSS, "ovss-shapes-demo")):
        real = cls.from_pretrained.__func__

        def cached(klass, name_or_path=name, device="cpu", real=real, bundled=name, **options):
            if str(name_or_path) != bundled:
                return real(klass, name_or_path, device, **options)
            if bundled not in _BUNDLED_CACHE:
                _BUNDLED_CACHE[bundled] = real(klass, name_or_path, device, **options)
            return _BUNDLED_CACHE[bundled]

        monkeypatch.setattr(cls, "from_pretrained", classmethod(cached))


# ---- phrases and classes --------------------------------------------------------------------------------


def test_texts_api_and_cli(models, tmp_path, valid_png, monkeypatch):
    from typer.testing import CliRunner

    from sspsam.cli.main import app

    seg, ovss = models
    rgb = np.asarray(Image.open(__import__("io").BytesIO(valid_png)).convert("RGB"))

    def api_phrases(value):
        res = seg.segment(rgb, value)
        return _sensible_segmentation(res, rgb.shape[:2])

    def api_classes(value):
        sem = ovss.segment(rgb, value)
        return None if sem.labels.shape == rgb.shape[:2] and sem.labels.max() < len(sem.classes) else "labels out of range"

    phrases, classes = hostile.phrase_cases(), hostile.class_cases()
    outcomes = {c.name: run("api", c, api_phrases) for c in phrases}
    for c in classes:
        run("api", c, api_classes)
    assert outcomes["valid-many"] == "ok" and outcomes["int"] == outcomes["dict"] == outcomes["empty-str"] == "named error"

    _cache_bundled(monkeypatch)
    runner = CliRunner()
    src = tmp_path / "valid.png"
    src.write_bytes(valid_png)
    for i, c in enumerate(phrases):
        value = c.value
        if isinstance(value, str):
            args = [value]
        elif isinstance(value, list) and value and all(isinstance(v, str) for v in value) and len(value) <= 300:
            args = value
        else:
            continue  # the CLI only ever receives strings
        if any("\x00" in a for a in args):
            continue  # argv cannot hold NUL
        out = tmp_path / f"out{i}"
        run("cli", c, lambda v, a=args, o=out: _cli_check(runner, app, ["segment", str(src), *a, "-o", str(o)], o, None))
    for i, c in enumerate(classes):
        if isinstance(c.value, str) and "\x00" not in c.value:
            out = tmp_path / f"cls{i}"
            run("cli", c, lambda v, o=out: _cli_check(runner, app, ["ovss", str(src), "--classes", v, "-o", str(o)], o, 3))
    assert not FAILURES, "\n".join(FAILURES)


# ---- checkpoints and configs ------------------------------------------------------------------------------


def test_checkpoints(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from sspsam.cli.main import app
    from sspsam.predict.ovss import OVSS
    from sspsam.predict.segmenter import Segmenter

    assets = Path(__import__("sspsam").__file__).parent / "assets"
    valid = torch.load(assets / "shapes-demo.pt", weights_only=True)
    other = torch.load(assets / "ovss-shapes-demo.pt", weights_only=True)
    marker = tmp_path / "PWNED"
    cases = hostile.checkpoint_cases(valid, other, str(marker))
    img = np.asarray(hostile.scene(__import__("random").Random(3)))
    runner = CliRunner()
    src = tmp_path / "img.png"
    Image.fromarray(img).save(src)

    def api(path):
        res = Segmenter.from_pretrained(str(path)).segment(img, ["the red circle", "x"])
        return _sensible_segmentation(res, img.shape[:2])

    outcomes = {}
    for i, c in enumerate(cases):
        path = tmp_path / f"ckpt{i}.pt"
        path.write_bytes(c.value)
        outcomes[c.name] = run("api", c, lambda v, p=path: api(p))
        run("api-ovss", c, lambda v, p=path: None if OVSS.from_pretrained(str(p)) else None)
        out = tmp_path / f"out{i}"
        run("cli", c, lambda v, p=path, o=out: _cli_check(runner, app, ["segment", str(src), "x", "-m", str(p), "-o", str(o)], o, 3))
    assert not marker.exists(), "a checkpoint ran code while loading"
    assert len(cases) >= 55
    assert outcomes["valid"] == "ok"
    for name in ("other-task", "no-state-dict", "state-dict-list", "state-dict-floats", "version-str", "config-list",
                 "config-clip.vision.width=1000000", "nan-weights", "evil-pickle", "evil-torch",
                 "bitflip-0", "bitflip-1", "bitflip-2"):  # flipped weight bytes fail the zip CRCs
        assert outcomes[name] == "named error", name
    assert not FAILURES, "\n".join(FAILURES)


def test_other_task_message():
    from sspsam.errors import CheckpointError
    from sspsam.predict.segmenter import Segmenter

    with pytest.raises(CheckpointError, match="open-vocabulary.*sspsam ovss"):
        Segmenter.from_pretrained(str(Path(__import__("sspsam").__file__).parent / "assets" / "ovss-shapes-demo.pt"))


def test_configs(tmp_path):
    from sspsam.config import CONFIG_DIR, load_config
    from sspsam.models.build import build_model

    valid = (CONFIG_DIR / "ssp-sam-tiny.yaml").read_text()
    cases = hostile.config_cases(valid)

    def api(text):
        path = tmp_path / "self.yaml"
        path.write_text(text, errors="surrogateescape")
        model = build_model(load_config(path))
        return None if sum(p.numel() for p in model.parameters()) > 0 else "empty model"

    outcomes = {c.name: run("api", c, api) for c in cases}
    assert not FAILURES, "\n".join(FAILURES)
    assert outcomes["valid"] == "ok"
    assert all(o == "named error" for n, o in outcomes.items() if n not in ("valid", "clip.vision.image_size=4095")), outcomes
    assert not FAILURES, "\n".join(FAILURES)


# ---- dataset pickles ------------------------------------------------------------------------------------


def test_refs_pickles(tmp_path):
    from sspsam.data.refer import RefCOCODataset

    marker = tmp_path / "PWNED"
    root = tmp_path / "data"
    (root / "refcoco").mkdir(parents=True)
    (root / "images" / "mscoco" / "train2014").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(root / "images" / "mscoco" / "train2014" / "a.jpg")
    (root / "refcoco" / "instances.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg", "height": 32, "width": 32}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 8, 8],
                         "segmentation": [[0, 0, 8, 0, 8, 8, 0, 8]], "area": 64, "iscrowd": 0}],
        "categories": [{"id": 1, "name": "thing"}]}))

    def api(data):
        (root / "refcoco" / "refs(unc).p").write_bytes(data)
        ds = RefCOCODataset(root, dataset="refcoco", split="val", image_size=64)
        return None if len(ds) == 1 else f"{len(ds)} samples"

    outcomes = {c.name: run("api", c, api) for c in hostile.refs_cases(str(marker))}
    assert not marker.exists(), "a refs pickle ran code"
    assert outcomes["valid"] == outcomes["valid-py2"] == "ok"
    assert all(outcomes[n] == "named error" for n in outcomes if n.startswith("evil"))
    assert not FAILURES, "\n".join(FAILURES)


# ---- HTTP -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(models):
    from fastapi.testclient import TestClient

    from sspsam.serve.app import create_app

    seg, ovss = models
    app = create_app(segmenter=seg, ovss=ovss, max_upload_mb=8, max_pixels=25_000_000)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def _http_check(resp, ok_key: str):
    if resp.status_code >= 500:
        return f"HTTP {resp.status_code}: {resp.text[:300]}"
    try:
        body = resp.json()
    except ValueError:
        return f"HTTP {resp.status_code} with a non-JSON body {resp.text[:100]!r}"
    if resp.status_code == 200:
        return None if ok_key in body else f"200 without {ok_key}"
    err = body.get("error", {})
    if not err.get("code") or not err.get("message") or "\n" in err["message"] or "Traceback" in resp.text:
        return f"HTTP {resp.status_code} with an unclear error {body}"[:300]
    return False


def test_http(client, valid_png):
    cases = hostile.http_cases(valid_png)

    def post(path, ctype, body):
        headers = {"content-type": ctype} if ctype else {}
        return client.post(path, content=body, headers=headers)

    outcomes = {}
    for c in cases:
        outcomes[c.name] = run("http", c, lambda v: _http_check(post("/v1/segment", *v), "results"))
        ctype, body = c.value
        if ctype == "application/json" and body.startswith(b"{") and b'"phrases"' in body:
            as_classes = body.replace(b'"phrases"', b'"classes"', 1)
            run("http-ovss", c, lambda v, b=as_classes: _http_check(post("/v1/ovss", ctype, b), "label_png"))
    # hostile images and phrases through both endpoints too
    for c in IMAGE_CASES:
        if isinstance(c.value, bytes):
            data = {"image": base64.b64encode(c.value).decode(), "phrases": ["the red circle"]}
            run("http", c, lambda v, d=data: _http_check(client.post("/v1/segment", json=d), "results"))
    for c in hostile.phrase_cases() + hostile.class_cases():
        try:
            payload = json.dumps({"image": base64.b64encode(valid_png).decode(), c.kind: c.value}, allow_nan=False)
        except (TypeError, ValueError):
            continue
        path, key = ("/v1/segment", "results") if c.kind == "phrases" else ("/v1/ovss", "label_png")
        run("http", c, lambda v, p=payload: _http_check(post(path, "application/json", p.encode()), key))
    assert not FAILURES, "\n".join(FAILURES)
    assert outcomes["valid"] == outcomes["mp-valid"] == "ok"
    for name in ("phrases-int", "phrases-bool", "phrases-float", "phrases-nested-list", "deep-array",
                 "number-5000-digits", "image-b64-bomb", "image-path", "nan-literal"):
        assert outcomes[name] == "named error", name
    assert client.get("/healthz").json()["status"] == "ok"


def test_http_statuses(client, valid_png):
    """The statuses the hostile bodies get, as documented: 400 / 413 / 422."""
    b64 = base64.b64encode(valid_png).decode()
    assert client.post("/v1/segment", json={"image": b64, "phrases": 5}).status_code == 422
    r = client.post("/v1/segment", content=b"[" * 100_000, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "nested" in r.json()["error"]["message"]
    r = client.post("/v1/segment", content=('{"image": "%s", "phrases": %s}' % (b64, "9" * 5000)).encode(),
                    headers={"content-type": "application/json"})
    assert r.status_code == 400 and "5,000 characters" in r.json()["error"]["message"]
    big = base64.b64encode(hostile.declared_png(6000, 6000)).decode()
    r = client.post("/v1/segment", json={"image": big, "phrases": ["x"]})
    assert r.status_code == 413 and r.json()["error"]["code"] == "image_too_large"


def test_nan_checkpoint_is_a_named_error_everywhere(tmp_path, valid_png):
    """Broken weights: a named error from the API and a 500 `model_error` with JSON (never "score": NaN)."""
    from fastapi.testclient import TestClient

    from sspsam.errors import ModelOutputError
    from sspsam.predict.segmenter import Segmenter
    from sspsam.serve.app import create_app

    ck = torch.load(Path(__import__("sspsam").__file__).parent / "assets" / "shapes-demo.pt", weights_only=True)
    for v in ck["state_dict"].values():
        if v.is_floating_point():
            v.fill_(float("nan"))
    path = tmp_path / "nan.pt"
    torch.save(ck, path)
    seg = Segmenter.from_pretrained(str(path))
    with pytest.raises(ModelOutputError, match="non-finite"):
        seg.segment(np.zeros((32, 32, 3), np.uint8), "the blue circle")  # words the demo knows: the model is asked
    with TestClient(create_app(segmenter=seg, ovss=None), raise_server_exceptions=False) as c:
        r = c.post("/v1/segment", json={"image": base64.b64encode(valid_png).decode(), "phrases": ["the blue circle"]})
    assert r.json()["error"]["code"] == "model_error" and "NaN" not in r.text.replace("(NaN or inf)", "")


# ---- batch: bad images reported and skipped, outputs, reruns ----------------------------------------------


def test_batch_hostile_folder(tmp_path, monkeypatch):
    from sspsam.predict.batch import BatchError, run_batch

    _cache_bundled(monkeypatch)
    src = tmp_path / "imgs"
    src.mkdir()
    picked = [c for c in IMAGE_CASES if isinstance(c.value, bytes)][::3]
    for i, c in enumerate(picked):
        (src / f"{i:03d}.png").write_bytes(c.value)
    (tmp_path / "phrases.txt").write_text("the red circle\na blue square\n")
    out = tmp_path / "out"

    def job(_):
        s = run_batch(src, out, tmp_path / "phrases.txt")
        lines = (out / "results.jsonl").read_text().splitlines()
        if len(lines) != 2 * len(picked) or s.items != len(lines):
            return f"{len(lines)} lines for {len(picked)} images"
        if list(out.glob("*.tmp")):
            return "partial files"
        return None

    case = hostile.Case("batch", "folder-of-hostile-images", None)
    assert run("api", case, job) == "ok"
    first = (out / "results.jsonl").read_bytes()
    errors = sum('"error"' in line for line in first.decode().splitlines())
    assert 0 < errors < 2 * len(picked)  # the bad ones are reported, the good ones segmented
    run_batch(src, out, tmp_path / "phrases.txt")  # a rerun skips everything and changes nothing
    assert (out / "results.jsonl").read_bytes() == first
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(BatchError, match="is a file"):
        run_batch(src, afile, tmp_path / "phrases.txt")
    assert afile.read_text() == "x"


# ---- dataset files, training, evaluation, manifests, server start-up ---------------------------------------


def _cli_refused(runner, app, args, out: Path, before: dict | None = None):
    """exit 0 (the input was usable), or one `error:` line with exit 2 and the output folder as it
    was (absent, or holding exactly ``before``: path -> bytes)."""
    res = runner.invoke(app, args, catch_exceptions=True)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception  # counted as a crash
    text = res.output
    if "Traceback" in text:
        return f"traceback in output: {text[-300:]}"
    if res.exit_code == 0:
        return None
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    if res.exit_code != 2 or len(errors) != 1:
        return f"exit {res.exit_code} with output {text[-300:]!r}"
    now = {str(p): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} if out.is_dir() else None
    if before is None and out.exists():
        return f"failed but left {out} holding {sorted(now or [])}"
    if before is not None and now != before:
        return f"failed and changed {out}"
    return False


@pytest.fixture(scope="module")
def refer_template(tmp_path_factory):
    """A small valid refer-layout data set: the damaged copies share its images."""
    from sspsam.data import generate_refer

    root = tmp_path_factory.mktemp("refer-template")
    generate_refer(root, "refcoco", n_images=6, seed=0)
    return root


def _damaged_copy(template: Path, dest: Path, value: dict) -> Path:
    (dest / "refcoco").mkdir(parents=True)
    (dest / "images").symlink_to(template / "images", target_is_directory=True)
    for key, name in (("instances", "instances.json"), ("refs", "refs(unc).p")):
        data = value[key]
        (dest / "refcoco" / name).write_bytes((template / "refcoco" / name).read_bytes() if data is None else data)
    return dest


def test_dataset_files(refer_template, tmp_path, monkeypatch):
    """Every damaged annotation file is refused by name, by the reader, `evaluate` and `train`,
    before a model loads; nothing is written."""
    import pickle

    from typer.testing import CliRunner

    import sspsam.models.build as build
    from sspsam.cli.main import app
    from sspsam.data import open_referring

    instances = json.loads((refer_template / "refcoco" / "instances.json").read_text())
    refs = pickle.loads((refer_template / "refcoco" / "refs(unc).p").read_bytes())
    cases = hostile.dataset_cases(instances, refs)
    _cache_bundled(monkeypatch)
    built = []
    real_build = build.build_model
    monkeypatch.setattr(build, "build_model", lambda *a, **k: built.append(1) or real_build(*a, **k))
    runner = CliRunner()
    outcomes = {}
    for i, c in enumerate(cases):
        root = _damaged_copy(refer_template, tmp_path / f"d{i}", c.value)

        def api(v, root=root):
            ds = open_referring("refcoco", root, "val", 64)
            ds.raw(0)
            return None if len(ds) and isinstance(ds.info(0)["text"], str) else "no samples"

        outcomes[c.name] = run("api", c, api)
        out = tmp_path / f"eval{i}"
        run("cli-eval", c, lambda v, r=root, o=out: _cli_refused(
            runner, app, ["evaluate", "shapes-demo", "--data", str(r), "--max-samples", "2", "-o", str(o)], o))
        if outcomes[c.name] != "ok":  # a valid set would train for real: the training test covers that
            built.clear()
            run_dir = tmp_path / f"run{i}"
            run("cli-train", c, lambda v, r=root, o=run_dir: _cli_refused(
                runner, app, ["train", "ssp-sam-tiny", "--data", str(r), "--out", str(o), "--steps", "1",
                              "--batch-size", "2", "--device", "cpu"], o))
            assert not built, f"{c.name}: a model was built before the data was refused"
    assert not FAILURES, "\n".join(FAILURES)
    assert len(cases) >= 55
    assert outcomes["valid"] == outcomes["valid-short-polygon-beside"] == "ok"
    assert all(o == "named error" for n, o in outcomes.items() if not n.startswith("valid")), outcomes


def test_dataset_messages_name_file_field_and_expectation(refer_template, tmp_path):
    from sspsam.data import DatasetLayoutError, open_referring

    instances = json.loads((refer_template / "refcoco" / "instances.json").read_text())
    by_name = {c.name: c for c in hostile.dataset_cases(instances, [])}
    expected = {
        "instances-binary": r"instances\.json is a binary file .*expected UTF-8 JSON",
        "instances-latin1": r"instances\.json is not UTF-8 text \(byte \d+",
        "images-null": r"instances\.json: 'images' is null; expected a list of \{id, file_name, height, width\}",
        "ann-no-segmentation": r"annotation \d+ has no 'segmentation'; expected polygons",
        "ann-polygon-4-coords": r"at most 4 coordinates; expected at least 6 \(3 points\)",
        "image-height-str": r"'height' is str 'tall'; expected a positive whole number",
    }
    for i, (name, pattern) in enumerate(expected.items()):
        root = _damaged_copy(refer_template, tmp_path / f"m{i}", by_name[name].value)
        with pytest.raises(DatasetLayoutError, match=pattern):
            open_referring("refcoco", root, "val", 64)


def test_sentence_without_text_and_unknown_split(refer_template, tmp_path):
    import pickle

    from sspsam.data import DatasetLayoutError, open_referring
    from sspsam.data.validate import SplitError

    refs = pickle.loads((refer_template / "refcoco" / "refs(unc).p").read_bytes())
    for ref in refs:
        for s in ref["sentences"]:
            s.pop("sent"), s.pop("raw", None)
    root = _damaged_copy(refer_template, tmp_path / "d", {"instances": None, "refs": pickle.dumps(refs)})
    with pytest.raises(DatasetLayoutError, match=r"refs\(unc\)\.p: ref .* has no text"):
        open_referring("refcoco", root, "val", 64)
    with pytest.raises(SplitError, match=r"no split 'tset' .*did you mean 'test'.*splits present: testA, testB, train, val"):
        open_referring("refcoco", refer_template, "tset", 64)
    with pytest.raises(ValueError):  # still what callers of the API caught before
        open_referring("refcoco", refer_template, "nope", 64)


def test_train_and_evaluate_options(refer_template, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import sspsam.models.build as build
    from sspsam.cli.main import app

    _cache_bundled(monkeypatch)
    built = []
    real_build = build.build_model
    monkeypatch.setattr(build, "build_model", lambda *a, **k: built.append(1) or real_build(*a, **k))
    runner = CliRunner()
    for i, c in enumerate(hostile.train_option_cases()):
        extra, prep = c.value
        out = tmp_path / f"run{i}"
        before = None
        if prep == "run":
            out.mkdir()
            (out / "log.jsonl").write_text('{"step": 1}\n')
            (out / "last.pt").write_bytes(b"an earlier run")
        elif prep == "file":
            out.write_text("x")
        if out.exists():
            before = {str(p): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} if out.is_dir() else {}
        built.clear()

        def job(v, out=out, extra=extra, before=before):
            args = ["train", "ssp-sam-tiny", "--data", str(refer_template), "--out", str(out), "--steps", "1",
                    "--batch-size", "2", "--device", "cpu", *extra]
            if out.is_file():
                verdict = _cli_refused(runner, app, args, tmp_path / "never")
                return verdict if verdict is not False or out.read_text() == "x" else "changed the file in the way"
            return _cli_refused(runner, app, args, out, before)

        assert run("cli-train", c, job) == "named error", c.name
        assert not built, f"{c.name}: a model was built before the options were refused"
    for i, c in enumerate(hostile.evaluate_option_cases()):
        out = tmp_path / f"eval{i}"
        args = ["evaluate", "shapes-demo", "--data", str(refer_template), "-o", str(out), *c.value]
        assert run("cli-eval", c, lambda v, a=args, o=out: _cli_refused(runner, app, a, o)) == "named error", c.name
    assert not FAILURES, "\n".join(FAILURES)
    res = runner.invoke(app, ["evaluate", "shapes-demo", "--data", str(refer_template), "--split", "tset"])
    assert res.exit_code == 2 and res.output.strip().splitlines()[-1].startswith("error: no split 'tset'")
    assert "did you mean 'test'" in res.output


def test_training_stopped_by_a_bad_image_is_resumable(refer_template, tmp_path, monkeypatch, one_torch_thread):
    """A corrupt, missing or wrongly sized image met mid-run: a named error, and last.pt at the last
    completed step, from which --resume continues exactly as the uninterrupted run; met before the
    first step: nothing left behind."""
    import shutil

    import sspsam.data.base as base
    from sspsam.config import load_config
    from sspsam.engine.trainer import train

    cfg = load_config("ssp-sam-tiny")
    cfg["train"] = {"freeze": ["clip", "sam.image_encoder"], "warmup_steps": 1, "augment": False}
    kw = dict(batch_size=2, lr=1e-3, decoder_lr=1e-4, seed=3407, total_steps=3, ckpt_every=100, tensorboard=False)
    data = tmp_path / "data"
    shutil.copytree(refer_template, data)
    whole = train(cfg, data, tmp_path / "whole", steps=3, **kw)["losses"]

    real_read = base.read_image
    damage = {
        "corrupt": lambda p: p.write_bytes(p.read_bytes()[:200]),
        "missing": lambda p: p.unlink(),
        "wrong-size": lambda p: Image.new("RGB", (17, 13)).save(p, format="JPEG"),
    }
    for name, harm in damage.items():
        reads, saved = [0], {}

        def read(path, expect_hw=None, harm=harm):
            reads[0] += 1
            if reads[0] == 3:  # the first image of step 2
                saved[path] = Path(path).read_bytes()
                harm(Path(path))
            return real_read(path, expect_hw)

        monkeypatch.setattr(base, "read_image", read)
        out = tmp_path / name
        case = hostile.Case("training", f"image-{name}-mid-run", None)
        assert run("api", case, lambda v: train(cfg, data, out, steps=3, **kw)) == "named error"
        for path, raw in saved.items():
            Path(path).write_bytes(raw)  # the user fixes the image
        monkeypatch.setattr(base, "read_image", real_read)
        state = torch.load(out / "last.pt", weights_only=True)
        assert state["step"] == 1
        assert [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()] == [1]
        resumed = train(cfg, data, out, steps=3, resume=True, **kw)["losses"]
        assert [r["step"] for r in resumed] == [2, 3]
        assert [r["total"] for r in resumed] == pytest.approx([r["total"] for r in whole[1:]], abs=1e-6)

    # before the first step: the run folder is not left behind
    def read_bad(path, expect_hw=None):
        raise base.ImageLoadError(f"{path} is corrupt or truncated (injected)")

    monkeypatch.setattr(base, "read_image", read_bad)
    out = tmp_path / "first-step"
    case = hostile.Case("training", "image-corrupt-first-step", None)
    assert run("api", case, lambda v: train(cfg, data, out, steps=3, **kw)) == "named error"
    assert not out.exists()
    assert not FAILURES, "\n".join(FAILURES)


def test_manifests(tmp_path, valid_png, monkeypatch):
    from typer.testing import CliRunner

    from sspsam.cli.main import app

    _cache_bundled(monkeypatch)
    runner = CliRunner()
    img = tmp_path / "img.png"
    img.write_bytes(valid_png)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.png").write_bytes(valid_png)
    outcomes = {}
    for i, c in enumerate(hostile.manifest_cases(str(img))):
        manifest, phrases = c.value
        args = ["batch"]
        if manifest is not None:
            (tmp_path / f"m{i}.jsonl").write_bytes(manifest)
            args.append(str(tmp_path / f"m{i}.jsonl"))
        else:
            args.append(str(folder))
        if phrases is not None:
            (tmp_path / f"p{i}.txt").write_bytes(phrases)
            args += ["--phrases", str(tmp_path / f"p{i}.txt")]
        out = tmp_path / f"out{i}"
        outcomes[c.name] = run("cli-batch", c, lambda v, a=args, o=out: _cli_refused(runner, app, [*a, "-o", str(o)], o))
    assert not FAILURES, "\n".join(FAILURES)
    assert outcomes["valid-manifest"] == outcomes["valid-folder"] == "ok"
    assert all(o == "named error" for n, o in outcomes.items() if not n.startswith("valid")), outcomes


def test_serve_start(tmp_path, monkeypatch):
    """Bad models, ports and hosts: one line, exit 2, before the server listens; a busy port or an
    empty name is found before any model loads."""
    import socket

    import uvicorn
    from typer.testing import CliRunner

    import sspsam.serve.app as serve_app
    from sspsam.cli.main import app

    _cache_bundled(monkeypatch)
    assets = Path(__import__("sspsam").__file__).parent / "assets"
    corrupt, truncated = tmp_path / "corrupt.pt", tmp_path / "truncated.pt"
    corrupt.write_bytes(b"not a checkpoint at all" * 10)
    truncated.write_bytes((assets / "shapes-demo.pt").read_bytes()[:5000])
    loads, served = [], []
    real_load = serve_app.load_models
    monkeypatch.setattr(serve_app, "load_models", lambda *a: loads.append(a) or real_load(*a))
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: served.append(sockets))
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    runner = CliRunner()
    try:
        for c in hostile.serve_start_cases(str(corrupt), str(truncated)):
            args = [a.replace("{busy}", str(busy.getsockname()[1])) for a in c.value]
            loads.clear()

            def job(v, args=args):
                res = runner.invoke(app, ["serve", "--port", "0", *args], catch_exceptions=True)
                if res.exception is not None and not isinstance(res.exception, SystemExit):
                    raise res.exception
                errors = [line for line in res.output.splitlines() if line.startswith("error:")]
                if res.exit_code != 2 or len(errors) != 1 or "Traceback" in res.output:
                    return f"exit {res.exit_code}: {res.output[-300:]!r}"
                if "weights_only=False" in res.output.replace(" ", ""):
                    return "the message recommends weights_only=False"
                return False

            assert run("cli-serve", c, job) == "named error", c.name
            if c.name in ("port-busy", "model-empty", "ovss-model-empty", "port-70000", "host-unknown"):
                assert not loads, f"{c.name}: a model loaded before the refusal"
        assert not served, "the server started"
        res = runner.invoke(app, ["serve", "--port", "0", "--ovss-model", "none"])
        assert res.exit_code == 0 and len(served) == 1 and served[0][0].getsockname()[1] > 0
        served[0][0].close()
    finally:
        busy.close()
    assert not FAILURES, "\n".join(FAILURES)


def test_cross_origin_post_refused(client, valid_png):
    """A page on another origin can POST a multipart form without a preflight; the server refuses
    it unless configured for that origin. curl (no Origin) and the server's own page keep working."""
    files = {"image": ("a.png", valid_png, "image/png")}
    r = client.post("/v1/segment", files=files, data={"phrases": "x"}, headers={"Origin": "https://evil.example"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden_origin"
    assert client.post("/v1/segment", files=files, data={"phrases": "x"}).status_code == 200
    own = client.post("/v1/segment", files=files, data={"phrases": "x"}, headers={"Origin": "http://testserver"})
    assert own.status_code == 200
    assert client.head("/").status_code == 200
    r = client.post("/v1/segment", content=b"{}", headers={"content-type": "application/json", "content-length": "-4"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request"


def test_allowed_origin_and_trickled_body(models):
    """An origin given to cors_origins may POST; a body trickled in small pauses (each under the pause
    limit) is cut off at the whole-upload limit with a JSON 408."""
    import asyncio

    from fastapi.testclient import TestClient

    from sspsam.serve.app import create_app

    seg, ovss = models
    app = create_app(segmenter=seg, ovss=ovss, cors_origins=["https://ok.example"], body_timeout_s=1.0, upload_timeout_s=0.3)
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/v1/segment", content=b"{}", headers={"content-type": "application/json", "Origin": "https://ok.example"})
        assert r.status_code == 422  # past the origin check, to the body's own error

        async def trickle():
            sent, chunks = [], iter([b'{"image": "'] + [b"A" * 4] * 50 + [b'"}'])

            async def receive():
                await asyncio.sleep(0.05)
                chunk = next(chunks, None)
                return {"type": "http.request", "body": chunk or b"", "more_body": chunk is not None}

            async def send(message):
                sent.append(message)

            scope = {"type": "http", "method": "POST", "path": "/v1/segment", "raw_path": b"/v1/segment",
                     "query_string": b"", "headers": [(b"content-type", b"application/json"), (b"host", b"testserver")],
                     "scheme": "http", "server": ("testserver", 80), "client": ("1.2.3.4", 5), "root_path": "",
                     "http_version": "1.1", "app": app}
            await app(scope, receive, send)
            return sent

        sent = asyncio.run(trickle())
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))
    assert start["status"] == 408 and body["error"]["code"] == "body_timeout"
    assert "0.3 s upload limit" in body["error"]["message"]


def test_disk_full_leaves_nothing(tmp_path, valid_png, monkeypatch):
    """A write that fails part-way (injected: the disk fills at the Nth file) leaves the output
    folder as it was: absent, or with the earlier run's files untouched."""
    import errno
    import os

    from typer.testing import CliRunner

    from sspsam.cli.main import app

    _cache_bundled(monkeypatch)
    runner = CliRunner()
    src = tmp_path / "img.png"
    src.write_bytes(valid_png)
    real_fsync = os.fsync
    commands = {
        "segment": (["segment", str(src), "the red circle", "a blue square"], 4),
        "ovss": (["ovss", str(src), "--classes", "red,green,background"], 3),
    }
    for name, (args, n_files) in commands.items():
        for fail_at in range(1, n_files + 1):
            for earlier in (False, True):
                out = tmp_path / f"{name}-{fail_at}-{earlier}"
                if earlier:
                    out.mkdir()
                    (out / "img.keep").write_text("earlier")
                before = {str(p): p.read_bytes() for p in out.iterdir()} if out.exists() else None
                calls = [0]

                def fsync(fd, fail_at=fail_at):
                    calls[0] += 1
                    if calls[0] == fail_at:
                        raise OSError(errno.ENOSPC, "No space left on device")
                    return real_fsync(fd)

                monkeypatch.setattr(os, "fsync", fsync)
                case = hostile.Case("disk-full", f"{name}-file-{fail_at}{'-into-earlier' if earlier else ''}", None)
                verdict = run("cli", case, lambda v, a=args, o=out, b=before: _cli_refused(runner, app, [*a, "-o", str(o)], o, b))
                monkeypatch.setattr(os, "fsync", real_fsync)
                assert verdict == "named error", case.name
        res = runner.invoke(app, [*args, "-o", str(tmp_path / f"{name}-ok")])
        assert res.exit_code == 0 and len(list((tmp_path / f"{name}-ok").iterdir())) == n_files
    assert not FAILURES, "\n".join(FAILURES)


def test_train_on_a_full_disk_leaves_no_run(refer_template, tmp_path, monkeypatch):
    """A fresh `train` whose first checkpoint cannot be written (the disk is full: torch's writer
    fails, or the fsync) leaves no run folder: no log.jsonl, no TensorBoard events."""
    import errno
    import os

    import torch
    from typer.testing import CliRunner

    from sspsam.cli.main import app

    def save_fails(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:595] . unexpected pos 64 vs 0 file write failed")

    def fsync_fails(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    for name, target, fake in (("save", torch, save_fails), ("fsync", os, fsync_fails)):
        out = tmp_path / f"run-{name}"
        with monkeypatch.context() as m:
            m.setattr(target, "save" if name == "save" else "fsync", fake)
            r = CliRunner().invoke(app, ["train", "ssp-sam-tiny", "--data", str(refer_template), "--out", str(out),
                                         "--steps", "2", "--batch-size", "2", "--device", "cpu", "--ckpt-every", "1"])
        assert r.exit_code == 2 and r.stderr.count("error:") == 1, r.output
        assert "cannot write" in r.stderr and not out.exists(), sorted(out.rglob("*"))


def test_work_bound_family_on_the_command_line(tmp_path, valid_png, monkeypatch):
    """1,000 class names: one named error before any model work, nothing written."""
    from typer.testing import CliRunner

    from sspsam.cli.main import app

    _cache_bundled(monkeypatch)
    src = tmp_path / "img.png"
    src.write_bytes(valid_png)
    out = tmp_path / "out"
    for n, limit, needle in ((1000, None, "at most 256"), (250, "1", "SSPSAM_MAX_OVSS_GFLOP")):
        if limit is not None:
            monkeypatch.setenv("SSPSAM_MAX_OVSS_GFLOP", limit)
            _BUNDLED_CACHE.pop("ovss-shapes-demo", None)  # the limit is read when the predictor is made
        classes = ",".join(f"class {i}" for i in range(n))
        r = CliRunner().invoke(app, ["ovss", str(src), "--classes", classes, "-o", str(out)])
        assert r.exit_code == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and needle in r.stderr, r.output
        assert not out.exists()
    _BUNDLED_CACHE.pop("ovss-shapes-demo", None)
