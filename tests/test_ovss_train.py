"""ESC-Net and SAM-MI learn the generated colour-class task on a CPU; checkpoints round-trip."""

from __future__ import annotations

import time

import pytest
import torch

from sspsam.data.semseg import SemSegDataset, generate_semseg
from sspsam.models.cost import class_embeddings
from sspsam.engine.evaluate_ovss import evaluate_ovss
from sspsam.engine.train_ovss import train_ovss
from sspsam.models.build import _model_from_checkpoint


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes-semseg")
    generate_semseg(root, n=160, size=128, seed=0, splits=("train",))
    generate_semseg(root, n=32, size=128, seed=0, splits=("val",))
    return root


def _same_predictions(model, path, images):
    again = _model_from_checkpoint(path).eval()
    model.eval()
    with torch.no_grad():
        emb = class_embeddings(model.clip, ["background", "red", "green", "blue", "yellow"])
        a = model(images, emb)["logits"]
        b = again(images, class_embeddings(again.clip, ["background", "red", "green", "blue", "yellow"]))["logits"]
    assert torch.allclose(a, b, atol=1e-5)
    assert torch.equal(a.argmax(1), b.argmax(1))


def test_short_run_saves_resumes_and_reloads(data, tmp_path):
    res = train_ovss("escnet-tiny", data, tmp_path, steps=2, batch_size=2, seed=0, save_every=2, log_every=0)
    assert res["steps"] == 2 and (tmp_path / "last.pt").is_file()
    more = train_ovss("escnet-tiny", data, tmp_path, steps=3, batch_size=2, seed=0, resume=True, log=lambda m: None, log_every=0)
    assert more["steps"] == 3
    images = torch.stack([SemSegDataset(data, "val", 128)[i]["image"] for i in range(2)])
    _same_predictions(more["model"], more["checkpoint"], images)


@pytest.mark.slow
# Measured (one thread, held-out mIoU): ESC-Net 80 / 100 / 120 / 220 steps: 0.839 / 0.855 / 0.859 / 0.899;
# SAM-MI 80 / 100 / 120 / 220: 0.680 / 0.850 / 0.883 / 0.932. One thread makes the run the same
# sums on every 2-core machine, busy or not (100 steps re-measured a day later: 0.855 / 0.850 again),
# so 100 steps keep a 0.05 margin and save a sixth of the suite's two longest OVSS tests.
@pytest.mark.parametrize("config, steps", [("escnet-tiny", 100), ("sam-mi-tiny", 100)])
def test_learns_generated_semseg(data, tmp_path, config, steps, one_torch_thread):
    """mIoU >= 0.8 on held-out generated images after a minute or two of CPU (fixed seeds)."""
    t0 = time.perf_counter()
    res = train_ovss(config, data, tmp_path, steps=steps, batch_size=4, seed=0, log_every=0)
    val = SemSegDataset(data, "val")
    result = evaluate_ovss(res["model"], val)
    print(f"{config}: mIoU {result['mIoU']:.3f} after {res['steps']} steps, {time.perf_counter() - t0:.0f}s", result["per_class"])
    assert result["mIoU"] >= 0.8
    images = torch.stack([SemSegDataset(data, "val", 128)[i]["image"] for i in range(2)])
    _same_predictions(res["model"], res["checkpoint"], images)
