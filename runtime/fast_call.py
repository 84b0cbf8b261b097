"""A native front for a program's one-thread call: a Python builtin function, compiled from LLVM
IR once per machine, that checks the feeds, binds them and runs the entry in one call.

Why: a tiny training step (W5: logistic regression 64 -> 1, B = 64) runs ~0.8 µs of native code,
and the Python call path around it cost ~2.5 µs: per feed, the checks of its type, dtype, shape
and contiguity and the read of its data pointer (~0.4 µs), then ctypes' conversion of the
arguments and its release of the GIL (~0.6 µs), then reading the loss. Here all of it is one
METH_FASTCALL builtin: Python passes the feeds as they are and gets the loss back.

    PyObject *graphc_fast_call(PyObject *table, PyObject *const *feeds, Py_ssize_t nfeeds)

`table` (the function's `self`) is an int64 numpy array describing one program (layout below,
`Word`); the function finds it through the array's data field. For each feed it checks what the
Python path checks: exactly an ndarray (no subclass), the input's dtype object (numpy's builtin
dtypes are singletons, so the Python path's `dtype is` test is this pointer comparison), its
ndim and shape, the C-contiguous flag. If every feed passes, it stores their data pointers
into the program's argument vector, binds the output buffer, clears the status cell, runs the
entry with the GIL released and returns the output as a Python float. Otherwise it returns the
int `DECLINED` without having run anything, and the caller takes the Python path, which
converts what it can and reports the rest; `REFUSED` means the entry refused an input (the
status cell says which).

The offsets of numpy's array fields are the C ABI numpy's own extensions compile against
(PyArrayObject_fields); `array_layout` proves them on this interpreter with probe arrays, and
where they do not hold (another object header, a free-threaded build, id() not an address)
there is no fast call and programs use the Python path.
"""

from __future__ import annotations

import ctypes
import enum
import functools
import string
import sys
import sysconfig
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from .buffers import _DATA_FIELD_OFFSET, _read_data_field, aligned_zeros, data_pointer, unchecked_data_pointer
from .loader import NativeLibrary
from .native_ir import library_from_ir

__all__ = ["DECLINED", "REFUSED", "fast_call_function"]

DECLINED = 0  # a feed is not exactly what the input takes: nothing ran
REFUSED = 1  # the entry ran and refused an input (its status cell says which)

_NPY_ARRAY_C_CONTIGUOUS = 0x0001
_METH_FASTCALL = 0x0080


class Word(enum.IntEnum):
    """Positions of the table's int64 words. The table begins with the function's PyMethodDef
    (which must live as long as the function, as the table does); the inputs' records follow
    the fixed words, each (argv position, dtype object address, ndim, shape...)."""

    METHOD_NAME = 0
    METHOD_FUNCTION = 1
    METHOD_FLAGS = 2
    METHOD_DOC = 3
    INPUT_COUNT = 4
    ARGV = 5
    ENTRY = 6
    OUTPUT_POSITION = 7
    OUTPUT_ADDRESS = 8
    OUTPUT_IS_DOUBLE = 9
    STATUS = 10  # the status cell's address, 0 if the program has none
    NDARRAY_TYPE = 11
    FLOAT_FROM_DOUBLE = 12
    LONG_FROM_SSIZE_T = 13
    SAVE_THREAD = 14
    RESTORE_THREAD = 15
    RECORDS = 16


class ArrayLayout(NamedTuple):
    """Byte offsets in a numpy array object (PyArrayObject_fields) and its object header."""

    type: int
    data: int
    ndim: int
    shape: int
    descr: int
    flags: int


@functools.cache
def array_layout() -> ArrayLayout | None:
    """The offsets of the fields the fast call reads, proven on probe arrays; None where this
    interpreter or numpy lays an array out otherwise (or where the GIL is optional: the fast
    call relies on it while it reads the feeds)."""
    # 64-bit little-endian only: the table's int64 word METHOD_FLAGS is PyMethodDef's int
    # ml_flags and its padding, which holds the value in its low half only there.
    if (sysconfig.get_config_var("Py_GIL_DISABLED") or ctypes.sizeof(ctypes.c_void_p) != 8
            or sys.byteorder != "little"):
        return None
    if unchecked_data_pointer is not _read_data_field:  # the data field itself is not where expected
        return None
    pointer = ctypes.c_void_p.from_address
    data = _DATA_FIELD_OFFSET  # PyObject_HEAD, then `char *data`
    layout = ArrayLayout(type=data - 8, data=data, ndim=data + 8, shape=data + 16, descr=data + 40, flags=data + 48)
    base = np.arange(24, dtype=np.float32)
    probes = (base, base[5:], base.reshape(2, 3, 4)[1], base.reshape(4, 6)[:, ::2], np.zeros((), np.float64),
              np.empty(0, np.int32), np.zeros((3, 1), np.int64).T)
    for probe in probes:
        at = id(probe)
        flags = ctypes.c_int32.from_address(at + layout.flags).value
        if (pointer(at + layout.type).value != id(np.ndarray)
                or ctypes.c_int32.from_address(at + layout.ndim).value != probe.ndim
                or pointer(at + layout.descr).value != id(probe.dtype)
                or bool(flags & _NPY_ARRAY_C_CONTIGUOUS) != probe.flags.c_contiguous):
            return None
        # Followed only once the fields inside the object proved right: a wrong offset must
        # not send the probe to an arbitrary address.
        shape_address = pointer(at + layout.shape).value
        if tuple(ctypes.c_int64.from_address(shape_address + 8 * i).value for i in range(probe.ndim)) != probe.shape:
            return None
    return layout


class Feed(NamedTuple):
    """What the fast call accepts for one input, and where its address goes."""

    position: int  # in the argument vector
    dtype: np.dtype
    shape: tuple[int, ...]


def fast_call_function(
    *,
    argv_address: int,
    entry_address: int,
    feeds: Sequence[Feed],
    output_position: int,
    output_address: int,
    output_dtype: np.dtype,
    status_address: int | None,
    keep_alive: object,
) -> Callable | None:
    """The builtin `fast(*feeds)` running the one-thread entry `entry(argv, 0, 1)` of a program
    whose one output is a float scalar at `output_address`, or None where there is no fast call
    (see `array_layout`). `keep_alive` (the program's native library) is held by the function."""
    layout = array_layout()
    if layout is None or output_dtype not in (np.float32, np.float64):
        return None
    library = _library(layout)
    records = [word for feed in feeds for word in (feed.position, id(feed.dtype), len(feed.shape), *feed.shape)]
    name = b"graphc_fast_call\0"
    name_at = Word.RECORDS + len(records)
    table = aligned_zeros(name_at + -(-len(name) // 8), np.int64)
    address = data_pointer(table)
    api = ctypes.pythonapi
    words = {
        Word.METHOD_NAME: address + 8 * name_at,
        Word.METHOD_FUNCTION: library.address("graphc_fast_call"),
        Word.METHOD_FLAGS: _METH_FASTCALL,
        Word.METHOD_DOC: 0,
        Word.INPUT_COUNT: len(feeds),
        Word.ARGV: argv_address,
        Word.ENTRY: entry_address,
        Word.OUTPUT_POSITION: output_position,
        Word.OUTPUT_ADDRESS: output_address,
        Word.OUTPUT_IS_DOUBLE: int(output_dtype == np.float64),
        Word.STATUS: status_address or 0,
        Word.NDARRAY_TYPE: id(np.ndarray),
        Word.FLOAT_FROM_DOUBLE: _address_of(api.PyFloat_FromDouble),
        Word.LONG_FROM_SSIZE_T: _address_of(api.PyLong_FromSsize_t),
        Word.SAVE_THREAD: _address_of(api.PyEval_SaveThread),
        Word.RESTORE_THREAD: _address_of(api.PyEval_RestoreThread),
    }
    for word, value in words.items():
        table[word] = value
    table[Word.RECORDS:name_at] = records
    table.view(np.uint8)[8 * name_at:8 * name_at + len(name)] = np.frombuffer(name, np.uint8)

    # self = the table (which holds the PyMethodDef); "module" = what must outlive the function
    # (the code it runs, the dtype objects whose addresses it compares): CPython stores it and
    # holds a reference (shown as __module__), nothing else.
    return _new_builtin()(address, table, (library, keep_alive, [feed.dtype for feed in feeds]))


@functools.cache
def _new_builtin():
    """PyObject *PyCFunction_NewEx(PyMethodDef *, PyObject *self, PyObject *module), called
    holding the GIL (looked up here, past array_layout's checks, not at import)."""
    return ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_void_p, ctypes.py_object, ctypes.py_object)(
        ("PyCFunction_NewEx", ctypes.pythonapi))


def _address_of(function) -> int:
    return ctypes.cast(function, ctypes.c_void_p).value


_FAST_CALL_IR = string.Template(r"""
define ptr @graphc_fast_call(ptr %table_array, ptr %feeds, i64 %nfeeds) {
entry:
  %table_field = getelementptr i8, ptr %table_array, i64 $data
  %table = load ptr, ptr %table_field, align 8
$word_slots
  %input_count = load i64, ptr %word_INPUT_COUNT, align 8
  %argv = load ptr, ptr %word_ARGV, align 8
  %ndarray = load ptr, ptr %word_NDARRAY_TYPE, align 8
  %first_record = getelementptr i64, ptr %table, i64 $RECORDS
  %count_ok = icmp eq i64 %nfeeds, %input_count
  br i1 %count_ok, label %next_feed, label %decline

next_feed:
  %i = phi i64 [0, %entry], [%i_next, %bind]
  %record = phi ptr [%first_record, %entry], [%next_record, %bind]
  %more = icmp ult i64 %i, %input_count
  br i1 %more, label %feed, label %run

feed:
  %feed_slot = getelementptr ptr, ptr %feeds, i64 %i
  %array = load ptr, ptr %feed_slot, align 8
  %type_field = getelementptr i8, ptr %array, i64 $type
  %type = load ptr, ptr %type_field, align 8
  %is_ndarray = icmp eq ptr %type, %ndarray
  br i1 %is_ndarray, label %fields, label %decline

fields:
  %descr_field = getelementptr i8, ptr %array, i64 $descr
  %descr = load ptr, ptr %descr_field, align 8
  %want_descr_slot = getelementptr i64, ptr %record, i64 1
  %want_descr = load ptr, ptr %want_descr_slot, align 8
  %ndim_field = getelementptr i8, ptr %array, i64 $ndim
  %ndim32 = load i32, ptr %ndim_field, align 4
  %ndim = sext i32 %ndim32 to i64
  %want_ndim_slot = getelementptr i64, ptr %record, i64 2
  %want_ndim = load i64, ptr %want_ndim_slot, align 8
  %flags_field = getelementptr i8, ptr %array, i64 $flags
  %flags = load i32, ptr %flags_field, align 4
  %contiguous_bit = and i32 %flags, $C_CONTIGUOUS
  %same_descr = icmp eq ptr %descr, %want_descr
  %same_ndim = icmp eq i64 %ndim, %want_ndim
  %contiguous = icmp ne i32 %contiguous_bit, 0
  %descr_and_ndim = and i1 %same_descr, %same_ndim
  %fields_ok = and i1 %descr_and_ndim, %contiguous
  %shape_field = getelementptr i8, ptr %array, i64 $shape
  %shape = load ptr, ptr %shape_field, align 8
  %want_shape = getelementptr i64, ptr %record, i64 3
  br i1 %fields_ok, label %next_dim, label %decline

next_dim:
  %d = phi i64 [0, %fields], [%d_next, %dim_ok]
  %more_dims = icmp ult i64 %d, %want_ndim
  br i1 %more_dims, label %dim, label %bind

dim:
  %extent_slot = getelementptr i64, ptr %shape, i64 %d
  %extent = load i64, ptr %extent_slot, align 8
  %want_extent_slot = getelementptr i64, ptr %want_shape, i64 %d
  %want_extent = load i64, ptr %want_extent_slot, align 8
  %d_next = add i64 %d, 1
  %same_extent = icmp eq i64 %extent, %want_extent
  br i1 %same_extent, label %dim_ok, label %decline

dim_ok:
  br label %next_dim

bind:
  %data_field = getelementptr i8, ptr %array, i64 $data
  %data = load ptr, ptr %data_field, align 8
  %position = load i64, ptr %record, align 8
  %argv_slot = getelementptr ptr, ptr %argv, i64 %position
  store ptr %data, ptr %argv_slot, align 8
  %next_record = getelementptr i64, ptr %want_shape, i64 %want_ndim
  %i_next = add i64 %i, 1
  br label %next_feed

run:
  %output_position = load i64, ptr %word_OUTPUT_POSITION, align 8
  %output = load ptr, ptr %word_OUTPUT_ADDRESS, align 8
  %output_slot = getelementptr ptr, ptr %argv, i64 %output_position
  store ptr %output, ptr %output_slot, align 8
  %status = load ptr, ptr %word_STATUS, align 8
  %has_status = icmp ne ptr %status, null
  br i1 %has_status, label %clear_status, label %call

clear_status:
  store i64 0, ptr %status, align 8
  br label %call

call:
  %save_thread = load ptr, ptr %word_SAVE_THREAD, align 8
  %restore_thread = load ptr, ptr %word_RESTORE_THREAD, align 8
  %entry_function = load ptr, ptr %word_ENTRY, align 8
  %thread_state = call ptr %save_thread()
  call void %entry_function(ptr %argv, i64 0, i64 1)
  call void %restore_thread(ptr %thread_state)
  br i1 %has_status, label %check_status, label %result

check_status:
  %refused_position = load i64, ptr %status, align 8
  %refused = icmp ne i64 %refused_position, 0
  br i1 %refused, label %refuse, label %result

result:
  %is_double = load i64, ptr %word_OUTPUT_IS_DOUBLE, align 8
  %is_double_flag = icmp ne i64 %is_double, 0
  br i1 %is_double_flag, label %read_double, label %read_float

read_float:
  %as_float = load float, ptr %output, align 4
  %widened = fpext float %as_float to double
  br label %box

read_double:
  %as_double = load double, ptr %output, align 8
  br label %box

box:
  %value = phi double [%widened, %read_float], [%as_double, %read_double]
  %from_double = load ptr, ptr %word_FLOAT_FROM_DOUBLE, align 8
  %float_object = call ptr %from_double(double %value)
  ret ptr %float_object

refuse:
  %from_ssize_refuse = load ptr, ptr %word_LONG_FROM_SSIZE_T, align 8
  %refused_object = call ptr %from_ssize_refuse(i64 $REFUSED)
  ret ptr %refused_object

decline:
  %from_ssize_decline = load ptr, ptr %word_LONG_FROM_SSIZE_T, align 8
  %declined_object = call ptr %from_ssize_decline(i64 $DECLINED)
  ret ptr %declined_object
}
""")


def fast_call_ir(layout: ArrayLayout) -> str:
    """The fast call's LLVM IR for numpy arrays laid out as `layout`."""
    word_slots = "\n".join(f"  %word_{word.name} = getelementptr i64, ptr %table, i64 {int(word)}" for word in Word)
    return _FAST_CALL_IR.substitute(word_slots=word_slots, RECORDS=int(Word.RECORDS), C_CONTIGUOUS=_NPY_ARRAY_C_CONTIGUOUS,
                                    REFUSED=REFUSED, DECLINED=DECLINED, **layout._asdict())


@functools.cache
def _library(layout: ArrayLayout) -> NativeLibrary:
    return library_from_ir("graphc-fast-call", fast_call_ir(layout), __file__)
