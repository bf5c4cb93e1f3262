"""atomic_write: whole files or nothing, with ordinary permissions."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sspsam.io.checkpoint import atomic_write


def test_atomic_write_content_and_permissions(tmp_path):
    out = atomic_write(tmp_path / "sub" / "a.txt", lambda p: Path(p).write_text("hello"))
    assert out.read_text() == "hello"
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    assert [p.name for p in out.parent.iterdir()] == ["a.txt"]


def test_atomic_write_failure_leaves_old_file_and_no_temp(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")

    def broken(p):
        Path(p).write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, broken)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]
