"""benchmarks/gpu_check.py: its CPU rehearsal (--dry-run) runs every step of the GPU check and
passes, and without a GPU a plain run says so in one line."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.timeout(300)
def test_dry_run_passes_every_step(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SCRIPT.parents[1])}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line.split(" | ") for line in proc.stdout.splitlines() if line.startswith("| ") and " | " in line]
    checks = {r[0].lstrip("| "): r[1] for r in rows if r[1] in ("PASS", "FAIL", "skip")}
    assert "FAIL" not in checks.values()
    names = " ".join(checks)
    for step in ("segment shapes-demo cpu bf16", "ovss ovss-shapes-demo cpu fp32", "onnx export", "train ssp-sam-tiny",
                 "train escnet-tiny", "feature cache + cached epoch", "stage table"):
        assert step in names, (step, sorted(checks))
    train_rows = [k for k in checks if k.startswith(("train", "feature cache"))]
    assert train_rows and all(checks[k] == "PASS" for k in train_rows)
    assert "| ssp-sam-tiny | decode_1 | bf16 |" in proc.stdout  # the stage table follows, with its bf16 rows


def test_without_a_gpu_one_line_and_nothing_checked(monkeypatch, capsys):
    import torch

    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert mod.main([]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("gpu_check: no CUDA device here, nothing checked")
