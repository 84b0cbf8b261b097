"""Target machines of other CPUs, for tests that compile for them (nothing runs there)."""
from __future__ import annotations

import llvmlite.binding as llvm
import pytest


def aarch64_target_machine() -> llvm.TargetMachine:
    """AArch64 Linux with NEON and the JIT code model, as graphc's host machine would be; skips
    the test when this llvmlite was built without the AArch64 backend."""
    llvm.initialize_all_targets()
    llvm.initialize_all_asmprinters()
    try:
        arm = llvm.Target.from_triple("aarch64-unknown-linux-gnu")
    except RuntimeError:
        pytest.skip("this llvmlite has no AArch64 target")
    return arm.create_target_machine(cpu="generic", features="+neon", opt=1, codemodel="jitdefault", jit=True)
