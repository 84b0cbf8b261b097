"""Tiny hand-written LLVM IR compiled for this host, for the runtime tests (test_runtime,
test_scalar_call) that exercise graphc_runtime without the real compiler."""
from __future__ import annotations

import llvmlite.binding as llvm

import graphc_runtime as rt


def compile_ir(ir_text: str) -> bytes:
    target_machine = rt.create_host_target_machine()
    module = llvm.parse_assembly(ir_text)
    module.triple = target_machine.triple
    module.data_layout = str(target_machine.target_data)
    module.verify()
    return target_machine.emit_object(module)


def load_ir(ir_text: str) -> rt.NativeLibrary:
    return rt.NativeLibrary(compile_ir(ir_text))
