"""The host target: one LLVM target machine shared by every kernel generator.

Kernels are specialised for the machine that compiles them (host CPU name and
feature string), so an emitted object file is only valid on that machine;
`target_fingerprint()` names it for object caches.

Objects are emitted here and loaded by the runtime with an MCJIT engine
(`add_object_file`).  That is why the target machine is created with
``jit=True`` and the ``jitdefault`` code model: on x86-64 LLVM then uses the
large code model (64-bit absolute addresses for constants and calls), which
RuntimeDyld resolves wherever it places the sections, however far from the
libc/libm symbols the code calls.  Tested end to end in
tests/test_gemm_kernels.py.

Engines own their target machine (see `host_target_machine`): give each
engine a fresh one from `new_jit_target_machine()`.
"""

from __future__ import annotations

import contextlib
import functools
import re
import threading

import llvmlite
import llvmlite.binding as llvm
import llvmlite.ir as ir

from graphc.backend.llvm.object_worker import PASS_METHODS
from graphc_runtime.host import HostTarget, SimdShape, create_target_machine, host_target, initialize_llvm

__all__ = [
    "host_target_machine",
    "new_jit_target_machine",
    "host_features",
    "vector_width_f32",
    "vector_register_count",
    "simd",
    "new_module",
    "optimize",
    "pass_builder",
    "module_pass_manager",
    "OPTIMIZATION_PASSES",
    "set_target",
    "parse_and_verify",
    "compile_to_object",
    "compile_to_assembly",
    "target_fingerprint",
    "load_object",
]


def host_features() -> str:
    """LLVM feature string of the target, e.g. '+avx2,+fma,-avx512f,...' (the host's, narrowed
    by GRAPHC_TARGET; see graphc_runtime.host)."""
    return host_target().features


def host_target_machine() -> llvm.TargetMachine:
    """The shared target machine for this process's target, used to optimise and emit code.

    Never pass it to `llvm.create_mcjit_compiler`: the engine takes
    ownership of its target machine and destroys it with itself, which
    would leave this cached object dangling (a later compile then crashes).
    Engines get their own from `new_jit_target_machine()`.
    """
    return _shared_target_machine(host_target())


@functools.lru_cache(maxsize=None)
def _shared_target_machine(host: HostTarget) -> llvm.TargetMachine:
    return create_target_machine(host, opt_level=CODEGEN_OPT_LEVEL)


# The code generator's optimization level (0-3). 1, not 3: the kernels are scheduled and
# register-tiled by hand, and the extra machine passes of levels 2-3 made no step faster, only
# the emission slower (bench/NOTES.md, "Code generation: optimization level").
CODEGEN_OPT_LEVEL = 1


def new_jit_target_machine() -> llvm.TargetMachine:
    """A fresh host target machine (same settings), e.g. for an MCJIT engine."""
    return create_target_machine(opt_level=CODEGEN_OPT_LEVEL)


def simd() -> SimdShape:
    """The vector shape kernels are planned for: the target's lanes and registers."""
    return host_target().simd


def vector_width_f32() -> int:
    """Floats per SIMD register that generated kernels use: 16 with AVX-512F, 8 with AVX/AVX2,
    else 4 (SSE, NEON, and the generic lowering of <4 x float> on anything else)."""
    return simd().width


def vector_register_count() -> int:
    """Architectural SIMD registers available for register tiling: 32 with AVX-512 and on
    AArch64, else 16."""
    return simd().registers


def new_module(name: str) -> ir.Module:
    """An empty IR module whose triple and data layout match the host.

    Without them LLVM assumes a target without vector registers: the
    passes' cost models and instruction selection need them. The name goes into the
    module's `; ModuleID = "..."` header line, which also separates the
    modules of a program's IR text (llvm/parallel.py): quotes and control
    characters are replaced so that it stays one well-formed line.
    """
    tm = host_target_machine()
    module = ir.Module(name=re.sub(r'["\\\x00-\x1f\x7f]', "_", name))
    module.triple = tm.triple
    module.data_layout = str(tm.target_data)
    return module


# The optimization passes run on every module, in this order. The kernels arrive vectorized,
# register-tiled and unrolled by hand; what they need from LLVM is: SROA (the builders' loop
# variables are allocas), IPSCCP (an internal helper gets the constant arguments that every
# caller in its module passes: strides, flags), InstCombine and SimplifyCFG to clean up, loop
# rotation (bottom-tested loops for the code generator) and dead-code elimination.
# LLVM's default O2 pipeline ran some 80 passes more and found next to nothing to do: it took
# several times as long, its hot loops came out instruction for instruction the same (the GEMM
# micro-kernel's k loop) and no workload's per-kernel profile changed (bench/NOTES.md,
# "Code generation: optimization passes").
OPTIMIZATION_PASSES = ("sroa", "ipsccp", "instcombine", "simplifycfg", "loop_rotate",
                       "instcombine", "simplifycfg", "dce")

def worker_settings() -> dict:
    """What a compile worker process (object_worker.py) needs to compile as this process would."""
    host = host_target()
    return {"triple": host.triple, "cpu": host.cpu, "features": host.features,
            "opt_level": CODEGEN_OPT_LEVEL, "passes": list(OPTIMIZATION_PASSES)}


def pass_builder(target_machine: llvm.TargetMachine):
    """The pass builder that `module_pass_manager()`'s passes run with: it holds the target
    machine (the passes' cost models) and the analyses.

    One per pipeline run: llvmlite registers instrumentation callbacks on the
    builder each time a pipeline runs, so it must not be shared by threads.
    """
    return llvm.create_pass_builder(target_machine, llvm.create_pipeline_tuning_options())


_idle_managers: list = []
_idle_managers_lock = threading.Lock()


@contextlib.contextmanager
def module_pass_manager():
    """A module pass manager holding OPTIMIZATION_PASSES, for one pipeline run at a time.

    Borrowed from a pool and returned, never closed: llvmlite (0.50) frees no module pass
    manager it creates, so one per compile grew the process for good. The pool holds as
    many as ever ran at once.
    """
    with _idle_managers_lock:
        manager = _idle_managers.pop() if _idle_managers else None
    if manager is None:
        manager = llvm.create_new_module_pass_manager()
        for name in OPTIMIZATION_PASSES:
            getattr(manager, PASS_METHODS[name])()
    try:
        yield manager
    finally:
        with _idle_managers_lock:
            _idle_managers.append(manager)


def optimize(module_ref: llvm.ModuleRef) -> llvm.ModuleRef:
    """Run OPTIMIZATION_PASSES on the module, in place."""
    with pass_builder(host_target_machine()) as builder, module_pass_manager() as manager:
        manager.run(module_ref, builder)
    return module_ref


def set_target(module_ref: llvm.ModuleRef, target_machine: llvm.TargetMachine) -> None:
    """Give a parsed module the machine's triple and data layout (as `new_module` does)."""
    module_ref.triple = target_machine.triple
    module_ref.data_layout = str(target_machine.target_data)


def parse_and_verify(ir_text: str) -> llvm.ModuleRef:
    """Parse textual IR and verify it, with the host triple and layout."""
    initialize_llvm()
    module_ref = llvm.parse_assembly(str(ir_text))
    module_ref.verify()
    set_target(module_ref, host_target_machine())
    return module_ref


def compile_to_object(ir_text: str) -> bytes:
    """Parse, verify, optimise and emit a native object file for the host."""
    module_ref = optimize(parse_and_verify(ir_text))
    return host_target_machine().emit_object(module_ref)


def compile_to_assembly(ir_text: str) -> str:
    """Like `compile_to_object`, but returns the assembly, for inspection."""
    module_ref = optimize(parse_and_verify(ir_text))
    return host_target_machine().emit_assembly(module_ref)


def target_fingerprint() -> str:
    """Identifies everything that makes an emitted object host-specific."""
    host = host_target()
    return "|".join([
        host.triple,
        host.cpu,
        host.features,
        f"llvmlite-{llvmlite.__version__}",
        "llvm-" + ".".join(map(str, llvm.llvm_version_info)),
    ])


def load_object(obj: bytes) -> llvm.ExecutionEngine:
    """Load an emitted object into a new MCJIT engine (tests and benchmarks).

    The runtime has its own loader; this one exists so the kernels can be
    tested end to end the same way.  Keep the engine alive while its
    functions are used: `engine.get_function_address(name)`.
    """
    engine = llvm.create_mcjit_compiler(llvm.parse_assembly(""),
                                        new_jit_target_machine())
    engine.add_object_file(llvm.ObjectFileRef.from_data(obj))
    engine.finalize_object()
    return engine
