"""Shared test fixtures."""

import pytest
import torch


@pytest.fixture
def one_torch_thread():
    """One torch thread for a test, restored after (the training tests use it on a 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
