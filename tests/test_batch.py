"""`sspsam batch`: folder and manifest inputs, resuming after a kill or a torn line, and Ray Data.

The acceptance bar for every interrupted or distributed run is the same: results.jsonl is
byte-identical to the one an uninterrupted local run writes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

import sspsam.cli.batch as cli_batch
import sspsam.cli.serve as cli_serve
from sspsam.data.shapes import make_scene
from sspsam.io.masks import decode_rle
from sspsam.predict.segmenter import Segmenter

PHRASES = ["red circle", "the blue square", "green triangle", "a square on the left"]
N_IMAGES = 6

app = typer.Typer()  # as the lead mounts them in sspsam.cli.main
app.command("serve")(cli_serve.serve)
app.command("batch")(cli_batch.batch)
CLI = (
    "import typer; import sspsam.cli.batch as cli_batch, sspsam.cli.serve as cli_serve; app = typer.Typer(); "
    "app.command('serve')(cli_serve.serve); app.command('batch')(cli_batch.batch); app()"
)


def _run(*args: str):
    return CliRunner().invoke(app, ["batch", *map(str, args)])


def _ok(*args: str) -> str:
    result = _run(*args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A folder of scenes, a phrases file, and the uninterrupted run's output as the reference."""
    root = tmp_path_factory.mktemp("batch")
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    for i in range(N_IMAGES):
        folder = images / "sub" if i % 3 == 0 else images  # subfolders are searched too
        Image.fromarray(make_scene(i).render()).save(folder / f"scene{i:02d}.png")
    phrases = root / "phrases.txt"
    phrases.write_text("\n".join(PHRASES[:2] + [""] + PHRASES[2:]) + "\n")  # blank lines are skipped
    ref = root / "reference"
    _ok(images, "--phrases", phrases, "-o", ref, "--png")
    return images, phrases, ref, (ref / "results.jsonl").read_bytes()


def _lines(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.decode().splitlines()]


def test_folder_writes_one_line_per_item_in_input_order(job):
    images, _, ref, data = job
    rows = _lines(data)
    names = sorted(p.relative_to(images).as_posix() for p in images.rglob("*.png"))
    assert [(r["image"], r["phrase"]) for r in rows] == [(n, p) for n in names for p in PHRASES]
    assert len({r["id"] for r in rows}) == len(rows)
    seg = Segmenter.from_pretrained("shapes-demo")
    first = [r for r in rows if r["image"] == names[0]]
    want = seg.segment(np.asarray(Image.open(images / names[0])), PHRASES)
    for r, mask in zip(first, want.masks):
        assert np.array_equal(decode_rle(r["rle"]), mask)
        assert np.array_equal(np.asarray(Image.open(ref / r["mask_png"])) > 0, mask)
    assert any(r["area"] > 0 for r in rows)
    assert "already done" in _ok(images, "--phrases", job[1], "-o", ref, "--png")  # a rerun changes nothing
    assert (ref / "results.jsonl").read_bytes() == data


def test_manifest_input(job, tmp_path):
    images = job[0]
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    manifest = tmp_path / "job.jsonl"
    lines = [
        {"image": str(images / "scene01.png"), "phrase": "red circle"},
        {"image": str(images / "scene02.png"), "phrases": ["red circle", "the blue square"]},
        {"image": "broken.png", "phrase": "anything"},  # relative to the manifest
        {"image": str(images / "scene01.png"), "phrase": "red circle"},  # a repeat gets its own id
    ]
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    out = _ok(manifest, "-o", tmp_path / "out")
    assert "1 with unreadable images" in out
    rows = _lines((tmp_path / "out" / "results.jsonl").read_bytes())
    assert [r["phrase"] for r in rows] == ["red circle", "red circle", "the blue square", "anything", "red circle"]
    assert rows[4]["id"] == rows[0]["id"] + "-2" and rows[4]["rle"] == rows[0]["rle"]
    assert "error" in rows[3] and "rle" not in rows[3]


def test_bad_inputs_are_one_line_errors(job, tmp_path):
    images, phrases, *_ = job
    assert "needs --phrases" in _run(images, "-o", tmp_path / "a").output
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"image": "x.png", "phrase": "  "}) + "\n")
    result = _run(manifest, "-o", tmp_path / "b")
    assert result.exit_code == 2 and "m.jsonl:1" in result.output and "empty phrase" in result.output
    other = tmp_path / "other"
    other.mkdir()
    (other / "results.jsonl").write_text(json.dumps({"id": "not-this-job"}) + "\n")
    result = _run(images, "--phrases", phrases, "-o", other)
    assert result.exit_code == 2 and "another input" in result.output


def test_killed_run_resumes_to_identical_file(job, tmp_path):
    images, phrases, _, want = job
    out = tmp_path / "out"
    results = out / "results.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", CLI, "batch", str(images), "--phrases", str(phrases), "-o", str(out), "--png"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 90
    while not (results.exists() and results.stat().st_size > 0):  # kill right after the first image is written
        assert proc.poll() is None, "the batch process exited before writing a line"
        assert time.monotonic() < deadline, "the batch process wrote nothing in 90 s"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    partial = results.read_bytes()
    assert 0 < len(partial) < len(want), "the run finished before it could be killed"
    assert want.startswith(partial[: partial.rfind(b"\n") + 1])
    with open(results, "ab") as fh:  # and as if the kill had come mid-write
        fh.write(b'{"id": "torn')
    out_text = _ok(images, "--phrases", phrases, "-o", out, "--png")
    assert "already done" in out_text
    assert results.read_bytes() == want


def test_torn_line_inside_an_image_is_redone(job, tmp_path):
    images, phrases, _, want = job
    out = tmp_path / "out"
    out.mkdir()
    # cut in the middle of the 3rd line: the first image's items 1-2 are kept, the rest redone
    cut = len(b"".join(want.splitlines(keepends=True)[:2])) + 40
    (out / "results.jsonl").write_bytes(want[:cut])
    _ok(images, "--phrases", phrases, "-o", out, "--png")
    got = (out / "results.jsonl").read_bytes()
    assert got == want
    assert len(got.splitlines()) == len(set(r["id"] for r in _lines(got))) == N_IMAGES * len(PHRASES)


@pytest.mark.slow
def test_ray_data_output_is_identical(job, tmp_path):
    ray = pytest.importorskip("ray")
    images, phrases, ref, want = job
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        out = tmp_path / "ray"
        _ok(images, "--phrases", phrases, "-o", out, "--png", "--ray", "--batch-size", "3", "--concurrency", "1")
    finally:
        ray.shutdown()
    assert (out / "results.jsonl").read_bytes() == want
    for r in _lines(want):
        assert (out / r["mask_png"]).read_bytes() == (ref / r["mask_png"]).read_bytes()
