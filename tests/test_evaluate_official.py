"""`sspsam evaluate --protocol ssp-sam`: the official SSP-SAM test.py metrics and its data_seg layout.

Known answers: hand-made masks through the metric (IoU, oIoU, Pr@X ties, the gRefCOCO
"fewer than 50 pixels is no target" rule), the 512² ground-truth frame worked out by hand from
PIL's bilinear kernel, and the acceptance check: the same generated data in the official
``data_seg/anns`` layout and in refer's layout give the same numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from sspsam.data.official_anns import OfficialAnnsDataset, official_phrase, write_official_anns
from sspsam.engine.evaluate_official import (
    OfficialMeter,
    evaluate_official,
    official_gt_mask,
    prediction_to_frame,
)
from sspsam.engine.metrics import RESMeter
from sspsam.errors import SSPSamError


def _block(y0, x0, h, w, shape=(40, 40)):
    m = np.zeros(shape, bool)
    m[y0 : y0 + h, x0 : x0 + w] = True
    return m


# ---------------------------------------------------------------------------------------------- metric


def test_meter_known_answer_with_no_target_rule_and_threshold_ties():
    gt = _block(0, 0, 10, 10)  # 100 px
    empty = np.zeros((40, 40), bool)
    samples = [
        (_block(0, 5, 10, 10), gt),  # A: I 50, U 150 -> 1/3
        (gt, gt),  # B: exact -> 1
        (_block(20, 20, 7, 7), empty),  # C: 49 px on an empty GT -> "no target": IoU 1, I = U = 0
        (_block(20, 20, 5, 10), empty),  # D: 50 px on an empty GT -> IoU 0, U 50
        (empty, gt),  # E: nothing on a target -> IoU 0, U 100
        (_block(0, 0, 5, 10) | _block(5, 0, 1, 5), gt),  # F: I 55, U 100 -> exactly 0.55
    ]
    meter = OfficialMeter()
    ious = [meter.update(p, g) for p, g in samples]
    assert ious == pytest.approx([1 / 3, 1, 1, 0, 0, 0.55])
    m = meter.compute()
    assert m["n"] == 6
    assert m["mIoU"] == pytest.approx((1 / 3 + 1 + 1 + 0.55) / 6, abs=1e-7)
    assert m["oIoU"] == pytest.approx((50 + 100 + 55) / (150 + 100 + 0 + 50 + 100 + 100))
    assert m["Pr@0.5"] == pytest.approx(3 / 6)  # B, C, F
    assert m["Pr@0.55"] == pytest.approx(3 / 6)  # F sits exactly on the threshold and counts
    assert m["Pr@0.6"] == pytest.approx(2 / 6)
    assert m["Pr@0.9"] == pytest.approx(2 / 6)
    assert [k for k in m if k.startswith("Pr@")] == [
        "Pr@0.5", "Pr@0.55", "Pr@0.6", "Pr@0.65", "Pr@0.7", "Pr@0.75", "Pr@0.8", "Pr@0.85", "Pr@0.9"]
    # as the official code counts: IoU == 1 (B, a target, and C) over no-target GTs; 0 < IoU < 1 over target GTs
    assert m["n_no_target"] == 2
    assert m["No_target_acc"] == pytest.approx(2 / 2)
    assert m["target_acc"] == pytest.approx(2 / 4)  # A, F of A, B, E, F

    # sspsam's RES meter differs on C only: a 49-pixel answer to "nothing" scores 0 there
    res = RESMeter()
    assert [res.update(p, g) for p, g in samples][2] == 0.0


def test_meter_without_no_target_samples_omits_the_nacc_pair():
    meter = OfficialMeter()
    meter.update(_block(0, 0, 4, 4), _block(0, 0, 4, 8))
    m = meter.compute()
    assert m["mIoU"] == pytest.approx(0.5) and m["oIoU"] == pytest.approx(0.5)
    assert "No_target_acc" not in m and "target_acc" not in m


def test_ground_truth_frame_grows_by_the_bilinear_kernel():
    # one pixel of a 2x2 image: x1024 / 512 -> PIL's bilinear weight of input pixel 0 is positive for
    # output columns 0..767 (centre (x + 0.5) / 512 < 1.5), so 768² at 1024, 384² at 512
    m = np.zeros((2, 2), np.uint8)
    m[0, 0] = 1
    g = official_gt_mask(m)
    assert g.shape == (512, 512) and g.sum() == 384 * 384 and g[:384, :384].all()
    # a prediction is carried by nearest neighbour: exactly its quarter of the frame
    p = prediction_to_frame(m)
    assert p.sum() == 256 * 256 and p[:256, :256].all()
    # a 3x6 image fills the top 512 rows of 1024 (256 of 512); the padding stays empty
    g = official_gt_mask(np.ones((3, 6)))
    assert g[:256].all() and not g[256:].any()


def test_official_phrase_keeps_the_text_before_the_last_separator():
    assert official_phrase("  The Man on the LEFT ") == "the man on the left"
    assert official_phrase("a dog ||| context") == "a dog"
    assert official_phrase("a ||| b ||| c") == "a ||| b"  # the official regex is greedy
    assert official_phrase("a|||b") == "a|||b"


# ---------------------------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def refer_pair(tmp_path_factory):
    """The same generated RefCOCO data in refer's layout and in the official one."""
    from sspsam.data import generate_refer

    root = tmp_path_factory.mktemp("pair")
    generate_refer(root / "refer", "refcoco", n_images=5, seed=4)
    summary = write_official_anns(root / "refer", root / "official", "refcoco")
    return root / "refer", root / "official", summary


@pytest.fixture(scope="module")
def gref_pair(tmp_path_factory):
    from sspsam.data import generate_grefcoco

    root = tmp_path_factory.mktemp("gpair")
    generate_grefcoco(root / "rela", n_images=4, seed=3)
    write_official_anns(root / "rela", root / "official", "grefcoco")
    return root / "rela", root / "official"


def test_written_layout_matches_the_official_format(refer_pair):
    from sspsam.data import open_referring

    refer_root, off_root, summary = refer_pair
    data = json.loads((off_root / "data_seg" / "anns" / "refcoco.json").read_text())
    assert list(data) == ["train", "val", "testA", "testB"]
    item = data["val"][0]
    assert set(item) == {"iid", "bbox", "cat_id", "refs", "mask_id"} and len(item["refs"]) == 1
    assert len(item["bbox"]) == 4  # COCO's x, y, w, h
    assert (off_root / "data" / "coco" / "train2014" / f"COCO_train2014_{item['iid']:012d}.jpg").is_file()
    assert any(len(i["refs"]) > 1 for i in data["train"])  # a training item holds all its sentences
    ref = open_referring("refcoco", refer_root, "val", 128)
    off = OfficialAnnsDataset(off_root, "refcoco", "val", 128)
    assert len(off) == len(ref) == summary["splits"]["val"]
    for i in range(len(ref)):
        assert off.info(i)["text"] == ref.info(i)["text"]
        assert off.info(i)["image_id"] == ref.info(i)["image_id"]
        np.testing.assert_array_equal(off.mask(i), ref.mask(i))


def test_layout_errors_are_one_line(refer_pair, tmp_path):
    _, off_root, _ = refer_pair
    with pytest.raises(SSPSamError, match=r"no split 'test' in .*refcoco.json; splits present: train, val, testA, testB"):
        OfficialAnnsDataset(off_root, "refcoco", "test")
    with pytest.raises(SSPSamError, match=r"missing .*refcoco\+\.json \(data_seg/anns holds: refcoco.json\)"):
        OfficialAnnsDataset(off_root, "refcoco+", "val")
    bad = tmp_path / "bad"
    (bad / "data_seg" / "anns").mkdir(parents=True)
    (bad / "data" / "coco" / "train2014").mkdir(parents=True)
    (bad / "data_seg" / "anns" / "refcoco.json").write_text("{not json")
    with pytest.raises(SSPSamError, match="is not valid JSON"):
        OfficialAnnsDataset(bad, "refcoco", "val")
    (bad / "data_seg" / "anns" / "refcoco.json").write_text(json.dumps({"val": [{"iid": 1, "refs": "a dog", "mask_id": 3}]}))
    with pytest.raises(SSPSamError, match=r"val\[0\]: refs must be a non-empty list"):
        OfficialAnnsDataset(bad, "refcoco", "val")
    (bad / "data_seg" / "anns" / "refcoco.json").write_text(json.dumps({"val": [{"iid": 1, "refs": ["a dog"], "mask_id": 3}]}))
    ds = OfficialAnnsDataset(bad, "refcoco", "val")
    with pytest.raises(SSPSamError, match=r"mask not found: .*masks/refcoco/3\.npy"):
        ds.mask(0)


class _Empty:
    """A predictor that always answers "nothing" (exercises the non-Segmenter path)."""

    class _Res:
        def __init__(self, masks):
            self.masks = masks

    def segment(self, image, texts):
        return self._Res(np.zeros((len(texts), *image.shape[:2]), bool))


def test_grefcoco_empty_predictions_known_answer_in_both_layouts(gref_pair):
    from sspsam.data import open_referring

    rela_root, off_root = gref_pair
    results = []
    for ds in (open_referring("grefcoco", rela_root, "val", 128), OfficialAnnsDataset(off_root, "grefcoco", "val", 128)):
        n_nt = sum(not ds.mask(i).any() for i in range(len(ds)))
        assert 0 < n_nt < len(ds)
        m = evaluate_official(_Empty(), ds)["metrics"]
        # every no-target sample scores 1, every target sample 0 (its GT pixels make the union)
        assert m["mIoU"] == pytest.approx(n_nt / len(ds)) and m["oIoU"] == 0.0
        assert m["Pr@0.9"] == pytest.approx(n_nt / len(ds))
        assert m["No_target_acc"] == 1.0 and m["target_acc"] == 0.0
        results.append(m)
    assert results[0] == results[1]


def test_grefcoco_demo_model_same_numbers_in_both_layouts(gref_pair):
    import sspsam
    from sspsam.data import open_referring

    rela_root, off_root = gref_pair
    seg = sspsam.Segmenter.from_pretrained("shapes-demo")
    a = evaluate_official(seg, open_referring("grefcoco", rela_root, "testB", 256))
    b = evaluate_official(seg, OfficialAnnsDataset(off_root, "grefcoco", "testB", 256))
    assert a["ious"] == b["ious"] and a["metrics"] == b["metrics"]


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_same_numbers_on_official_and_refer_layouts(refer_pair, tmp_path):
    from sspsam.cli.main import app

    refer_root, off_root, summary = refer_pair
    payloads = []
    for name, root in (("refer", refer_root), ("official", off_root)):
        out = tmp_path / name
        r = CliRunner().invoke(app, ["evaluate", "shapes-demo", "--dataset", "refcoco", "--split", "val",
                                     "--protocol", "ssp-sam", "--data", str(root), "-o", str(out)])
        assert r.exit_code == 0, r.output
        assert "| shapes-demo · refcoco val (ssp-sam protocol) |" in r.output
        assert "| paper: SSP-SAM paper (arXiv:2603.18086, IEEE TCSVT) | — |" in r.output
        payloads.append(json.loads((out / "metrics.json").read_text()))
    a, b = payloads
    assert a["layout"] == "refer" and b["layout"] == "official data_seg/anns"
    assert a["metrics"] == b["metrics"] and a["ious"] == b["ious"]
    assert a["metrics"]["n"] == summary["splits"]["val"] and 0.5 < a["metrics"]["mIoU"] <= 1.0


def test_cli_bad_input_is_one_error_line(refer_pair, tmp_path):
    from sspsam.cli.main import app

    _, off_root, _ = refer_pair
    cases = [
        (["--dataset", "refcoco", "--split", "test", "--data", str(off_root)], "splits present: train, val, testA, testB"),
        (["--dataset", "refcoco+", "--data", str(off_root)], "missing"),
        (["--dataset", "phrasecut", "--data", str(off_root)], "--protocol ssp-sam covers"),
    ]
    for args, text in cases:
        r = CliRunner().invoke(app, ["evaluate", "shapes-demo", "--protocol", "ssp-sam", *args, "-o", str(tmp_path / "o")])
        assert r.exit_code == 2, r.output
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and text in lines[0], r.output
    r = CliRunner().invoke(app, ["evaluate", "shapes-demo", "--protocol", "lavt", "--data", str(off_root)])
    assert r.exit_code == 2 and "unknown --protocol 'lavt'" in r.output


def test_cli_default_protocol_reads_the_official_layout_too(refer_pair, tmp_path):
    from sspsam.cli.main import app

    refer_root, off_root, _ = refer_pair
    metrics = []
    for name, root in (("refer", refer_root), ("official", off_root)):
        r = CliRunner().invoke(app, ["evaluate", "shapes-demo", "--dataset", "refcoco", "--split", "val",
                                     "--data", str(root), "-o", str(tmp_path / name)])
        assert r.exit_code == 0, r.output
        metrics.append(json.loads((tmp_path / name / "metrics.json").read_text())["metrics"])
    assert metrics[0] == metrics[1] and "Pr@0.55" not in metrics[0]  # sspsam's RES row, not the official one
