"""`sspsam evaluate`: the loop over a real-format data set, the report files and the CLI.

Known answers come from segmenters whose output is fixed: an oracle (returns the ground truth),
an empty one (always "nothing"), and a half-right one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from sspsam.engine.evaluate import evaluate, open_dataset, precision_curve, write_report
from sspsam.predict.results import Segmentation


class FixedSegmenter:
    """Answers each phrase with a mask chosen by ``rule(dataset_index)``."""

    def __init__(self, ds, rule):
        self.ds, self.rule, self.calls = ds, rule, 0
        self._by_key = {}
        for i in range(len(ds)):
            info = ds.info(i)
            self._by_key.setdefault((info["image_id"], info["text"]), []).append(i)

    def segment(self, image, texts):
        self.calls += 1
        masks, nts = [], []
        for t in texts:
            # the same sentence can occur twice on one image: take the next unused index
            i = self._by_key[(self._image_id, t)].pop(0)
            m, nt = self.rule(i)
            masks.append(m), nts.append(nt)
        return Segmentation(list(texts), np.stack(masks), np.ones(len(texts)), np.array(nts))


def _run(ds, task, rule):
    seg = FixedSegmenter(ds, rule)
    # evaluate() groups by image: record which image is being answered
    orig_raw = ds.raw

    def raw(i):
        seg._image_id = ds.info(i)["image_id"]
        return orig_raw(i)

    ds.raw = raw
    try:
        return evaluate(seg, ds, task), seg
    finally:
        ds.raw = orig_raw


@pytest.fixture(scope="module")
def gref_root(tmp_path_factory):
    from sspsam.data import generate_grefcoco

    root = tmp_path_factory.mktemp("gref")
    generate_grefcoco(root, n_images=6, seed=3)
    return root


@pytest.fixture(scope="module")
def refer_root(tmp_path_factory):
    from sspsam.data import generate_refer

    root = tmp_path_factory.mktemp("refer")
    generate_refer(root, "refcoco", n_images=6, seed=4)
    return root


def test_oracle_scores_one_and_images_are_encoded_once(refer_root):
    ds = open_dataset("refcoco", refer_root, None, 128)
    res, seg = _run(ds, "res", lambda i: (ds.mask(i), False))
    m = res["metrics"]
    assert m["mIoU"] == pytest.approx(1.0) and m["oIoU"] == pytest.approx(1.0) and m["Pr@0.9"] == 1.0
    assert res["n"] == len(ds) == m["n"]
    assert seg.calls == len({ds.info(i)["image_id"] for i in range(len(ds))})  # one call per image


def test_gres_empty_predictions_known_answer(gref_root):
    ds = open_dataset("grefcoco", gref_root, None, 128)
    empty = lambda i: (np.zeros_like(ds.mask(i)), True)  # noqa: E731
    res, _ = _run(ds, "gres", empty)
    m = res["metrics"]
    n_nt = sum(not ds.mask(i).any() for i in range(len(ds)))
    assert 0 < n_nt < len(ds)
    # every no-target sample is a TP (IoU 1), every target sample an FP (IoU 0)
    assert m["N-acc"] == 1.0 and m["T-acc"] == 0.0
    assert m["gIoU"] == pytest.approx(n_nt / len(ds))
    assert m["cIoU"] == 0.0 and m["mIoU_target"] == 0.0
    assert res["gt_no_target"].count(True) == n_nt


def test_gres_half_right_known_answer(gref_root):
    """Oracle on target samples, a stray 10x10 block on no-target ones (each an FN)."""
    ds = open_dataset("grefcoco", gref_root, None, 128)

    def rule(i):
        g = ds.mask(i)
        if g.any():
            return g, False
        m = np.zeros_like(g)
        m[:10, :10] = True
        return m, False

    res, _ = _run(ds, "gres", rule)
    m = res["metrics"]
    gt = [ds.mask(i) for i in range(len(ds))]
    n_t = sum(g.any() for g in gt)
    area = sum(int(g.sum()) for g in gt)
    assert m["N-acc"] == 0.0 and m["T-acc"] == 1.0
    assert m["gIoU"] == pytest.approx(n_t / len(ds))
    assert m["cIoU"] == pytest.approx(area / (area + 100 * (len(ds) - n_t)))
    assert m["mIoU_target"] == pytest.approx(1.0)


def test_report_files(refer_root, tmp_path):
    ds = open_dataset("refcoco", refer_root, None, 128)
    # IoU 1 on even samples, 0 (empty prediction) on odd ones
    res, _ = _run(ds, "res", lambda i: (ds.mask(i) if i % 2 == 0 else np.zeros_like(ds.mask(i)), False))
    files = write_report(tmp_path, res, "res", "refcoco", "val", "oracle")
    payload = json.loads(files["json"].read_text())
    share = sum(1 for i in range(len(ds)) if i % 2 == 0) / len(ds)
    assert payload["metrics"]["mIoU"] == pytest.approx(share)
    assert payload["pr_curve"]["Pr@0.95"] == pytest.approx(share)
    assert len(payload["ious"]) == len(ds)
    table = files["table"].read_text().splitlines()
    assert table[0].split("|")[2:-1] == [f" {k} " for k in ["Pr@0.5", "Pr@0.6", "Pr@0.7", "Pr@0.8", "Pr@0.9", "oIoU", "mIoU"]]
    assert f"{100 * share:.2f}" in table[2]
    png = Image.open(files["plot"])
    assert png.format == "PNG" and png.size[0] > 300


def test_precision_curve_rules():
    assert precision_curve([0.5, 0.7, 0.95], thresholds=(0.5, 0.7, 0.9)) == pytest.approx([1.0, 2 / 3, 1 / 3])
    # PhraseCut counts strictly greater
    assert precision_curve([0.5, 0.7, 0.95], thresholds=(0.5, 0.7, 0.9), strict=True) == pytest.approx([2 / 3, 1 / 3, 1 / 3])


def test_cli_evaluate_on_a_checkpoint(refer_root, tmp_path):
    from sspsam.io.checkpoint import save_checkpoint
    from sspsam.cli.main import app
    from sspsam.models.build import build_model
    from sspsam.config import load_config

    torch.manual_seed(0)
    cfg = load_config("ssp-sam-tiny")
    ckpt = tmp_path / "tiny.pt"
    save_checkpoint(ckpt, cfg, build_model(cfg).state_dict())
    out = tmp_path / "eval"
    r = CliRunner().invoke(app, ["evaluate", str(ckpt), "--data", str(refer_root), "--dataset", "refcoco",
                                 "--split", "val", "-o", str(out)])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    ds = open_dataset("refcoco", refer_root, "val", 128)
    assert m["metrics"]["n"] == len(ds) and 0.0 <= m["metrics"]["mIoU"] <= 1.0
    assert (out / "table.md").is_file() and (out / "pr_curve.png").is_file()
    assert "| tiny · refcoco val |" in r.output

    bad = CliRunner().invoke(app, ["evaluate", str(ckpt), "--data", str(tmp_path / "nowhere"), "--dataset", "refcoco"])
    assert bad.exit_code == 2 and "does not exist" in bad.output
    bad = CliRunner().invoke(app, ["evaluate", str(ckpt), "--data", str(refer_root), "--dataset", "coco"])
    assert bad.exit_code == 2 and "unknown referring dataset" in bad.output


def test_cli_evaluate_ovss_dataset(tmp_path):
    """`sspsam evaluate` on an OVSS layout: the bundled ovss-shapes-demo on generated shapes."""
    from sspsam.cli.main import app
    from sspsam.data.semseg import SHAPE_CLASSES, generate_semseg

    generate_semseg(tmp_path / "ss", n=4, seed=5, splits=("val",))
    out = tmp_path / "eval"
    r = CliRunner().invoke(app, ["evaluate", "ovss-shapes-demo", "--dataset", "semseg", "--data", str(tmp_path / "ss"),
                                 "--split", "val", "-o", str(out)])
    assert r.exit_code == 0, r.output
    payload = json.loads((out / "metrics.json").read_text())
    m = payload["metrics"]
    assert m["n"] == 4 and list(m["per_class"]) == list(SHAPE_CLASSES)
    assert 0.5 <= m["mIoU"] <= 1.0  # the demo scores about 0.9 on this data
    table = (out / "table.md").read_text()
    assert all(f"| {c} |" in table for c in SHAPE_CLASSES) and "**mIoU**" in table
    bad = CliRunner().invoke(app, ["evaluate", "ovss-shapes-demo", "--dataset", "ade150", "--data", str(tmp_path / "none")])
    assert bad.exit_code == 2 and "ADE" in bad.output
