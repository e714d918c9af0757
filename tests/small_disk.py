"""A real file system that really fills up: a tmpfs mounted for one test (root only, as the tests and CI run).

with small_tmpfs(tmp_path / "state", "16m") as state:
    ...  # point the daemon's state_dir at it
    filler = fill(state)  # now every write there fails with ENOSPC
    filler.unlink()  # and the space is back
"""

from __future__ import annotations

import contextlib
import errno
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = "4m") -> Iterator[Path]:
    """A tmpfs of ``size`` at ``path``; the test is skipped where mounting is not allowed."""
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder: Path) -> Path:
    """Write zeros into ``folder/filler`` until the file system says it is full, to the last block."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as out:
        for chunk in (65536, 512):
            try:
                while True:
                    out.write(b"\0" * chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    return filler
