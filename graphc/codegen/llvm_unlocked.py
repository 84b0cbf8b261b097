"""The three heavy llvmlite calls (parse, optimize, emit) without llvmlite's global lock.

llvmlite serializes every C-API call through one process-wide lock (`ffi.lib`'s
`_lib_fn_wrapper`), so threads compiling separate modules would take turns. LLVM itself is
thread-safe when threads share no LLVM object: each thread here works on its own context,
module, target machine and pass builder (see codegen/parallel.py). ctypes releases the GIL
during a foreign call, so these calls run truly in parallel. Every other llvmlite call (creating
and disposing those objects, verifying, copying the emitted buffer) keeps the lock: all are
short, and only the three below take seconds.

This reaches into llvmlite's internals: the ctypes function behind the wrapper (`_cfn`) and
the C signatures. `available()` checks both are what this module was written against
(llvmlite 0.50) and the compiler falls back to the serial, locked path if not.
"""
from __future__ import annotations

import ctypes
import functools
import inspect

import llvmlite.binding as llvm
from llvmlite.binding import ffi

__all__ = ["available", "unavailable_reason", "parse_assembly", "run_module_pipeline", "emit_object"]

def _expected_signatures() -> dict:
    """name -> (argument types, result types accepted), as llvmlite 0.50 declares them. A void C
    function's result type is left at ctypes' default, c_int."""
    char_pointer = ctypes.POINTER(ctypes.c_char_p)
    return {
        "LLVMPY_ParseAssembly": (
            [ffi.LLVMContextRef, ctypes.c_char_p, char_pointer], (ffi.LLVMModuleRef,)),
        "LLVMPY_RunNewModulePassManager": (
            [ffi.LLVMModulePassManagerRef, ffi.LLVMModuleRef, ffi.LLVMPassBuilderRef], (None, ctypes.c_int)),
        "LLVMPY_TargetMachineEmitToMemory": (
            [ffi.LLVMTargetMachineRef, ffi.LLVMModuleRef, ctypes.c_int, char_pointer], (ffi.LLVMMemoryBufferRef,)),
    }


@functools.lru_cache(maxsize=None)
def _raw_functions() -> dict | str:
    """The unwrapped ctypes functions by name, or why they cannot be used."""
    try:
        if not isinstance(ffi.lib, ffi._lib_wrapper):
            return "llvmlite.binding.ffi.lib is not the expected lock wrapper"
        for needed in ("create_context", "ModuleRef", "create_pass_builder", "create_new_module_pass_manager"):
            if not hasattr(llvm, needed):
                return f"llvmlite.binding has no {needed}"
        # parse_assembly below wraps the parsed pointer as llvmlite does: ModuleRef(pointer, context).
        if list(inspect.signature(llvm.ModuleRef).parameters) != ["module_ptr", "context"]:
            return "llvm.ModuleRef is constructed differently"
        raw = {}
        for name, (argtypes, restypes) in _expected_signatures().items():
            cfn = getattr(getattr(ffi.lib, name), "_cfn", None)
            if not isinstance(cfn, ctypes._CFuncPtr):
                return f"{name} is not wrapped as expected"
            # Not a PyDLL function (those keep the GIL), and the signature this file assumes.
            if cfn._flags_ & ctypes._FUNCFLAG_PYTHONAPI:
                return f"{name} holds the GIL"
            if list(cfn.argtypes or ()) != argtypes or not any(cfn.restype is r for r in restypes):
                return f"{name} has another signature"
            raw[name] = cfn
        return raw
    except Exception as error:  # any surprise in llvmlite's internals means: do not use them
        return f"unexpected llvmlite internals ({error!r})"


def available() -> bool:
    return isinstance(_raw_functions(), dict)


def unavailable_reason() -> str | None:
    found = _raw_functions()
    return None if isinstance(found, dict) else found


def _call(name: str, *args):
    return _raw_functions()[name](*args)


def parse_assembly(ir_text: str, context: llvm.ContextRef) -> llvm.ModuleRef:
    """`llvm.parse_assembly(ir_text, context)`, unlocked. The module belongs to `context`."""
    text = ir_text.encode("utf-8")
    with ffi.OutputString() as error:
        pointer = _call("LLVMPY_ParseAssembly", context, ctypes.c_char_p(text), error)
        if error:
            if pointer:
                llvm.ModuleRef(pointer, context).close()
            raise RuntimeError(f"LLVM IR parsing error\n{error}")
    return llvm.ModuleRef(pointer, context)


def run_module_pipeline(module: llvm.ModuleRef, manager, pass_builder) -> None:
    """Run the module pass manager `manager` on `module` with `pass_builder`, unlocked.

    Building the pipeline is cheap and stays locked; running it is the expensive part.
    """
    _call("LLVMPY_RunNewModulePassManager", manager, module, pass_builder)


def emit_object(target_machine: llvm.TargetMachine, module: llvm.ModuleRef) -> bytes:
    """`target_machine.emit_object(module)`, with the code generation itself unlocked."""
    with ffi.OutputString() as error:
        buffer = _call("LLVMPY_TargetMachineEmitToMemory", target_machine, module, 1, error)
        if not buffer:
            raise RuntimeError(str(error))
    try:
        return ctypes.string_at(ffi.lib.LLVMPY_GetBufferStart(buffer), ffi.lib.LLVMPY_GetBufferSize(buffer))
    finally:
        ffi.lib.LLVMPY_DisposeMemoryBuffer(buffer)
