"""A compile worker process: LLVM IR text in, object code out, over its standard streams.

Run as a script (`python -I object_worker.py`), never imported by a worker: it needs llvmlite
alone, so it starts in a few tens of milliseconds. Every worker is a process of its own, so its
llvmlite, and the lock llvmlite takes around each call, are its own: modules compile truly in
parallel through llvmlite's public API.

Protocol (all integers little-endian u64):
  parent -> worker, once: length + JSON {"triple", "cpu", "features", "opt_level", "passes"}
  worker -> parent, once: the byte READY, when it can compile
  parent -> worker, per job: length + IR text (UTF-8); length 0 ends the worker
  worker -> parent, per job: status byte (0 ok, 1 error) + length + object code or error text
"""
from __future__ import annotations

import json
import os
import struct
import sys

_LENGTH = struct.Struct("<Q")
READY = b"\x01"

# The pass pipeline by name, as target.py's module_pass_manager adds it.
PASS_METHODS = {
    "sroa": "add_sroa_pass",
    "ipsccp": "add_ipsccp_pass",
    "instcombine": "add_instruction_combine_pass",
    "simplifycfg": "add_simplify_cfg_pass",
    "loop_rotate": "add_loop_rotate_pass",
    "dce": "add_dead_code_elimination_pass",
}


def read_frame(stream) -> bytes | None:
    header = stream.read(_LENGTH.size)
    if len(header) < _LENGTH.size:
        return None
    (length,) = _LENGTH.unpack(header)
    payload = stream.read(length)
    if len(payload) < length:
        return None
    return payload


def write_frame(stream, payload: bytes, status: int | None = None) -> None:
    if status is not None:
        stream.write(bytes([status]))
    stream.write(_LENGTH.pack(len(payload)))
    stream.write(payload)
    stream.flush()


def pass_manager(llvm, settings: dict):
    """The module pass manager of `settings`' passes; one serves every job (llvmlite frees none)."""
    manager = llvm.create_new_module_pass_manager()
    for name in settings["passes"]:
        getattr(manager, PASS_METHODS[name])()
    return manager


def compile_ir(llvm, settings: dict, manager, ir_text: str) -> bytes:
    """Object code of one module, on LLVM objects of its own, in `settings`' target."""
    target = llvm.Target.from_triple(settings["triple"])
    with llvm.create_context() as context, llvm.parse_assembly(ir_text, context) as module:
        module.verify()
        with target.create_target_machine(cpu=settings["cpu"], features=settings["features"],
                                          opt=settings["opt_level"], reloc="default",
                                          codemodel="jitdefault", jit=True) as machine:
            module.triple = machine.triple
            module.data_layout = str(machine.target_data)
            with llvm.create_pass_builder(machine, llvm.create_pipeline_tuning_options()) as builder:
                manager.run(module, builder)
            return machine.emit_object(module)


def serve(source, sink) -> None:
    import llvmlite.binding as llvm

    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    llvm.initialize_native_asmparser()
    settings = json.loads(read_frame(source))
    manager = pass_manager(llvm, settings)
    sink.write(READY)
    sink.flush()
    while (job := read_frame(source)):
        try:
            result, status = compile_ir(llvm, settings, manager, job.decode("utf-8")), 0
        except Exception as error:  # noqa: BLE001 - reported to the parent, which raises it
            result, status = f"{type(error).__name__}: {error}".encode("utf-8", "replace"), 1
        write_frame(sink, result, status)


if __name__ == "__main__":
    serve(sys.stdin.buffer, sys.stdout.buffer)
    # Every answer is flushed and nothing else is held: skip the interpreter's teardown
    # (llvmlite's and every module's), for which the compiler waits when it closes a worker.
    os._exit(0)
