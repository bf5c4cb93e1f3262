"""End to end on CPU: `sspsam train` on generated gRefCOCO data, `sspsam evaluate` on held-out
images clears the issue's bar; a short run killed with SIGKILL past its first checkpoint and resumed
gives bitwise the same weights, losses and metrics as an uninterrupted one.

The data set is the real gRefCOCO file format (grefs(unc).json + instances.json + images) with an
easy, well-posed vocabulary — 2–3 large shapes in 4 colours, "the red shape" (one target) or
"the green shape" when there is none (no target) — so a tiny model learns it in CI's budget.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from sspsam.cli.main import app

# The learning run. Training is chaotic in float rounding (two builds whose kernels differ in the
# last bit diverge from step 9), so the recipe must clear the bar by a margin, not on one
# lucky rounding. A tiny model's step is dispatch-bound, so a batch of 16 costs ~1.4x a batch of 8
# (40-step runs: 422 against 305 ms a step): 600 steps of 16 see 0.8x the samples of 1500 steps of 8,
# and land higher, in 0.62x the time in the suite (313 -> 195 s; 187 s alone on a quiet core).
# Measured (1 thread, held-out val: mIoU_target / N-acc), one SAM decoder call per batch:
#   600 steps, batch 16: seed 1: 0.891 / 1.0; seed 2: 0.884 / 0.979; seed 3407: 0.849 / 0.936
#     (lr 2e-3, seed 1: 0.379 / 0.0: diverges; 300 steps of 32, seed 1: 0.829 / 1.0)
#   1500 steps, batch 8 (the recipe before): seed 1: 0.917 / 1.0; seed 2: 0.823 / 0.979; 1000
#     steps: seed 1: 0.779, seed 2: 0.882.
#   One layer instead of two in the CLIP towers, the SAM encoder and the Prompt Generator (~0.7x a
#   step): 600 steps: seed 1: 0.902 / 1.0, seed 2: 0.869 / 0.979, but seed 3407: 0.336 / 0.0 (it
#   collapses onto "no target"); 400 steps, seed 2: 0.690 / 0.489. Not adopted.
STEPS = int(os.environ.get("SSPSAM_E2E_STEPS", 600))
MIN_MIOU_TARGET, MIN_N_ACC = 0.8, 0.9  # the bar, on held-out images
LEARN_ARGS = ["--dataset", "grefcoco", "--steps", str(STEPS), "--seed", "1", "--batch-size", "16", "--lr", "1e-3",
              "--decoder-lr", "1e-3", "--ckpt-every", str(STEPS)]
# The kill/resume pair, on its own 30-image set: 45 training phrases / batch 8 = 5 steps an epoch,
# so the run resumed from step 7 (mid-epoch) crosses the boundary at step 10 and both the sampler's
# position and its epoch are restored.
SHORT, CKPT, KILL_AT = 14, 7, 9
RESUME_ARGS = ["--dataset", "grefcoco", "--steps", str(SHORT), "--batch-size", "8", "--lr", "1e-3",
               "--decoder-lr", "1e-3", "--ckpt-every", str(CKPT)]


def _setup(base: Path, n_images: int):
    from sspsam.config import load_config
    from sspsam.data import generate_grefcoco

    root = base / "data"
    generate_grefcoco(
        root, n_images=n_images, seed=0, train_share=0.7, multi_target=False, no_target_share=0.4, splits=("train", "val"),
        scene_options={"n_objects": (2, 3), "palette": ("red", "green", "blue", "yellow"), "background": "plain",
                       "radius": (0.15, 0.3), "width": 160, "height": 128},
        templates={"colour", "absent-colour-only"},
    )
    cfg = load_config("ssp-sam-tiny")
    cfg["ssp"]["no_target_head"] = "mask"
    # CLIP frozen as in the paper (random here: a fixed random text tower still tells colour words
    # apart, while a trainable one collapses onto "segment every shape" in this budget)
    cfg["train"] = {"freeze": ["clip"], "augment": False, "warmup_steps": 20, "clip_grad": 1.0}
    cfg_path = base / "e2e-tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    return root, cfg_path, base


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return _setup(tmp_path_factory.mktemp("e2e"), 300)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return _setup(tmp_path_factory.mktemp("e2e-small"), 30)


def _evaluate(model: Path, root: Path, out: Path) -> dict:
    r = CliRunner().invoke(app, ["evaluate", str(model), "--data", str(root), "--dataset", "grefcoco",
                                 "--split", "val", "-o", str(out)])
    assert r.exit_code == 0, r.output
    return json.loads((out / "metrics.json").read_text())["metrics"]


def _sspsam(*args) -> list[str]:
    return [sys.executable, "-c", "from sspsam.cli.main import app; app()", *args]


@pytest.mark.slow
@pytest.mark.timeout(5400)  # a hang guard: 600 tiny steps of 16 take ~3 min on one core
def test_train_then_evaluate_on_held_out_images_clears_the_bar(setup):
    root, cfg_path, base = setup
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread: never oversubscribed on a busy machine
    a = base / "learn"
    done = subprocess.run(_sspsam("train", str(cfg_path), "--data", str(root), "--out", str(a), *LEARN_ARGS),
                          env=env, capture_output=True, text=True, timeout=5000)
    assert done.returncode == 0, done.stderr[-3000:]
    m = _evaluate(a / "model.pt", root, base / "eval_learn")
    assert m["n_target"] >= 80 and m["n_no_target"] >= 30
    assert m["mIoU_target"] >= MIN_MIOU_TARGET, m
    assert m["N-acc"] >= MIN_N_ACC, m


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_kill9_then_resume_gives_identical_weights_and_metrics(small):
    import torch

    root, cfg_path, base = small
    grefs = json.loads(next(root.rglob("grefs*.json")).read_text())
    phrases = sum(len(r["sentences"]) for r in grefs if r["split"] == "train")
    assert phrases // 8 == 5, phrases  # the epoch length SHORT, CKPT, KILL_AT are chosen for
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread: never oversubscribed on a busy machine

    # run A: uninterrupted
    a = base / "a"
    done = subprocess.run(_sspsam("train", str(cfg_path), "--data", str(root), "--out", str(a), *RESUME_ARGS),
                          env=env, capture_output=True, text=True, timeout=2400)
    assert done.returncode == 0, done.stderr[-3000:]

    # run B: SIGKILL once steps past the first checkpoint have run, then --resume
    b = base / "b"
    proc = subprocess.Popen(_sspsam("train", str(cfg_path), "--data", str(root), "--out", str(b), *RESUME_ARGS),
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = b / "log.jsonl"
    deadline = time.time() + 2400
    while time.time() < deadline:
        lines = log.read_text().splitlines() if log.is_file() else []
        if len(lines) >= KILL_AT:
            break
        assert proc.poll() is None, "run B ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (b / "model.pt").exists()
    killed_log = [json.loads(x) for x in log.read_text().split("\n")[:-1]]  # complete lines only
    assert CKPT < len(killed_log) < SHORT
    resumed = subprocess.run(_sspsam("train", str(cfg_path), "--data", str(root), "--out", str(b), "--resume", *RESUME_ARGS),
                             env=env, capture_output=True, text=True, timeout=2400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log_b = [json.loads(x) for x in log.read_text().splitlines()]
    assert [r["step"] for r in log_b] == list(range(1, SHORT + 1))  # the steps past the checkpoint were dropped and redone
    # the redone steps repeat the killed run's losses exactly, and the whole log matches run A's
    assert log_b[:len(killed_log)] == killed_log
    assert log_b == [json.loads(x) for x in (a / "log.jsonl").read_text().splitlines()]

    sa = torch.load(a / "model.pt", map_location="cpu", weights_only=False)["state_dict"]
    sb = torch.load(b / "model.pt", map_location="cpu", weights_only=False)["state_dict"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    ma = _evaluate(a / "model.pt", root, base / "eval_a")
    mb = _evaluate(b / "model.pt", root, base / "eval_b")
    for k, v in ma.items():
        assert mb[k] == pytest.approx(v, abs=1e-6), k

