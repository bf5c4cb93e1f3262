"""Multi-process training: torchrun with the gloo backend on CPU keeps the ranks' weights identical."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HELPER = Path(__file__).parent / "helpers" / "ddp_worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_torchrun_two_ranks_identical_after_a_step(tmp_path):
    from sspsam.models.build import build_model
    from sspsam.config import load_config
    from sspsam.data import generate_refer
    from sspsam.engine.trainer import seed_everything

    data = tmp_path / "refcoco"
    generate_refer(data, "refcoco", n_images=8, seed=0)
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(HELPER), str(data), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    r0 = torch.load(out / "rank0.pt", weights_only=True)
    r1 = torch.load(out / "rank1.pt", weights_only=True)
    assert r0["world"] == r1["world"] == 2 and r0["step"] == r1["step"] == 1
    a, b = r0["state_dict"], r1["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"ranks differ at {k}"

    # the step really moved the trainable weights (the ranks saw different samples, so only the
    # gradient all-reduce can have kept them equal)
    cfg = load_config("ssp-sam-tiny")
    seed_everything(3407)
    init = build_model(cfg).state_dict()
    moved = [k for k in a if k.startswith("ssp_encoder.") and not torch.equal(a[k], init[k])]
    frozen_same = all(torch.equal(a[k], init[k]) for k in a if k.startswith("clip."))
    assert moved and frozen_same
    # rank 0 wrote the usual run files
    assert (out / "run" / "model.pt").is_file() and (out / "run" / "last.pt").is_file()
