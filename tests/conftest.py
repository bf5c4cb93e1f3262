"""Shared test fixtures.

OpenMP threads wait passively here: torch's pool otherwise spins between ops, and on a busy
2-core machine (CI beside another job, or two suites at once) the spinning threads steal the cores
the work needs; a tiny conv training loop measured 2.8x slower spinning than passive under load.
Set before torch loads (libgomp reads it once); test subprocesses inherit it.
"""

import json
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


# Files go out to the xdist workers whole (``--dist loadfile``: module fixtures are built once) and,
# with ``--no-loadscope-reorder`` (pyproject), in collection order. Sorting them longest first is
# the longest-processing-time-first schedule: left in xdist's order (most tests first), the
# few-test training files came last and one worker idled at the end while the other trained.
# The figures are the suite's own: each full run writes the seconds per file it measured to
# DURATIONS, and the next run orders by them. A file not in it keeps its place among the short
# ones; a stale or missing file only costs balance, never a result.
DURATIONS = Path(__file__).with_name("durations.json")


def read_durations(path: Path = DURATIONS) -> dict[str, float]:
    """{test file name: seconds} from the last full run; {} when there is none (or it is unreadable)."""
    try:
        files = json.loads(path.read_text())["files"]
        return {str(k): float(v) for k, v in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def write_durations(seconds: dict[str, float], path: Path = DURATIONS) -> None:
    """Write the table atomically (a temporary file renamed over the old one): a run killed while
    writing leaves the previous table, never half of one."""
    body = {"about": "seconds per test file in the last full run (setup + call + teardown), written by "
                     "tests/conftest.py; the suite hands files to the workers longest first",
            "files": {k: round(v, 1) for k, v in sorted(seconds.items(), key=lambda kv: (-kv[1], kv[0]))}}
    fd, tmp = tempfile.mkstemp(prefix=".durations-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(body, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def pytest_collection_modifyitems(session, config, items):
    known = read_durations()
    items.sort(key=lambda item: -known.get(item.path.name, 0.0))  # stable: files stay whole, in order


_measured: dict[str, float] = {}


def pytest_runtest_logreport(report):
    """Sum each file's phases (the first test's setup carries the module fixtures). Under xdist the
    controller receives every worker's reports, so its sum covers the whole run."""
    name = report.nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
    _measured[name] = _measured.get(name, 0.0) + report.duration


def _full_run(session) -> bool:
    """The whole suite ran, unfiltered: a partial run's figures would drop files from the table."""
    config = session.config
    opt = config.option
    if getattr(opt, "keyword", "") or getattr(opt, "markexpr", "") or getattr(opt, "deselect", None) \
            or getattr(opt, "lf", False) or getattr(opt, "exitfirst", False) or getattr(opt, "collectonly", False):
        return False
    here = Path(__file__).resolve().parent
    return bool(config.args) and all(Path(config.invocation_params.dir, a).resolve() == here for a in config.args)


def pytest_sessionfinish(session, exitstatus):
    if hasattr(session.config, "workerinput"):  # an xdist worker: the controller writes
        return
    if exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED) and _measured and _full_run(session):
        # a file that ran nothing this time (skipped as a whole: no browser, no Ray) keeps its last figure
        here = Path(__file__).parent
        kept = {k: v for k, v in read_durations().items() if k not in _measured and (here / k).is_file()}
        write_durations({**kept, **_measured})


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
