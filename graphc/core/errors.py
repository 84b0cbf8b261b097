"""Errors graphc raises, and where in the user's program they come from."""
from __future__ import annotations

import contextvars
import os
import sys

# The graphc package (this file is in graphc/core/): frames in any of its modules are not the user's.
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


class ShapeError(ValueError):
    """An op was built from operands whose shapes or dtypes it cannot take."""


# Set while graphc builds nodes for a user's call later than the call itself (a cached training
# step's gradient graph, built when someone asks to see it): the line of that call.
_deferred_site: contextvars.ContextVar[str | None] = contextvars.ContextVar("graphc_deferred_site", default=None)


class building_for:
    """Inside the block, `user_site()` is `site`: nodes built now belong to the user's earlier call.

    A class, not a generator context manager: every graph pass enters one per node."""

    __slots__ = ("_site", "_token")

    def __init__(self, site: str):
        self._site = site

    def __enter__(self) -> None:
        self._token = _deferred_site.set(self._site)

    def __exit__(self, *exc_info) -> None:
        _deferred_site.reset(self._token)


def user_site() -> str:
    """`file:line` of the innermost stack frame outside graphc: the user's line that built a node.

    Walking frames is cheap next to everything else an op does at build time, and it is what
    makes every listing and every error point at the user's own code.
    """
    deferred = _deferred_site.get()
    if deferred is not None:
        return deferred
    frame = sys._getframe(1)
    while frame is not None:
        filename = frame.f_code.co_filename
        if not _inside_graphc(frame):
            return f"{os.path.basename(filename)}:{frame.f_lineno}"
        frame = frame.f_back
    return "<graphc>"


def _inside_graphc(frame) -> bool:
    filename = frame.f_code.co_filename
    if filename.startswith("<"):
        # code generated from a string (a dataclass's __init__) belongs to the module it was made for
        return frame.f_globals.get("__name__", "").split(".")[0] == __name__.split(".")[0]
    return os.path.abspath(filename).startswith(_PACKAGE_DIR)


def at_user_line(message: str) -> str:
    """`message` followed by the user's line, as every graphc error ends."""
    return f"{message} (at {user_site()})"


def shape_error(op: str, reason: str, operands, site: str | None = None) -> ShapeError:
    """A ShapeError naming the op, the reason, every operand's shape and dtype, and the user's line."""
    described = ", ".join(_describe(o) for o in operands)
    return ShapeError(f"{op}: {reason}; operands: {described} (at {site or user_site()})")


def _describe(operand) -> str:
    shape = getattr(operand, "shape", None)
    if shape is None:
        return repr(operand)
    name = getattr(operand, "name", None)
    label = f"{name} " if name else ""
    return f"{label}{getattr(operand, 'dtype', '')}{list(shape)}"
