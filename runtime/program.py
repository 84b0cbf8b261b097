"""`Program`: a loaded compiled program, callable with numpy arrays.

A call validates and converts every feed before any native code runs, allocates the outputs
(`call_scalar`, a training step's call, reuses one buffer instead), writes their addresses
into the argument vector and runs the entry once on the program's threads. Small training
steps cost a microsecond of native time, so everything that does not change between calls
(param, state and workspace addresses, the ctypes function, slot positions) is prepared at
construction and the call path does only what must be done: a training step's call is one
generated Python function, straight-line code for its inputs (`_specialized_call_scalar`).
"""

from __future__ import annotations

import ctypes
import functools
import keyword
import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import MappingProxyType

import numpy as np

from .buffers import aligned_zeros, data_pointer, unchecked_data_pointer
from .loader import NativeLibrary
from .slots import Input, Output, Param, Slot, State, Status, Workspace
from .threads import EntryFunction, _checked_thread_count, default_team, get_num_threads

__all__ = ["Program"]

# Arguments of a single-threaded call, prebuilt: ctypes converts its own objects fastest.
_TID_0 = ctypes.c_int64(0)
_ONE_THREAD = ctypes.c_int64(1)


class Program:
    """A compiled entry `void entry(void **args, int64 tid, int64 nthreads)` with bound memory.

    `slots[i]` describes what `args[i]` points to (see `graphc_runtime.slots`). `params` maps
    each Param slot's name to the caller's array, bound without copy; extra names are
    ignored so a model's whole parameter dict can be passed. The program keeps `params`:
    an array the caller puts into it later is bound at the next call, after the checks made
    here (`load_params` copies values into the bound arrays instead). `max_threads` is the
    most threads the entry can use (1 for code that ignores tid); a call uses
    min(get_num_threads(), max_threads).

    Calls from several Python threads are serialized per program: the argument vector,
    the workspace and the state are shared by all calls. A fork waits for running calls to
    finish, and the child gets new locks (see `_ForkGuard`).

    An entry may stop at one of its own checks (a compiler's check_finite) with a negative
    Status; `on_stop(status, memory)` then makes the exception the call raises, where
    `memory(position)` is the array of slot `position` as the entry left it (this call's feeds
    and outputs included). Without `on_stop`, the call raises a FloatingPointError giving the
    status alone.

    `state_memory` maps some State slots' names to memory the caller provides instead (memory
    other processes share, for example): C-contiguous arrays of the slot's shape and dtype,
    64-byte aligned, bound without copy and not zeroed here.
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
        on_stop: Callable[[int, Callable[[int], np.ndarray]], BaseException] | None = None,
        state_memory: Mapping[str, np.ndarray] | None = None,
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
        # mappings are read-only views: the caller rebinds through its own `params`.
        given = params if params is not None else {}
        self._param_plan = _plan_of(Param, self.slots)
        self._bound = _bind_params(self.slots, given)
        # Arrays the caller puts into its dict later are bound at the next call. Another
        # mapping (np.load's NpzFile) may hand out a new array at every lookup: bound once.
        self._given_params = given if isinstance(given, dict) else self._bound
        self._params_view = MappingProxyType(self._bound)
        given_state = _checked_state_memory(self.slots, state_memory or {})
        self._given_state = frozenset(given_state)
        self.state = MappingProxyType(
            {slot.name: given_state[slot.name] if slot.name in given_state else aligned_zeros(slot.shape, slot.dtype)
             for slot in self.slots if isinstance(slot, State)}
        )
        self._workspaces = {
            slot.name: aligned_zeros(slot.nbytes, np.uint8) for slot in self.slots if isinstance(slot, Workspace)
        }
        # Where the entry reports inputs it refused (Input.range_checked_natively) or the check
        # it stopped at (on_stop), if anywhere.
        self._status = aligned_zeros((1,), np.int64) if any(isinstance(s, Status) for s in self.slots) else None
        self._status_cell = None if self._status is None else ctypes.c_int64.from_address(data_pointer(self._status))
        self._inputs_by_position = {position: slot for slot, position in _plan_of(Input, self.slots)}
        self._on_stop = on_stop

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
        # The globals of the generated functions below: each holds the lock and the bound
        # params, and gets the new ones when they are replaced.
        self._call_namespaces: list[dict] = []
        self._params_replaced = _params_replaced_check(self)
        if self._scalar_output is not None:
            # Shadows the method below on this instance: a training step's call is then this
            # function alone, a Python frame less (see `_specialized_call_scalar`).
            self.call_scalar = _specialized_call_scalar(self)
        _live_programs.add(self)

    @functools.cached_property
    def keyword_call_scalar(self):
        """`call_scalar` with the feeds as keyword arguments, for a class's `__call__` (see
        `_keyword_call_scalar`); None when the inputs' names cannot be its parameters or the
        program has no single scalar output."""
        return None if self._scalar_output is None else _keyword_call_scalar(self)

    @property
    def params(self) -> Mapping[str, np.ndarray]:
        """The arrays bound as params, by name (a read-only view); arrays put into the caller's
        `params` since the last call are bound first."""
        with self._lock:
            if self._params_replaced():
                self._rebind_params()
        return self._params_view

    @property
    def ignored_inputs(self) -> frozenset[str]:
        """Names a caller may feed that the program does not read."""
        return self._ignored_inputs

    def snapshot(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Copies of the params and the state, taken between calls (for saving the program)."""
        with self._lock:
            if self._params_replaced():
                self._rebind_params()
            return ({name: array.copy() for name, array in self._bound.items()},
                    {name: array.copy() for name, array in self.state.items()})

    @property
    def num_threads(self) -> int:
        """Threads the next call will use."""
        return min(get_num_threads(), self.max_threads)

    def __call__(self, /, **feeds) -> list[np.ndarray]:
        """Run the program on `feeds` (one per Input, by name); return the outputs in slot order."""
        return self.call(feeds)

    def call(self, feeds: Mapping[str, object], *, threads: int | None = None) -> list[np.ndarray]:
        """`self(**feeds)` on `threads` threads (at most max_threads; default: the process's
        setting), without changing the process's setting."""
        nthreads = min(get_num_threads() if threads is None else _checked_thread_count(threads), self.max_threads)
        with self._lock:
            if self._params_replaced():
                self._rebind_params()
            inputs = self._bind_inputs(feeds)
            outputs = []
            for slot, position in self._output_plan:
                array = np.empty(slot.shape, slot.dtype)
                outputs.append(array)
                self._argv[position] = unchecked_data_pointer(array)
            self._run_entry(inputs, outputs, nthreads)
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

    def _run_entry(self, inputs: list[np.ndarray], outputs: list[np.ndarray], nthreads: int) -> None:
        """Run the entry once on `nthreads` threads; `inputs` (the bound feeds, some of them
        converted copies) is held here so that no copy is freed while native code reads it."""
        if self._status_cell is not None:
            self._status_cell.value = 0
        if nthreads == 1:
            self._entry_function(self._argv_pointer, _TID_0, _ONE_THREAD)
        else:
            default_team().run(self._entry_address, self._argv_address, nthreads)
        if self._status_cell is not None and self._status_cell.value:
            raise self._status_error(inputs, outputs)

    def _status_error(self, inputs: list[np.ndarray], outputs: list[np.ndarray]) -> BaseException:
        """The error of a call whose entry set the Status slot: `inputs` and `outputs` the
        call's arrays, in slot order."""
        status = self._status_cell.value
        if status > 0:
            return self._refused_input_error(status - 1, inputs)
        if self._on_stop is None:
            return FloatingPointError(f"{self!r} stopped at its own check (status {status}) and reports no more")
        return self._on_stop(status, _SlotMemory(self, inputs, outputs))

    def _refused_input_error(self, position: int, inputs: list[np.ndarray]) -> ValueError:
        """The entry returned before any kernel ran: an input was out of its valid range."""
        slot = self._inputs_by_position[position]
        array = inputs[[p for _, p, _ in self._input_plan].index(position)]
        return slot.range_error(array)

    def load_params(self, values: Mapping[str, object], strict: bool = True) -> None:
        """Copy `values` (name -> array) into the bound param arrays, as torch's load_state_dict.

        With `strict`, the names must be exactly the program's params; without, names it does
        not have are ignored and params not named keep their values. Every name, shape and
        dtype (a float param takes any float array, converted) is checked before anything is
        copied: on any error nothing is.
        """
        if not isinstance(values, Mapping):
            raise TypeError(f"load_params needs a mapping of param names to arrays, got {type(values).__name__}")
        with self._lock:
            if self._params_replaced():
                self._rebind_params()
            sources = _staged(_load_sources(self._param_plan, values, strict), self._bound)
            for name, source in sources.items():
                np.copyto(self._bound[name], source, casting="same_kind")

    def _rebind_params(self) -> None:
        """Bind the arrays now in the caller's `params`, checked as at construction; on any
        problem raise, keeping the arrays bound before."""
        bound = _bind_params(self.slots, self._given_params, rebinding=True)
        self._bound.clear()
        self._bound.update(bound)   # the params view shows the new arrays
        for slot, position in self._param_plan:
            self._argv[position] = data_pointer(bound[slot.name])
        self._publish(_bound_globals(self))

    def _publish(self, values: dict) -> None:
        """Set globals of every generated function of this program."""
        for namespace in self._call_namespaces:
            namespace.update(values)

    def _replace_lock(self) -> None:
        self._lock = threading.Lock()
        self._publish({"_lock": self._lock})

    def _run_alone(self) -> None:
        """Run on one thread from now on (a forked child's copy of a program caught mid-call)."""
        self.max_threads = 1
        self._publish({"_max_threads": 1})

    def reset_state(self, then: Callable[[], None] | None = None) -> None:
        """Zero every State buffer (e.g. forget the optimizer's momentum) but those bound to the
        caller's memory (`state_memory`). `then` runs before any call can see the zeros: it
        writes back what must not stay zero (a step's learning rate, its MPI handles)."""
        with self._lock:
            for name, buffer in self.state.items():
                if name not in self._given_state:
                    buffer.fill(0)
            if then is not None:
                then()

    def _scalar_output_buffer(self) -> tuple[np.ndarray, int, int, ctypes._SimpleCData] | None:
        """`call_scalar`'s output buffer (memory, address, argv position, ctypes view of the
        element), or None unless the program has exactly one output of one element."""
        if len(self.outputs) != 1 or math.prod(self.outputs[0].shape) != 1:
            return None
        ((slot, position),) = self._output_plan
        memory = aligned_zeros(slot.shape, slot.dtype)
        address = data_pointer(memory)
        return memory, address, position, np.ctypeslib.as_ctypes_type(slot.dtype).from_address(address)

    def _bound_memory(self, slot: Slot) -> np.ndarray | None:
        if isinstance(slot, Param):
            return self._bound[slot.name]
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
    Python frame and no dict of the feeds, both visible in a small step's time (bench/NOTES.md,
    "Call path"). Anything unusual (an input missing, an unexpected or ignored name) goes to
    `call_scalar` with a dict, which accepts or reports it exactly as a dict call would.

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


def _params_replaced_check(program: Program):
    """`params_replaced()`: whether an array in the caller's `params` is not the one bound."""
    namespace = _registered_namespace(program, {})
    lines = ["def params_replaced():", "    try:", f"        return not ({_unchanged_test(program, namespace)})",
             "    except KeyError:", "        return True"]
    return _define("params_replaced", lines, namespace, program)


def _unchanged_test(program: Program, namespace: dict) -> str:
    """The expression, true when every param's array in the caller's `params` is the bound one
    (a KeyError if a name is gone): one dict lookup and identity test per param."""
    namespace.update(_given=program._given_params, **_bound_globals(program))
    tests = [f"_given[{slot.name!r}] is _bound{i}" for i, (slot, _) in enumerate(program._param_plan)]
    return " and ".join(tests) or "True"


def _bound_globals(program: Program) -> dict:
    return {f"_bound{i}": program._bound[slot.name] for i, (slot, _) in enumerate(program._param_plan)}


def _rebinding_lines(program: Program, namespace: dict) -> list[str]:
    """The lines, inside `with _lock:`, that bind arrays the caller replaced in its `params`."""
    if not program._param_plan or program._given_params is program._bound:
        return []
    namespace["_rebind"] = program._rebind_params
    return ["        try:", f"            if not ({_unchanged_test(program, namespace)}):", "                _rebind()",
            "        except KeyError:", "            _rebind()"]


def _registered_namespace(program: Program, namespace: dict) -> dict:
    program._call_namespaces.append(namespace)
    return namespace


def _call_namespace(program: Program) -> dict:
    _, address, _, value = program._scalar_output
    return _registered_namespace(program, {
        "_type": type, "_min": min, "_ndarray": np.ndarray, "_pointer": unchecked_data_pointer,
        "_argv": program._argv, "_lock": program._lock, "_names": program._input_names,
        "_ignored": program._ignored_inputs, "_names_error": program._feed_names_error,
        "_entry": program._entry_function, "_argv_pointer": program._argv_pointer, "_TID_0": _TID_0,
        "_ONE_THREAD": _ONE_THREAD, "_get_num_threads": get_num_threads, "_team": default_team,
        "_entry_address": program._entry_address, "_argv_address": program._argv_address,
        "_max_threads": program.max_threads, "_output_address": address, "_value": value,
        "_status": program._status_cell, "_status_error": program._status_error,
        "_outputs": [program._scalar_output[0]],
    })


def _call_body(program: Program, namespace: dict) -> list[str]:
    """The lines, inside `with _lock:`, that check and bind the feeds _v0, _v1, ..., run the
    entry and return the scalar; adds what they read to `namespace`."""
    output_position = program._scalar_output[2]
    inputs = ", ".join(f"_v{i}" for i in range(len(program.inputs)))
    checked = program._status_cell is not None
    lines = _rebinding_lines(program, namespace)
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
        *(["        if _status.value:", f"            raise _status_error([{inputs}], _outputs)"] if checked else []),
        "        return _value.value"]


class _SlotMemory:
    """`memory(position)`: the array of a slot as a call's entry left it."""

    def __init__(self, program: Program, inputs: list[np.ndarray], outputs: list[np.ndarray]):
        self._program = program
        self._per_call = {position: array for (_, position, _), array in zip(program._input_plan, inputs)}
        self._per_call.update({position: array for (_, position), array in zip(program._output_plan, outputs)})

    def __call__(self, position: int) -> np.ndarray:
        if position in self._per_call:
            return self._per_call[position]
        memory = self._program._bound_memory(self._program.slots[position])
        if memory is None:
            raise KeyError(f"slot {position} has no memory after the call")
        return memory


def _define(name: str, lines: list[str], namespace: dict, program: Program):
    exec(compile("\n".join(lines), f"<{name} of {program.entry}>", "exec"), namespace)  # noqa: S102
    return namespace[name]


def _plan_of(kind: type, slots: Sequence[Slot]) -> tuple[tuple[Slot, int], ...]:
    return tuple((slot, position) for position, slot in enumerate(slots) if isinstance(slot, kind))


# The tables a slot's name is looked up in. Feeds, bindings and results are the caller's
# names, one namespace as a graph's inputs and params are; state, workspace and status are
# the runtime's own, so that no name a caller chooses collides with an optimizer's state.
def _checked_state_memory(slots, given: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`given` (State name -> caller's memory), checked against the State slots."""
    states = {slot.name: slot for slot in slots if isinstance(slot, State)}
    for name, memory in given.items():
        slot = states.get(name)
        if slot is None:
            raise ValueError(f"state_memory: the program has no State slot {name!r}")
        if not isinstance(memory, np.ndarray) or memory.shape != slot.shape or memory.dtype != slot.dtype:
            raise ValueError(f"state_memory: {name!r} must be an array of {slot.description}, got "
                             f"{getattr(memory, 'shape', type(memory).__name__)} {getattr(memory, 'dtype', '')}")
        if not memory.flags.c_contiguous or not memory.flags.writeable or data_pointer(memory) % 64:
            raise ValueError(f"state_memory: {name!r} must be C-contiguous, writeable and 64-byte aligned")
    return dict(given)


_NAMESPACES = {Input: "caller", Param: "caller", Output: "caller", State: "state", Workspace: "workspace",
               Status: "status"}


def _check_unique_names(slots: Sequence[Slot]) -> None:
    # A name identifies a feed, a param binding, a state buffer: two slots sharing one
    # would silently share or shadow memory.
    seen = set()
    for slot in slots:
        namespace = _NAMESPACES.get(type(slot))
        if namespace is None:
            raise TypeError(f"not a slot: {slot!r}")
        if (namespace, slot.name) in seen:
            raise ValueError(f"two slots are named {slot.name!r}")
        seen.add((namespace, slot.name))


_REBIND_HINT = ("the array in params replaced the one bound before; to copy values into the bound arrays "
                "instead, call load_params(values) on the compiled function or step")


def _bind_params(slots: Sequence[Slot], params: Mapping[str, np.ndarray], *,
                 rebinding: bool = False) -> dict[str, np.ndarray]:
    """Each Param slot's array from `params`, checked; `rebinding`: arrays the caller put into
    `params` after the program was made (errors then also say how to load values)."""
    bound = {}
    for slot in slots:
        if isinstance(slot, Param):
            if slot.name not in params:
                raise ValueError(_missing_param_message(slot, rebinding))
            try:
                bound[slot.name] = slot.check_binding(params[slot.name])
            except ValueError as error:
                if not rebinding:
                    raise
                raise ValueError(f"{error}; {_REBIND_HINT}") from None
    _check_no_shared_memory([slot for slot in slots if isinstance(slot, Param)], bound)
    return bound


def _missing_param_message(slot: Param, rebinding: bool) -> str:
    if not rebinding:
        return f"param {slot.name!r} ({slot.description}) is missing from params"
    return (f"param {slot.name!r} ({slot.description}) is no longer in the params the program was made with; "
            f"put an array back, or call load_params(values) to copy values into the bound arrays")


def _check_no_shared_memory(params: Sequence[Param], bound: Mapping[str, np.ndarray]) -> None:
    """Refuse two params in overlapping memory when the program updates either: the update of
    one would read the other's values half overwritten. Reading one array twice is harmless."""
    for first, second in _overlapping_pairs([bound[slot.name] for slot in params]):
        a, b = params[first], params[second]
        if a.updated or b.updated:
            written = " and ".join(repr(slot.name) for slot in (a, b) if slot.updated)
            raise ValueError(
                f"params {a.name!r} and {b.name!r} share memory (one array, or views that overlap) and the "
                f"program updates {written}; bind each to an array of its own, e.g. params[{b.name!r}] = "
                f"params[{b.name!r}].copy()")


def _overlapping_pairs(arrays: Sequence[np.ndarray]) -> Iterator[tuple[int, int]]:
    """Index pairs (i < j) of arrays whose bytes overlap: one sort by address, then each span
    is compared only with the spans that start inside it."""
    spans = sorted((*_byte_span(array), index) for index, array in enumerate(arrays))
    spans = [span for span in spans if span[0] < span[1]]
    for k, (_, end, index) in enumerate(spans):
        for start, _, other in spans[k + 1:]:
            if start >= end:
                break
            yield min(index, other), max(index, other)


def _byte_span(array: np.ndarray) -> tuple[int, int]:
    """[first, past last) byte an array's elements occupy (empty for an array of no elements)."""
    start = end = data_pointer(array)
    if array.size == 0:
        return start, start
    for extent, stride in zip(array.shape, array.strides):
        if stride < 0:
            start += stride * (extent - 1)
        else:
            end += stride * (extent - 1)
    return start, end + array.itemsize


def _load_sources(param_plan, values: Mapping[str, object], strict: bool) -> dict[str, np.ndarray]:
    """The arrays `load_params` copies, by param name, after every check."""
    params = {slot.name: slot for slot, _ in param_plan}
    unexpected = [name for name in values if name not in params]
    missing = [name for name in params if name not in values]
    if strict and (unexpected or missing):
        problems = ([f"unexpected params {unexpected} (not params of this program)"] if unexpected else []) + (
            [f"missing params {missing}"] if missing else [])
        raise ValueError(f"load_params: {'; '.join(problems)}; pass strict=False to load only the params "
                         f"named in both")
    return {name: _load_source(slot, values[name]) for name, slot in params.items() if name in values}


def _load_source(slot: Param, value) -> np.ndarray:
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as error:
        raise ValueError(f"load_params: param {slot.name!r}: the value is not an array ({error})") from None
    if array.shape != slot.shape:
        raise ValueError(f"load_params: param {slot.name!r} is {slot.description}, got shape {array.shape} "
                         f"{array.dtype}; the shapes must be equal")
    if array.dtype != slot.dtype and not (slot.dtype.kind == "f" and array.dtype.kind == "f"):
        raise ValueError(f"load_params: param {slot.name!r} is {slot.description}, got {array.dtype} values; "
                         f"convert them with .astype(np.{slot.dtype})")
    return array


def _staged(sources: dict[str, np.ndarray], destinations: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`sources`, with a copy of each one that overlaps another param's bound array (values
    swapped between two params): no copy then reads a value an earlier one overwrote."""
    names = list(sources)
    targets = list(destinations)
    arrays = [sources[name] for name in names] + [destinations[name] for name in targets]
    overlapping = set()
    for i, j in _overlapping_pairs(arrays):
        if i < len(names) <= j and names[i] != targets[j - len(names)]:
            overlapping.add(names[i])
    return {name: source.copy() if name in overlapping else source for name, source in sources.items()}


class _ForkGuard:
    """Every live program, and what `os.fork` does with their locks.

    A child has only the thread that forked: a lock another thread held at the fork is never
    released there, and a call the other thread was making is half done in the child's
    memory (its params half updated, its threads' barrier between phases). So a fork first
    waits for the calls running in other threads to finish, holding every program's lock
    across the fork, and the child gets new locks. A call that outlasts the wait (all calls
    share one) is left
    running: the child's copy of that program then runs on one thread, whose barrier never
    reads the counters the fork caught mid-phase.
    """

    WAIT_SECONDS = 30.0

    def __init__(self):
        self._programs: weakref.WeakSet[Program] = weakref.WeakSet()
        self._lock = threading.Lock()   # a WeakSet must not grow while a fork lists it
        self._held: list[Program] = []
        self._busy: list[Program] = []

    def add(self, program: Program) -> None:
        with self._lock:
            self._programs.add(program)

    def before_fork(self) -> None:
        self._lock.acquire()
        deadline = time.monotonic() + self.WAIT_SECONDS
        for program in list(self._programs):
            held = program._lock.acquire(timeout=max(deadline - time.monotonic(), 0))
            (self._held if held else self._busy).append(program)

    def after_fork_in_parent(self) -> None:
        for program in self._held:
            program._lock.release()
        self._forget_fork()
        self._lock.release()

    def after_fork_in_child(self) -> None:
        for program in self._held + self._busy:
            program._replace_lock()
        for program in self._busy:
            program._run_alone()
        self._forget_fork()
        self._lock = threading.Lock()

    def _forget_fork(self) -> None:
        self._held, self._busy = [], []


_live_programs = _ForkGuard()

if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_live_programs.before_fork, after_in_parent=_live_programs.after_fork_in_parent,
                        after_in_child=_live_programs.after_fork_in_child)
