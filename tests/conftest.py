"""Shared test fixtures.

OpenMP threads wait passively here: torch's pool otherwise spins between ops, and on a busy
2-core machine (CI beside another job, or two suites at once) the spinning threads steal the cores
the work needs; a tiny conv training loop measured 2.8x slower spinning than passive under load.
Set before torch loads (libgomp reads it once); test subprocesses inherit it.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def one_torch_thread():
    """One torch thread for a test, restored after (the training tests use it on a 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
