"""The check every bad-input test makes: the error's type, what it names, and the user's line."""
import os

import pytest


def refused(error, build, *fragments):
    """Run the one-line lambda `build`; check it raises `error` naming each fragment and the
    lambda's own `file:line` (graphc errors point at the user's line)."""
    with pytest.raises(error) as info:
        build()
    message = str(info.value)
    here = f"{os.path.basename(build.__code__.co_filename)}:{build.__code__.co_firstlineno}"
    for fragment in fragments + (here,):
        assert fragment in message, f"{fragment!r} not in: {message}"
    return info.value
