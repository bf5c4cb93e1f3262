"""Shared test fixtures.

OpenMP threads wait passively here: torch's pool otherwise spins between ops, and on a busy
2-core machine (CI beside another job, or two suites at once) the spinning threads steal the cores
the work needs; a tiny conv training loop measured 2.8x slower spinning than passive under load.
Set before torch loads (libgomp reads it once); test subprocesses inherit it.
"""

import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# The suite's golden fixtures, quality tables and kill/resume checks compare fp32 numerics bit for
# bit; on a host with bf16 units ``dtype="auto"`` would run them in bf16. Pinned for the suite and
# its subprocesses; tests of the automatic choice unset it (tests/test_auto_dtype.py).
os.environ["SSPSAM_DTYPE"] = "fp32"

import pytest  # noqa: E402
import torch  # noqa: E402

REPORTS = "SSPSAM_TEST_REPORTS"


def pytest_configure(config):
    """One folder for the tables tests leave for the end of the run (the fuzz summary): xdist
    workers inherit the controller's, so what a worker writes reaches the controller's terminal."""
    if REPORTS not in os.environ:
        os.environ[REPORTS] = tempfile.mkdtemp(prefix="sspsam-test-reports-")
        config._sspsam_reports_owner = True


def pytest_terminal_summary(terminalreporter, config):
    for f in sorted(Path(os.environ[REPORTS]).glob("*.txt")):
        for line in f.read_text().splitlines():
            terminalreporter.write_line(line)


def pytest_unconfigure(config):
    if getattr(config, "_sspsam_reports_owner", False):
        shutil.rmtree(os.environ.pop(REPORTS), ignore_errors=True)


# Seconds per test file in a quiet 2-core run (`pytest --durations`, 2026-12-05), the long files
# only. xdist's loadfile hands files out with the most tests first, which put the few-test training
# files (two or three tests, minutes each) last: one worker idled for about a minute at the end while
# the other trained. With `--no-loadscope-reorder` (pyproject) files go out in collection order, and
# this puts the longest first: the longest-processing-time-first schedule. A file not listed keeps
# its place among the short ones; a stale figure only costs balance, never a result.
LONG_FILES = {
    "test_ovss_train.py": 240, "test_e2e.py": 196, "test_golden_ssp.py": 107, "test_trainer_ovss.py": 86,
    "test_fuzz.py": 74, "test_golden_clip.py": 57, "test_demo_quality.py": 55, "test_api.py": 42,
    "test_serve_ray.py": 43, "test_track.py": 38, "test_batch.py": 31, "test_onnx.py": 23, "test_faults.py": 19, "test_golden_recipe.py": 19,
    "test_feature_cache.py": 18, "test_browser.py": 12, "test_ovss_models.py": 12, "test_distributed.py": 7,
}


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=lambda item: -LONG_FILES.get(item.path.name, 0))  # stable: files stay whole, in order


def write_report(name: str, lines: list[str]) -> None:
    """Leave ``lines`` for the end-of-run summary (see ``pytest_terminal_summary``)."""
    (Path(os.environ[REPORTS]) / f"{name}.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture
def one_torch_thread():
    """One torch thread for a test, restored after (the training tests use it on a 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
