"""A counter on stderr while the prompt is computed (prefill), on a terminal only."""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def waiting(label: str, enabled: bool) -> Iterator[None]:
    """Show `label… 1.2 s` on stderr, refreshed, until the block ends; then erase it."""
    if not enabled:
        yield
        return
    done = threading.Event()
    start = time.monotonic()

    def tick() -> None:
        frames = "|/-\\"
        i = 0
        while not done.wait(0.1):
            sys.stderr.write(f"\r{frames[i % 4]} {label}… {time.monotonic() - start:.1f} s")
            sys.stderr.flush()
            i += 1

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        sys.stderr.write("\r\033[K")
        sys.stderr.flush()
