"""The disk cache of compiled programs: keys and entry format.

A key hashes what determines the machine code: the optimized graph (ops, attributes, operand
ids, shapes, dtypes; not the user's source lines), how it is assembled (outputs, in-place
updates, thread count), the compiler's own source, the host CPU and the llvmlite version. On
a hit nothing is generated: the entry holds the object code and the runtime's slot layout, so
a warm compile skips LLVM IR generation as well as LLVM itself.
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

from .codegen.target import target_fingerprint

_SLOT_TYPES = {cls.__name__: cls for cls in (rt.Input, rt.Param, rt.State, rt.Output, rt.Workspace)}
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


def pack_entry(object_code: bytes, slots) -> bytes:
    """Object code and slot layout in one blob: a JSON header, then the object."""
    header = json.dumps([_slot_to_json(slot) for slot in slots]).encode()
    return _HEADER.pack(len(header)) + header + object_code


def unpack_entry(blob: bytes):
    """(object code, slots); raises ValueError for a blob not made by pack_entry."""
    (length,) = _HEADER.unpack_from(blob)
    header = json.loads(blob[_HEADER.size:_HEADER.size + length])
    return blob[_HEADER.size + length:], [_slot_from_json(item) for item in header]


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
