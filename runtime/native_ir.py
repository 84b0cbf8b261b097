"""The runtime's own native helpers, written in LLVM IR: compiled once per machine and kept in
the object cache, so that a process whose programs all come from the cache compiles nothing.

Loading, not compiling, matters for memory more than for time (compiling one is quick): a
process's first code generation on a thread leaves its heap many megabytes larger, resident
for good (bench/NOTES.md, "Loading and memory").
"""

from __future__ import annotations

import hashlib

import llvmlite
import llvmlite.binding as llvm

from . import loader
from .cache import ObjectCache, make_key
from .loader import NativeLibrary, create_host_target_machine, host_target, initialize_llvm


def library_from_ir(kind: str, ir_text: str, source_path: str) -> NativeLibrary:
    """`ir_text` compiled for this host and loaded: from the object cache, where the first
    process on this machine to need it stored it. `source_path` is the module that writes
    the IR, part of the cache key with `kind`."""
    host = host_target()
    cache = ObjectCache()
    key = _cache_key(kind, ir_text, host, source_path)
    cached = cache.get(key)
    if cached is not None:
        try:
            return NativeLibrary(cached)
        except Exception:  # noqa: BLE001 - any failure to load means: compile it again
            pass
    code = _compile(ir_text)
    cache.put(key, code)
    return NativeLibrary(code)


def _cache_key(kind: str, ir_text: str, host, source_path: str) -> str:
    """Everything the object depends on: its IR, the CPU, LLVM, and how it is compiled and
    loaded (the writing module's, this module's and the loader's source)."""
    sources = hashlib.sha256()
    for path in (source_path, __file__, loader.__file__):
        with open(path, "rb") as source:
            sources.update(source.read())
    return make_key(kind, ir_text, host.triple, host.cpu, host.features, llvmlite.__version__,
                    repr(llvm.llvm_version_info), sources.hexdigest())


def _compile(ir_text: str) -> bytes:
    initialize_llvm()
    target_machine = create_host_target_machine(opt_level=2)
    module = llvm.parse_assembly(ir_text)
    module.triple = target_machine.triple
    module.data_layout = str(target_machine.target_data)
    module.verify()
    return target_machine.emit_object(module)
