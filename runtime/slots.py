"""The argument slots of a compiled entry: what each `args[i]` points to.

A compiled program's entry receives `void **args`; the compiler describes each slot with one
of the classes below, in order. Slots are plain immutable descriptions (no arrays), so they
can be stored and cached next to the object code; `Program` binds memory to them.

    Input      fed by the caller on every call; validated and, if needed, converted first
    Param      a caller-owned array bound once, without copy (the program may update it)
    State      a buffer the runtime owns and zero-fills once, kept across calls (momentum)
    Output     a fresh array per call, returned to and owned by the caller
    Workspace  a scratch arena allocated once, 64-byte aligned, reused by every call
    Status     one int64 the entry sets when it refuses the call's inputs (see Input) or
               stops at one of its own checks

Data pointers of caller memory (inputs, params, outputs) are only as aligned as numpy makes
them (the element size at least); State and Workspace start on a 64-byte boundary.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["Input", "Output", "Param", "Slot", "State", "Status", "Workspace"]


# Integer dtype -> the unsigned dtype of its size (itself if unsigned), for range checks.
_UNSIGNED = {np.dtype(f"{kind}{size}"): np.dtype(f"u{size}") for kind in "iu" for size in (1, 2, 4, 8)}
_maximum = np.maximum.reduce  # a ufunc's reduce directly: array.max() adds a layer of Python


def _describe(array: np.ndarray) -> str:
    return f"shape {array.shape} {array.dtype}"


@dataclasses.dataclass(frozen=True)
class _ArraySlot:
    """A slot holding one array: its name, shape and dtype (normalized on construction)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype = np.dtype("float32")

    def __post_init__(self):
        shape = tuple(int(extent) for extent in self.shape)
        if any(extent < 0 for extent in shape):
            raise ValueError(f"{self.name!r}: shape extents must be non-negative, got {shape}")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "dtype", np.dtype(self.dtype))

    @property
    def description(self) -> str:
        return f"shape {self.shape} {self.dtype}"


@dataclasses.dataclass(frozen=True)
class Input(_ArraySlot):
    """An array the caller feeds on every call.

    valid_range=(lo, hi) (integer inputs only) requires lo <= value < hi for every element,
    checked before native code runs: class labels index arrays there.
    """

    valid_range: tuple[int, int] | None = None
    # The entry itself checks valid_range before any kernel runs, and returns at once, having
    # written this slot's argv position + 1 into the program's Status slot, if a value is out
    # of range: one pass in native code instead of a numpy reduction per call.
    range_checked_natively: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.dtype.kind not in "fiu":
            raise ValueError(f"input {self.name!r}: dtype must be a float or integer type, got {self.dtype}")
        if self.valid_range is not None:
            object.__setattr__(self, "valid_range", self._checked_valid_range())

    def _checked_valid_range(self) -> tuple[int, int]:
        lo, hi = (int(bound) for bound in self.valid_range)
        if self.dtype.kind == "f":
            raise ValueError(f"input {self.name!r}: valid_range applies to integer inputs, not {self.dtype}")
        limits = np.iinfo(self.dtype)
        if not limits.min <= lo < hi <= limits.max + 1:
            raise ValueError(f"input {self.name!r}: valid_range [{lo}, {hi}) is empty or exceeds {self.dtype}")
        return lo, hi

    def prepare(self, value) -> np.ndarray:
        """`value` as a C-contiguous array of this input's shape and dtype, ready for native code.

        Raises ValueError, naming the input, for a wrong shape, a value of another kind
        (float for an integer input, integer or bool for a float input) or an integer out of
        range; converts within a kind (float64 -> float32, int64 -> int32 after a range check)
        and copies non-contiguous arrays.
        """
        if (type(value) is np.ndarray and value.dtype is self.dtype and value.shape == self.shape
                and value.flags.c_contiguous):
            # The common case, in the fewest operations: numpy's built-in dtypes are singletons.
            if self.valid_range is not None and not self.range_checked_natively:
                self._check_valid_range(value)
            return value
        return self._converted(value)

    def _converted(self, value) -> np.ndarray:
        """`prepare` for any other value: every check, and a conversion or copy if needed."""
        array = value if type(value) is np.ndarray else np.asarray(value)
        if array.shape != self.shape:
            raise ValueError(f"input {self.name!r}: expected {self.description}, got {_describe(array)}")
        same_dtype = array.dtype == self.dtype
        if not same_dtype:
            self._check_kind(array)
        if self.valid_range is not None:  # lies within the dtype's range: one check does both
            self._check_values(array, self.valid_range, "the valid range")
        elif not same_dtype and self.dtype.kind != "f":  # a narrowing must not wrap around silently
            limits = np.iinfo(self.dtype)
            self._check_values(array, (limits.min, limits.max + 1), f"the range of {self.dtype}")
        if same_dtype and array.flags.c_contiguous:
            return array
        return np.ascontiguousarray(array, dtype=self.dtype)

    def _check_kind(self, array: np.ndarray) -> None:
        accepted = "f" if self.dtype.kind == "f" else "iu"
        if array.dtype.kind not in accepted:
            required = "a float" if accepted == "f" else "an integer"
            raise ValueError(
                f"input {self.name!r}: expected {self.description}, "
                f"got {_describe(array)} ({required} array is required)"
            )

    def _check_valid_range(self, array: np.ndarray) -> None:
        """The valid-range check of an array of this input's own dtype, in one reduction if lo is 0.

        Read as unsigned, a negative value of a signed dtype is at least 2**(bits - 1), and
        hi <= 2**(bits - 1) then (valid_range lies within the dtype): the largest unsigned
        value is below hi exactly when every value lies in [0, hi).
        """
        lo, hi = self.valid_range
        unsigned = _UNSIGNED.get(array.dtype)
        if lo == 0 and unsigned is not None and array.size and int(_maximum(array.view(unsigned), None)) < hi:
            return
        self._check_values(array, self.valid_range, "the valid range")  # fails, or checks the general case

    def range_error(self, array: np.ndarray) -> ValueError:
        """The error for an array whose values the entry found outside valid_range."""
        try:
            self._check_values(array, self.valid_range, "the valid range")
        except ValueError as error:
            return error
        return ValueError(f"input {self.name!r}: the compiled program found values outside "
                          f"the valid range {list(self.valid_range)}")

    def _check_values(self, array: np.ndarray, bounds: tuple[int, int], what: str) -> None:
        if array.size == 0:
            return
        lo, hi = bounds
        smallest, largest = int(array.min()), int(array.max())
        if smallest < lo or largest >= hi:
            raise ValueError(
                f"input {self.name!r}: values must lie in {what} [{lo}, {hi}), "
                f"got values from {smallest} to {largest}"
            )


@dataclasses.dataclass(frozen=True)
class Param(_ArraySlot):
    """A caller-owned array bound once, without copy; `updated` if the program writes it."""

    updated: bool = False

    def check_binding(self, array) -> np.ndarray:
        """`array` itself if native code may use it in place; ValueError naming the param if not."""
        problem = self._binding_problem(array)
        if problem:
            raise ValueError(f"param {self.name!r}: {problem}; params are bound without copy")
        return array

    def _binding_problem(self, array) -> str | None:
        if not isinstance(array, np.ndarray):
            return f"expected a numpy array, got {type(array).__name__}"
        if array.shape != self.shape or array.dtype != self.dtype:
            return f"expected {self.description}, got {_describe(array)}"
        if not array.flags.c_contiguous:
            return "the array must be C-contiguous (np.ascontiguousarray makes a bindable copy)"
        if not array.flags.aligned:
            return "the array's data is not aligned to its element size"
        if self.updated and not array.flags.writeable:
            return "the program updates this param in place but the array is read-only"
        return None


@dataclasses.dataclass(frozen=True)
class State(_ArraySlot):
    """A runtime-owned buffer, zero at first and kept across calls (e.g. SGD momentum)."""


@dataclasses.dataclass(frozen=True)
class Output(_ArraySlot):
    """A result: a fresh array per call, which the entry must fill completely."""


@dataclasses.dataclass(frozen=True)
class Workspace:
    """Scratch memory for intermediates, allocated once and reused by every call."""

    nbytes: int
    name: str = "workspace"

    def __post_init__(self):
        if int(self.nbytes) < 0:
            raise ValueError(f"workspace {self.name!r}: nbytes must be non-negative, got {self.nbytes}")
        object.__setattr__(self, "nbytes", int(self.nbytes))


@dataclasses.dataclass(frozen=True)
class Status:
    """One int64 the runtime zeroes before each call. After it: positive when the entry refused
    the inputs (the argv position + 1 of the first input it found out of range), negative
    when it stopped at one of its own checks (a code its compiler defines: see Program's
    `on_stop`), zero when it ran to the end."""

    name: str = "status"


Slot = Input | Param | State | Output | Workspace | Status
