"""The bundled demo models are right on their own domain (issue 9): the README's main job, then
every phrase family on scenes the models never saw."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sspsam.data.semseg import SemSegDataset, generate_semseg
from sspsam.data.shapes import FAMILIES
from sspsam.engine.shapes_eval import HELDOUT_SEED0, evaluate, format_table
from sspsam.engine.evaluate_ovss import evaluate_ovss
from sspsam.predict.ovss import OVSS
from sspsam.predict.segmenter import Segmenter

ROOT = Path(__file__).resolve().parents[1]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_readme_main_job_finds_the_blue_circle(tmp_path):
    """`sspsam segment examples/shapes.png "the blue circle" -o DIR`, as a user runs it."""
    exe = shutil.which("sspsam")
    cmd = [exe] if exe else [sys.executable, "-m", "sspsam.cli.main"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*cmd, "segment", "examples/shapes.png", "the blue circle", "-o", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "no matching object" not in proc.stdout
    masks = sorted(tmp_path.glob("*mask*.png"))
    assert len(masks) == 1, proc.stdout
    pred = np.asarray(Image.open(masks[0]).convert("L")) > 127
    known = np.asarray(Image.open(ROOT / "examples/shapes_blue_circle.png")) > 127
    assert pred.shape == known.shape
    assert _iou(pred, known) >= 0.9


def test_example_mask_is_the_generators():
    """The known answer is the generator's own mask of the example scene, not a hand drawing."""
    scene = _example_scene()
    assert np.array_equal(scene.render(), np.asarray(Image.open(ROOT / "examples/shapes.png").convert("RGB")))
    (blue,) = [i for i, o in enumerate(scene.objects) if (o.colour, o.shape) == ("blue", "circle")]
    known = np.asarray(Image.open(ROOT / "examples/shapes_blue_circle.png")) > 127
    assert np.array_equal(scene.mask(blue), known)


@pytest.fixture(scope="module")
def shapes_demo_result():
    torch.set_num_threads(1)
    return evaluate(Segmenter.from_pretrained("shapes-demo"), n_scenes=200, seed0=HELDOUT_SEED0 + 7_000_000)


def test_shapes_demo_meets_issue_9_on_held_out_scenes(shapes_demo_result):
    """Issue 9's bar on 200 scenes no training run drew (seeds of their own, not the ones the
    threshold was chosen on): mIoU >= 0.85 over target phrases, no-target accuracy >= 0.9, every
    phrase family >= 0.75. Where it stands: 0.912 / 0.985, weakest size 0.83 and multi 0.85 (the
    first demo: colour+shape 0.00, overall 0.21)."""
    r = shapes_demo_result
    print(format_table(r))
    assert set(r["families"]) == set(FAMILIES) and all(row["n"] >= 30 for row in r["families"].values())
    assert r["mIoU"] >= 0.85 and r["families"]["colour"]["score"] >= 0.9
    assert all(row["score"] >= 0.75 for row in r["families"].values()), {f: row["score"] for f, row in r["families"].items()}
    assert r["no_target_acc"] >= 0.9


def test_shapes_demo_meta_says_what_it_knows():
    """The example phrases the CLI/web page suggest are answered right on examples/shapes.png,
    an absent object among them."""
    from sspsam.models.build import read_sspsam_checkpoint
    from sspsam.data.shapes import all_expressions
    from sspsam.engine.shapes_eval import target_mask

    meta = read_sspsam_checkpoint(ROOT / "sspsam/assets/shapes-demo.pt")["meta"]
    assert meta["domain"] == "generated-shapes" and len(meta["example_phrases"]) >= 4
    scene = _example_scene()
    truth = {e.text: e for e in all_expressions(scene)}
    phrases = meta["example_phrases"]
    assert all(p in truth for p in phrases), "every example phrase is a generator phrase true of the example"
    assert any(truth[p].no_target for p in phrases)
    res = Segmenter.from_pretrained("shapes-demo").segment(scene.render(), phrases)
    for p, mask, none in zip(phrases, res.masks, res.no_target):
        if truth[p].no_target:
            assert none and not mask.any(), p
        else:
            assert not none and _iou(mask, target_mask(scene, truth[p])) >= 0.75, p


def _example_scene():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from train_shapes_demo import example_scene
    finally:
        sys.path.pop(0)
    return example_scene()


def test_ovss_demo_on_held_out_scenes(tmp_path):
    from sspsam.models.build import read_sspsam_checkpoint

    torch.set_num_threads(1)
    meta = read_sspsam_checkpoint(ROOT / "sspsam/assets/ovss-shapes-demo.pt")["meta"]
    classes = meta["example_classes"]
    assert meta["domain"] == "generated-shapes" and classes[0] == "background"
    generate_semseg(tmp_path, n=200, size=128, seed=987_654, splits=("val",), classes=tuple(classes))
    ovss = OVSS.from_pretrained("ovss-shapes-demo")
    res = evaluate_ovss(ovss.model, SemSegDataset(tmp_path, "val"), classes=classes)
    assert res["mIoU"] >= 0.85, res["per_class"]
