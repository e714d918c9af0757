"""A normal (non-editable) install carries every module: the package-dir mapping misses nothing."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
MAPPED = {folder: f"fleetgate/{folder}" for folder in ("daemon", "drivers", "sync", "config")} | {
    "fleetgate": "fleetgate"
}


@pytest.mark.timeout(180)
def test_wheel_contains_every_module_and_shipped_config(tmp_path):
    """Guards against a subpackage that works in the editable checkout but is missing once installed."""
    # Build from a copy: setuptools reuses a checkout's build/ folder, whose leftovers would hide a miss.
    source = tmp_path / "src"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(".git", ".venv", ".run", "build", "*.egg-info", "__pycache__"),
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(source)],
        check=True,
        capture_output=True,
        timeout=170,
    )
    [wheel] = tmp_path.glob("fleetgate-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        f"{target}/{path.relative_to(ROOT / folder).as_posix()}"
        for folder, target in MAPPED.items()
        for path in (ROOT / folder).rglob("*")
        if path.suffix in (".py", ".toml", ".zdict") and "__pycache__" not in path.parts
    }
    assert expected - names == set()
