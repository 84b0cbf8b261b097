"""A reader given a FIFO must refuse it at once, not wait for a writer that never comes."""
from __future__ import annotations

import os
import threading

import pytest


def assert_fifo_refused_without_waiting(read, path, seconds: float = 5.0) -> None:
    """Make `path` a FIFO and call `read(path)` in a thread: it must raise a ValueError naming
    the path within `seconds`. A blocked read is released (a writer opens the FIFO) so that the
    test process does not hang."""
    os.mkfifo(path)
    outcome = []

    def attempt():
        try:
            read(path)
            outcome.append(None)
        except Exception as error:   # noqa: BLE001 - judged below
            outcome.append(error)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout=seconds)
    if thread.is_alive():
        with open(path, "wb"):   # a writer releases the blocked open
            pass
        thread.join()
        pytest.fail(f"{getattr(read, '__name__', read)} waited for a writer on a FIFO")
    assert isinstance(outcome[0], ValueError) and str(path) in str(outcome[0]), outcome[0]
