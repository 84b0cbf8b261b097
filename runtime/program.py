"""`Program`: a loaded compiled program, callable with numpy arrays.

A call validates and converts every feed before any native code runs, allocates the outputs
(`call_scalar`, a training step's call, reuses one buffer instead), writes their addresses
into the argument vector and runs the entry once on the program's threads. Small training
steps cost a microsecond of native time, so everything that does not change between calls
(param, state and workspace addresses, the ctypes function, slot positions) is prepared at
construction and the call path does only what must be done; a training step's one-thread
call is a single native function (`fast_call`) whenever its feeds need no conversion.
"""

from __future__ import annotations

import ctypes
import functools
import keyword
import math
import threading
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType

import numpy as np

from .buffers import aligned_zeros, data_pointer, unchecked_data_pointer
from .fast_call import REFUSED, Feed, fast_call_function
from .loader import NativeLibrary
from .slots import Input, Output, Param, Slot, State, Status, Workspace
from .threads import EntryFunction, default_team, get_num_threads

__all__ = ["Program"]

# Arguments of a single-threaded call, prebuilt: ctypes converts its own objects fastest.
_TID_0 = ctypes.c_int64(0)
_ONE_THREAD = ctypes.c_int64(1)


class Program:
    """A compiled entry `void entry(void **args, int64 tid, int64 nthreads)` with bound memory.

    `slots[i]` describes what `args[i]` points to (see `graphc_runtime.slots`). `params` maps
    each Param slot's name to the caller's array, bound without copy; extra names are
    ignored so a model's whole parameter dict can be passed. `max_threads` is the most
    threads the entry can use (1 for code that ignores tid); a call uses
    min(get_num_threads(), max_threads).

    Calls from several Python threads are serialized per program: the argument vector,
    the workspace and the state are shared by all calls.
    """

    def __init__(
        self,
        library: NativeLibrary,
        entry: str,
        slots: Sequence[Slot],
        params: Mapping[str, np.ndarray] | None = None,
        *,
        max_threads: int = 1,
        ignored_inputs: Iterable[str] = (),
    ):
        self.library = library  # keeps the machine code mapped while the program exists
        self.entry = entry
        self.slots = tuple(slots)
        if isinstance(max_threads, bool) or not isinstance(max_threads, int) or max_threads < 1:
            raise ValueError(f"max_threads must be a positive int, got {max_threads!r}")
        self.max_threads = max_threads
        _check_unique_names(self.slots)

        self.inputs = tuple(slot for slot in self.slots if isinstance(slot, Input))
        self.outputs = tuple(slot for slot in self.slots if isinstance(slot, Output))
        self._input_names = frozenset(slot.name for slot in self.inputs)
        # Names a caller may feed although the program does not read them (e.g. the labels of
        # a model, fed to its predict function): accepted and ignored, like any graph input.
        self._ignored_inputs = frozenset(ignored_inputs) - self._input_names
        # Where the slots that get new memory on every call go: (name, argv position, the
        # input's prepare method) for inputs, (slot, argv position) for outputs.
        self._input_plan = tuple((slot.name, position, slot.prepare) for slot, position in _plan_of(Input, self.slots))
        self._output_plan = _plan_of(Output, self.slots)

        # Memory bound for the program's life; held here so it outlives every call. The
        # mappings are read-only views: replacing an array in them would not rebind it.
        self.params = MappingProxyType(_bind_params(self.slots, params or {}))
        self.state = MappingProxyType(
            {slot.name: aligned_zeros(slot.shape, slot.dtype) for slot in self.slots if isinstance(slot, State)}
        )
        self._workspaces = {
            slot.name: aligned_zeros(slot.nbytes, np.uint8) for slot in self.slots if isinstance(slot, Workspace)
        }
        # Where the entry reports inputs it refused (Input.range_checked_natively), if anywhere.
        self._status = aligned_zeros((1,), np.int64) if any(isinstance(s, Status) for s in self.slots) else None
        self._status_cell = None if self._status is None else ctypes.c_int64.from_address(data_pointer(self._status))
        self._inputs_by_position = {position: slot for slot, position in _plan_of(Input, self.slots)}

        self._argv = (ctypes.c_void_p * max(len(self.slots), 1))()
        self._argv_address = ctypes.addressof(self._argv)
        self._argv_pointer = ctypes.c_void_p(self._argv_address)  # converts faster than an int
        for position, slot in enumerate(self.slots):
            memory = self._bound_memory(slot)
            if memory is not None:
                self._argv[position] = data_pointer(memory)

        self._scalar_output = self._scalar_output_buffer()
        self._entry_address = library.address(entry)
        self._entry_function = EntryFunction(self._entry_address)
        self._lock = threading.Lock()
        self._fast_call = self._fast_call_function()
        if self._scalar_output is not None:
            # Shadows the method below on this instance: a training step's call is then this
            # function alone, a Python frame less (see `_specialized_call_scalar`).
            self.call_scalar = _specialized_call_scalar(self)

    @functools.cached_property
    def keyword_call_scalar(self):
        """`call_scalar` with the feeds as keyword arguments, for a class's `__call__` (see
        `_keyword_call_scalar`); None when the inputs' names cannot be its parameters or the
        program has no single scalar output."""
        return None if self._scalar_output is None else _keyword_call_scalar(self)

    @property
    def num_threads(self) -> int:
        """Threads the next call will use."""
        return min(get_num_threads(), self.max_threads)

    def __call__(self, /, **feeds) -> list[np.ndarray]:
        """Run the program on `feeds` (one per Input, by name); return the outputs in slot order."""
        with self._lock:
            inputs = self._bind_inputs(feeds)
            outputs = []
            for slot, position in self._output_plan:
                array = np.empty(slot.shape, slot.dtype)
                outputs.append(array)
                self._argv[position] = unchecked_data_pointer(array)
            self._run_entry(inputs)
        return outputs

    def call_scalar(self, feeds: Mapping[str, object]):
        """Run the program on `feeds` and return its only output, of one element, as a Python number.

        A training step's fast path: the output is written to a buffer the program reuses, so
        a call allocates no array and converts none to a number.
        """
        # Reached only without such an output: otherwise __init__ bound the specialized call.
        raise TypeError(f"{self!r} does not have exactly one output of one element")

    def _bind_inputs(self, feeds: Mapping[str, object]) -> list[np.ndarray]:
        """Validate every feed and write its address into the argument vector; the arrays bound.

        Addresses written before a feed fails validation are harmless: native code runs only
        after every feed passed, and each call rewrites all of them.
        """
        if feeds.keys() != self._input_names and feeds.keys() - self._ignored_inputs != self._input_names:
            raise self._feed_names_error(feeds)
        argv = self._argv
        prepared = []
        for name, position, prepare in self._input_plan:
            array = prepare(feeds[name])
            prepared.append(array)
            argv[position] = unchecked_data_pointer(array)
        return prepared

    def _run_entry(self, inputs: list[np.ndarray]) -> None:
        """Run the entry once on the program's threads; `inputs` (the bound feeds, some of them
        converted copies) is held here so that no copy is freed while native code reads it."""
        if self._status_cell is not None:
            self._status_cell.value = 0
        if self.max_threads == 1 or get_num_threads() == 1:
            self._entry_function(self._argv_pointer, _TID_0, _ONE_THREAD)
        else:
            nthreads = min(get_num_threads(), self.max_threads)
            default_team().run(self._entry_address, self._argv_address, nthreads)
        if self._status_cell is not None and self._status_cell.value:
            raise self._refused_input_error(inputs)

    def _refused_input_error(self, inputs: list[np.ndarray]) -> ValueError:
        """The entry returned before any kernel ran: an input was out of its valid range."""
        position = self._status_cell.value - 1
        slot = self._inputs_by_position[position]
        array = inputs[[p for _, p, _ in self._input_plan].index(position)]
        return slot.range_error(array)

    def reset_state(self) -> None:
        """Zero every State buffer (e.g. forget the optimizer's momentum)."""
        with self._lock:
            for buffer in self.state.values():
                buffer.fill(0)

    def _scalar_output_buffer(self) -> tuple[np.ndarray, int, int, ctypes._SimpleCData] | None:
        """`call_scalar`'s output buffer (memory, address, argv position, ctypes view of the
        element), or None unless the program has exactly one output of one element."""
        if len(self.outputs) != 1 or math.prod(self.outputs[0].shape) != 1:
            return None
        ((slot, position),) = self._output_plan
        memory = aligned_zeros(slot.shape, slot.dtype)
        address = data_pointer(memory)
        return memory, address, position, np.ctypeslib.as_ctypes_type(slot.dtype).from_address(address)

    def _fast_call_function(self):
        """The native one-thread call of a program with one scalar output (`fast_call`), if
        this interpreter has one and every input can be checked by it."""
        if self._scalar_output is None or any(
                slot.valid_range is not None and not slot.range_checked_natively for slot in self.inputs):
            return None
        _, address, position, _ = self._scalar_output
        return fast_call_function(
            argv_address=self._argv_address, entry_address=self._entry_address,
            feeds=[Feed(position, slot.dtype, slot.shape) for slot, position in _plan_of(Input, self.slots)],
            output_position=position, output_address=address, output_dtype=self.outputs[0].dtype,
            status_address=None if self._status is None else data_pointer(self._status), keep_alive=self.library)

    def _bound_memory(self, slot: Slot) -> np.ndarray | None:
        if isinstance(slot, Param):
            return self.params[slot.name]
        if isinstance(slot, State):
            return self.state[slot.name]
        if isinstance(slot, Workspace):
            return self._workspaces[slot.name]
        if isinstance(slot, Status):
            return self._status
        return None  # inputs and outputs get new addresses on every call

    def _feed_names_error(self, feeds: Mapping) -> ValueError:
        missing = [slot for slot in self.inputs if slot.name not in feeds]
        extra = sorted(name for name in feeds if name not in self._input_names | self._ignored_inputs)
        problems = [f"missing input {slot.name!r} ({slot.description})" for slot in missing]
        problems += [f"unexpected input {name!r}" for name in extra]
        expected = ", ".join(repr(slot.name) for slot in self.inputs) or "none"
        return ValueError("; ".join(problems) + f"; the program's inputs are: {expected}")

    def __repr__(self) -> str:
        listing = ", ".join(f"{type(slot).__name__}({slot.name!r})" for slot in self.slots)
        return f"<Program {self.entry!r} max_threads={self.max_threads} [{listing}]>"


def _specialized_call_scalar(program: Program):
    """`call_scalar` for this program, as straight-line Python made for its inputs.

    What `_bind_inputs` and `_run_entry` do in loops over the inputs is written out once per
    input, with every constant a global of the function: a small step's native code takes
    about a microsecond, and the generic loops cost as much again. Any feed that is not a
    C-contiguous array of the input's exact shape and dtype goes through `Input.prepare`, as
    in `__call__`. Every name the generated code uses begins with "_" (see
    `_keyword_call_scalar`).
    """
    namespace = _call_namespace(program)
    lines = ["def call_scalar(_feeds):",
             "    _keys = _feeds.keys()",
             "    if _keys != _names and _keys - _ignored != _names:",
             "        raise _names_error(_feeds)",
             "    with _lock:",
             *(f"        _v{i} = _feeds[{slot.name!r}]" for i, (slot, _) in enumerate(_plan_of(Input, program.slots))),
             *_call_body(program, namespace)]
    return _define("call_scalar", lines, namespace, program)


def _keyword_call_scalar(program: Program):
    """`call_scalar` taking the feeds as keyword arguments, for a class's `__call__`: `self`,
    then one keyword-only parameter per input; None when an input's name cannot be one.

    `step(x=..., y=...)` then binds the arrays straight to the parameters, with no second
    Python frame and no dict of the feeds (W5: 3.5-3.6 -> 3.1-3.25 µs per step). Anything
    unusual (an input missing, an unexpected or ignored name) goes to `call_scalar` with a
    dict, which accepts or reports it exactly as a dict call would.

    A parameter is named as its input, so it must not shadow a name of the generated code:
    those all begin with "_", and inputs whose names do are left to `call_scalar`. Python
    also folds identifiers to NFKC (a fullwidth "ｘ" in source is "x") but not the keys of a
    call's keywords, so only ASCII names become parameters.
    """
    names = [slot.name for slot, _ in _plan_of(Input, program.slots)]
    if not names or any(not (n.isascii() and n.isidentifier()) or keyword.iskeyword(n) or n.startswith("_")
                        for n in names):
        return None
    namespace = _call_namespace(program)
    namespace.update(_MISSING=_MISSING, _fallback=program.call_scalar, _present=_present_feeds)
    parameters = ", ".join(f"{name}=_MISSING" for name in names)
    missing = " or ".join(f"{name} is _MISSING" for name in names)
    lines = [f"def keyword_call_scalar(_self, /, *, {parameters}, **_extra):",
             f"    if _extra or {missing}:",
             f"        return _fallback(_present(_extra, {', '.join(f'{n}={n}' for n in names)}))",
             "    with _lock:",
             *(f"        _v{i} = {name}" for i, name in enumerate(names)),
             *_call_body(program, namespace)]
    return _define("keyword_call_scalar", lines, namespace, program)


class _Missing:
    """The default of a keyword call's parameters: no feed was given."""

    def __repr__(self) -> str:
        return "<no feed>"


_MISSING = _Missing()


def _present_feeds(extra: dict, /, **inputs) -> dict:
    return {**{name: value for name, value in inputs.items() if value is not _MISSING}, **extra}


def _call_namespace(program: Program) -> dict:
    _, address, _, value = program._scalar_output
    return {
        "_type": type, "_min": min, "_ndarray": np.ndarray, "_pointer": unchecked_data_pointer,
        "_argv": program._argv, "_lock": program._lock, "_names": program._input_names,
        "_ignored": program._ignored_inputs, "_names_error": program._feed_names_error,
        "_entry": program._entry_function, "_argv_pointer": program._argv_pointer, "_TID_0": _TID_0,
        "_ONE_THREAD": _ONE_THREAD, "_get_num_threads": get_num_threads, "_team": default_team,
        "_entry_address": program._entry_address, "_argv_address": program._argv_address,
        "_max_threads": program.max_threads, "_output_address": address, "_value": value,
        "_status": program._status_cell, "_refused": program._refused_input_error,
    }


def _call_body(program: Program, namespace: dict) -> list[str]:
    """The lines, inside `with _lock:`, that check and bind the feeds _v0, _v1, ..., run the
    entry and return the scalar; adds what they read to `namespace`."""
    output_position = program._scalar_output[2]
    inputs = ", ".join(f"_v{i}" for i in range(len(program.inputs)))
    checked = program._status_cell is not None
    lines = []
    if program._fast_call is not None:
        # One native call checks and binds the feeds and runs the entry (see fast_call); it
        # declines (runs nothing) for any feed the lines below would have to convert or report.
        namespace["_fast"] = program._fast_call
        fast = [f"_r = _fast({inputs})", "if _type(_r) is float:", "    return _r",
                *([f"if _r == {REFUSED}:", f"    raise _refused([{inputs}])"] if checked else [])]
        if program.max_threads == 1:
            lines += [" " * 8 + line for line in fast]
        else:
            lines += ["        if _get_num_threads() == 1:", *(" " * 12 + line for line in fast)]
    for i, (slot, position) in enumerate(_plan_of(Input, program.slots)):
        namespace.update({f"_dtype{i}": slot.dtype, f"_shape{i}": slot.shape, f"_prepare{i}": slot.prepare})
        lines += [f"        if (_type(_v{i}) is _ndarray and _v{i}.dtype is _dtype{i} and _v{i}.shape == _shape{i}"
                  f" and _v{i}.flags.c_contiguous"
                  f" and {slot.valid_range is None or slot.range_checked_natively}):",
                  "            pass",
                  "        else:",
                  f"            _v{i} = _prepare{i}(_v{i})",
                  f"        _argv[{position}] = _pointer(_v{i})"]
    # The _v's stay referenced until the function returns: converted copies outlive the native call.
    return lines + [
        f"        _argv[{output_position}] = _output_address  # a __call__ may have bound another",
        *(["        _status.value = 0"] if checked else []),
        "        if _max_threads == 1 or _get_num_threads() == 1:",
        "            _entry(_argv_pointer, _TID_0, _ONE_THREAD)",
        "        else:",
        "            _team().run(_entry_address, _argv_address, _min(_get_num_threads(), _max_threads))",
        *(["        if _status.value:", f"            raise _refused([{inputs}])"] if checked else []),
        "        return _value.value"]


def _define(name: str, lines: list[str], namespace: dict, program: Program):
    exec(compile("\n".join(lines), f"<{name} of {program.entry}>", "exec"), namespace)  # noqa: S102
    return namespace[name]


def _plan_of(kind: type, slots: Sequence[Slot]) -> tuple[tuple[Slot, int], ...]:
    return tuple((slot, position) for position, slot in enumerate(slots) if isinstance(slot, kind))


def _check_unique_names(slots: Sequence[Slot]) -> None:
    # A name identifies a feed, a param binding, a state buffer: two slots sharing one
    # would silently share or shadow memory.
    seen = set()
    for slot in slots:
        if not isinstance(slot, (Input, Param, State, Output, Workspace, Status)):
            raise TypeError(f"not a slot: {slot!r}")
        if slot.name in seen:
            raise ValueError(f"two slots are named {slot.name!r}")
        seen.add(slot.name)


def _bind_params(slots: Sequence[Slot], params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    bound = {}
    for slot in slots:
        if isinstance(slot, Param):
            if slot.name not in params:
                raise ValueError(f"param {slot.name!r} ({slot.description}) is missing from params")
            bound[slot.name] = slot.check_binding(params[slot.name])
    return bound
