"""Reading files another user may have written: only regular files, never blocking, bounded."""
from __future__ import annotations

import os
import stat

# deflate cannot expand data by more than this: bounds what a compressed member may claim
DEFLATE_MAX_RATIO = 1032
READ_CHUNK = 1 << 20


def open_regular_file(path, what: str, error: type[Exception] = ValueError):
    """`path` opened for binary reading, or `error` ("{path}: not {what} (a directory)") when
    it is not a regular file. A missing file stays a FileNotFoundError."""
    # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
            raise error(f"{path}: not {what} ({kind})")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
