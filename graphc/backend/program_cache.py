"""The disk cache of compiled programs: keys and entry format.

A key hashes what determines the machine code: the graph as the user's code built it, before
any pass (ops, attributes, operand ids, shapes, dtypes; not the user's source lines), what is
asked of it (outputs, in-place updates, the thread count set), the compiler's own source (its
passes and kernel generators), the host CPU and the llvmlite version. Keying the graph before
optimization lets a warm compile skip the passes too: on a hit nothing is optimized or
generated, the entry holds the object code, the runtime's slot layout and the thread count.

An entry's payload (the runtime's ObjectCache adds the checksummed header) is a length, a JSON
header (format, slot layout, thread count, length of each object file, and `extras`: what the
caller needs besides the code, e.g. a training step's state names), then the object files
back to back. Anything inconsistent raises ValueError, and the compiler rebuilds the entry.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import pathlib
import struct

import llvmlite
import numpy as np
import sympy

import graphc_runtime as rt
from graphc.backend.llvm.target import target_fingerprint
from graphc.core.ir import ConstArray
from graphc_runtime import slots as runtime_slots

# Every slot kind the runtime defines (a new one is stored without a change here).
_SLOT_TYPES = {name: getattr(runtime_slots, name) for name in runtime_slots.__all__ if name != "Slot"}
_HEADER = struct.Struct("<I")


@functools.lru_cache(maxsize=None)
def compiler_source_digest() -> str:
    """A hash of graphc's own Python source: editing a kernel generator invalidates old entries."""
    digest = hashlib.sha256()
    package = pathlib.Path(__file__).parent.parent   # all of graphc: this file is in graphc/backend/
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def program_key(graph, outputs, request: dict) -> str:
    """The key of the program computing `outputs` of `graph` (before optimization) as `request`
    (output names, in-place updates, threads...) asks."""
    lines = graph_lines(graph, outputs) + [repr(sorted((k, repr(v)) for k, v in request.items()))]
    return rt.make_key("\n".join(lines), compiler_source_digest(), target_fingerprint(), llvmlite.__version__)


def graph_lines(graph, outputs) -> list[str]:
    """The graph computing `outputs` as exact text, a line per node (op, attributes, operands,
    shape, dtype, the names of inputs and params; not the user's lines), then the outputs."""
    lines = []
    for node in graph.ancestors(outputs):
        attrs = sorted((k, _attr_text(v)) for k, v in node.attrs.items())
        operands = [operand.id for operand in node.inputs]
        name = node.name if node.op in ("input", "param") else ""
        lines.append(f"{node.id} {node.op} {name} {attrs} {operands} {node.shape} {node.dtype}")
    lines.append(f"outputs {[out.id for out in outputs]}")
    return lines


# 3: the thread count is stored (keys hash the unoptimized graph, which does not give it);
# 2: several object files; 1: a bare slot list and one object.
def _attr_text(value) -> str:
    """An attribute as exact text: a constant by the digest of its bytes (its repr rounds to a
    few digits: 0.001 and the next float32 would share a key), a sympy expression in full
    precision (srepr), anything else (ints, Python floats, tuples) by repr, which is exact."""
    if isinstance(value, ConstArray):
        return f"ConstArray({value.digest})"
    if isinstance(value, sympy.Basic):
        return _srepr(value)
    return repr(value)


@functools.lru_cache(maxsize=4096)     # a deep network's layers repeat their expressions
def _srepr(expr: sympy.Basic) -> str:
    return sympy.srepr(expr)


_FORMAT = "graphc-program/3"


@dataclasses.dataclass
class CachedProgram:
    """What a compiled program needs to run: its object files, the runtime's slot layout and
    the most threads its entry uses."""

    objects: list[bytes]
    slots: list
    max_threads: int
    # What the caller needs beside the code, as JSON (a training step's state names, so that a
    # warm compile need not build its gradient graph to learn them)
    extras: dict = dataclasses.field(default_factory=dict)


def pack_entry(program: CachedProgram) -> bytes:
    """The program's object files, slot layout and thread count in one blob."""
    objects = [bytes(obj) for obj in program.objects]
    header = json.dumps({"format": _FORMAT, "slots": [_slot_to_json(slot) for slot in program.slots],
                         "max_threads": program.max_threads, "objects": [len(obj) for obj in objects],
                         "extras": program.extras}).encode()
    return _HEADER.pack(len(header)) + header + b"".join(objects)


def unpack_entry(blob: bytes) -> CachedProgram:
    """The entry's program; raises ValueError for a blob not made by this version of pack_entry."""
    if len(blob) < _HEADER.size:
        raise ValueError("program cache entry: shorter than its header")
    (length,) = _HEADER.unpack_from(blob)
    header = json.loads(blob[_HEADER.size:_HEADER.size + length])
    if not isinstance(header, dict) or header.get("format") != _FORMAT:
        raise ValueError("program cache entry: another format")
    sizes = header["objects"]
    body = memoryview(blob)[_HEADER.size + length:]
    if not sizes or any(type(size) is not int or size <= 0 for size in sizes) or sum(sizes) != len(body):
        raise ValueError("program cache entry: object sizes do not match its length")
    max_threads = header["max_threads"]
    if type(max_threads) is not int or max_threads < 1:
        raise ValueError("program cache entry: no valid thread count")
    objects, start = [], 0
    for size in sizes:
        objects.append(bytes(body[start:start + size]))
        start += size
    extras = header.get("extras", {})
    if not isinstance(extras, dict):
        raise ValueError("program cache entry: extras are not a mapping")
    return CachedProgram(objects, [_slot_from_json(item) for item in header["slots"]], max_threads, extras)


def _slot_to_json(slot) -> dict:
    fields = {}
    for key, value in vars(slot).items():
        if isinstance(value, np.dtype):
            value = value.name
        elif isinstance(value, tuple):
            value = list(value)
        fields[key] = value
    return {"type": type(slot).__name__, "fields": fields}


def _slot_from_json(item: dict):
    fields = dict(item["fields"])
    for key in ("shape", "valid_range"):
        if fields.get(key) is not None:
            fields[key] = tuple(fields[key])
    return _SLOT_TYPES[item["type"]](**fields)
