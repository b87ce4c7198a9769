"""Load the benches put on the machine: one CPU core kept busy by a spinning child process."""
from __future__ import annotations

import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def busy_core(enabled: bool, settle_s: float = 0.3) -> Iterator[int | None]:
    """A spinning child process (one core kept busy) while the block runs; yields its pid (None when
    not ``enabled``). It runs ``settle_s`` before the block starts and is ended by its own pid."""
    if not enabled:
        yield None
        return
    proc = subprocess.Popen([sys.executable, "-c", "while True:\n    pass"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(settle_s)
        yield proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
