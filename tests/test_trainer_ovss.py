"""ESC-Net through the shared training loop: torchrun (gloo, CPU) keeps both ranks' weights
identical, and a run killed with SIGKILL past its first checkpoint and resumed ends bitwise where
an uninterrupted run ends, with the same metrics."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sspsam.cli.main import app

HELPER = Path(__file__).parent / "helpers" / "ddp_ovss_worker.py"
# 6 training images / batch 2 = 3 steps an epoch: the resume point (step 4) is mid-epoch and the
# resumed run crosses three epoch boundaries (6, 9, 12), so the sampler's position and epoch are both restored.
SHORT, CKPT, KILL_AT = 12, 4, 6
ARGS = ["--steps", str(SHORT), "--ckpt-every", str(CKPT), "--batch-size", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def semseg(tmp_path_factory):
    from sspsam.data.semseg import generate_semseg

    root = tmp_path_factory.mktemp("semseg")
    generate_semseg(root, n=6, size=96, seed=0, splits=("train",))
    generate_semseg(root, n=6, size=96, seed=1, splits=("val",))
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sspsam(*args) -> list[str]:
    return [sys.executable, "-c", "from sspsam.cli.main import app; app()", *args]


def _env() -> dict:
    root = str(Path(__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    # one thread: never oversubscribed on a busy machine
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{root}{os.pathsep}{path}" if path else root}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_torchrun_two_ranks_identical_after_a_step(semseg, tmp_path):
    from sspsam.engine.train_ovss import build_ovss_training_model
    from sspsam.config import load_config

    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(HELPER), str(semseg), str(out)]
    proc = subprocess.run(cmd, env={**_env(), "MASTER_ADDR": "127.0.0.1"}, capture_output=True, text=True, timeout=580)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    r0 = torch.load(out / "rank0.pt", weights_only=True)
    r1 = torch.load(out / "rank1.pt", weights_only=True)
    assert r0["world"] == r1["world"] == 2 and r0["step"] == r1["step"] == 1
    a, b = r0["state_dict"], r1["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"ranks differ at {k}"
    # the step moved the trained parts (CLIP's text tower included: its gradient is all-reduced
    # too) and left the frozen SAM image encoder alone; the ranks drew different samples and flips,
    # so only the all-reduce can have kept them equal
    init = build_ovss_training_model(load_config("escnet-tiny"), 0).state_dict()
    moved = {k.split(".")[0] for k in a if not torch.equal(a[k], init[k])}
    assert "clip" in moved and len(moved) >= 2, moved
    assert all(torch.equal(a[k], init[k]) for k in a if k.startswith("sam.image_encoder."))
    assert (out / "run" / "model.pt").is_file() and (out / "run" / "last.pt").is_file()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_kill9_then_resume_gives_identical_weights_and_metrics(semseg, tmp_path):
    from sspsam.data.semseg import SemSegDataset
    from sspsam.engine.evaluate_ovss import evaluate_ovss
    from sspsam.models.build import _model_from_checkpoint

    assert len(SemSegDataset(semseg, "train")) // 2 == 3  # the epoch length SHORT, CKPT, KILL_AT are chosen for
    env = _env()
    a = tmp_path / "a"
    done = subprocess.run(_sspsam("train", "escnet-tiny", "--data", str(semseg), "--out", str(a), *ARGS),
                          env=env, capture_output=True, text=True, timeout=800)
    assert done.returncode == 0, done.stderr[-3000:]

    b = tmp_path / "b"
    proc = subprocess.Popen(_sspsam("train", "escnet-tiny", "--data", str(semseg), "--out", str(b), *ARGS),
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = b / "log.jsonl"
    deadline = time.time() + 800
    while time.time() < deadline:
        lines = log.read_text().splitlines() if log.is_file() else []
        if len(lines) >= KILL_AT:
            break
        assert proc.poll() is None, "run B ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (b / "model.pt").exists()
    killed_log = [json.loads(x) for x in log.read_text().split("\n")[:-1]]  # complete lines only
    assert CKPT < len(killed_log) < SHORT
    resumed = subprocess.run(_sspsam("train", "escnet-tiny", "--data", str(semseg), "--out", str(b), "--resume", *ARGS),
                             env=env, capture_output=True, text=True, timeout=800)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log_b = [json.loads(x) for x in log.read_text().splitlines()]
    assert [r["step"] for r in log_b] == list(range(1, SHORT + 1))  # the steps past the checkpoint were redone
    assert log_b[:len(killed_log)] == killed_log  # ... with the killed run's losses, exactly
    assert log_b == [json.loads(x) for x in (a / "log.jsonl").read_text().splitlines()]

    sa = torch.load(a / "model.pt", map_location="cpu", weights_only=False)["state_dict"]
    sb = torch.load(b / "model.pt", map_location="cpu", weights_only=False)["state_dict"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    val = SemSegDataset(semseg, "val")
    ma = evaluate_ovss(_model_from_checkpoint(a / "model.pt").eval(), val)
    mb = evaluate_ovss(_model_from_checkpoint(b / "model.pt").eval(), val)
    for k in ("mIoU", "fwIoU", "mACC", "pACC"):
        assert mb[k] == pytest.approx(ma[k], abs=1e-6), k
    assert ma["per_class"].keys() == mb["per_class"].keys()
    for k, v in ma["per_class"].items():
        assert mb["per_class"][k] == pytest.approx(v, abs=1e-6, nan_ok=True), k


def test_train_cli_refuses_ssp_options_for_ovss_configs(semseg, tmp_path):
    res = CliRunner().invoke(app, ["train", "escnet-tiny", "--data", str(semseg), "--out", str(tmp_path / "x"),
                                   "--dataset", "refcoco", "--decoder-lr", "1e-5"])
    assert res.exit_code == 2
    assert "--dataset, --decoder-lr are for SSP-SAM" in res.output and len(res.output.strip().splitlines()) == 1
    res = CliRunner().invoke(app, ["train", "zeroshot-tiny", "--data", str(semseg), "--out", str(tmp_path / "y")])
    assert res.exit_code == 2 and "not trained" in res.output


def test_sam_mi_resume_in_process_is_bitwise(semseg, tmp_path):
    """SAM-MI through the same loop: 2 steps, then --resume to 4 (same schedule length), equals 4 straight."""
    from sspsam.engine.train_ovss import train_ovss

    kw = dict(batch_size=2, seed=0, log_every=0, save_every=2, total_steps=4, tensorboard=False, log=lambda m: None)
    straight = train_ovss("sam-mi-tiny", semseg, tmp_path / "a", steps=4, **kw)
    train_ovss("sam-mi-tiny", semseg, tmp_path / "b", steps=2, **kw)
    resumed = train_ovss("sam-mi-tiny", semseg, tmp_path / "b", steps=4, resume=True, **kw)
    assert resumed["losses"] == straight["losses"][2:]
    sa, sb = straight["model"].state_dict(), resumed["model"].state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_ovss_bf16_and_grad_accum(semseg, tmp_path):
    from sspsam.engine.train_ovss import train_ovss

    res = train_ovss("escnet-tiny", semseg, tmp_path / "r", steps=1, batch_size=2, seed=0, log_every=0, tensorboard=False,
                     precision="bf16", grad_accum=2)
    assert res["steps"] == 1 and all(torch.isfinite(torch.tensor(res["losses"])))
    recs = [json.loads(x) for x in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1] and all({"total", "bce", "aux", "lr"} <= set(r) for r in recs)
