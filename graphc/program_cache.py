"""The disk cache of compiled programs: keys and entry format.

A key hashes what determines the machine code: the optimized graph (ops, attributes, operand
ids, shapes, dtypes; not the user's source lines), how it is assembled (outputs, in-place
updates, thread count), the compiler's own source, the host CPU and the llvmlite version. On
a hit nothing is generated: the entry holds the object code and the runtime's slot layout, so
a warm compile skips LLVM IR generation as well as LLVM itself.

An entry's payload (the runtime's ObjectCache adds the checksummed header) is a length, a JSON
header (format, slot layout, length of each object file), then the object files back to back.
Anything inconsistent raises ValueError, and the compiler rebuilds the entry.
"""
from __future__ import annotations

import functools
import hashlib
import json
import pathlib
import struct

import llvmlite
import numpy as np

import graphc_runtime as rt
from graphc_runtime import slots as runtime_slots

from .codegen.target import target_fingerprint

# Every slot kind the runtime defines (a new one is stored without a change here).
_SLOT_TYPES = {name: getattr(runtime_slots, name) for name in runtime_slots.__all__ if name != "Slot"}
_HEADER = struct.Struct("<I")


@functools.lru_cache(maxsize=None)
def compiler_source_digest() -> str:
    """A hash of graphc's own Python source: editing a kernel generator invalidates old entries."""
    digest = hashlib.sha256()
    package = pathlib.Path(__file__).parent
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def program_key(graph, outputs, assemble_args: dict) -> str:
    lines = []
    for node in graph.ancestors(outputs):
        attrs = sorted((k, repr(v)) for k, v in node.attrs.items())
        operands = [operand.id for operand in node.inputs]
        name = node.name if node.op in ("input", "param") else ""
        lines.append(f"{node.id} {node.op} {name} {attrs} {operands} {node.shape} {node.dtype}")
    lines.append(f"outputs {[out.id for out in outputs]}")
    lines.append(repr(sorted((k, repr(v)) for k, v in assemble_args.items())))
    return rt.make_key("\n".join(lines), compiler_source_digest(), target_fingerprint(), llvmlite.__version__)


_FORMAT = "graphc-program/2"   # 2: several object files (1 was a bare slot list and one object)


def pack_entry(objects: list[bytes], slots) -> bytes:
    """The program's object files and slot layout in one blob."""
    objects = [bytes(obj) for obj in objects]
    header = json.dumps({"format": _FORMAT, "slots": [_slot_to_json(slot) for slot in slots],
                         "objects": [len(obj) for obj in objects]}).encode()
    return _HEADER.pack(len(header)) + header + b"".join(objects)


def unpack_entry(blob: bytes):
    """(object files, slots); raises ValueError for a blob not made by this version of pack_entry."""
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
    objects, start = [], 0
    for size in sizes:
        objects.append(bytes(body[start:start + size]))
        start += size
    return objects, [_slot_from_json(item) for item in header["slots"]]


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
