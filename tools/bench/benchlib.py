"""What the benchmarks share: a free loopback port and waiting for a condition (imported from tools/bench/)."""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait(what: str, check: Any, timeout: float = 30.0, every: float = 0.05) -> Any:
    """``check()``'s first truthy result; exits the benchmark, naming ``what``, if none comes in ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(every)
    raise SystemExit(f"{Path(sys.argv[0]).stem}: timed out waiting for {what}")
