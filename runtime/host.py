"""The machine code's target: this CPU, or a narrower instruction set it can also run.

One owner for what compiled code is specialised to: the triple, the CPU name and its LLVM
feature string, and what follows from them for the kernels (floats per vector register, vector
registers). The compiler plans and emits for it; the runtime keys its caches by it.

llvmlite is imported by the functions that ask LLVM, not by this module: a process that only
runs saved artifacts (deployed.py) never imports it on x86-64 Linux.

`GRAPHC_TARGET` (read once, at first use) narrows the instruction set below the host's, so that
one machine can run the code another would get: `native` (the default), `avx512`, `avx2` or
`sse` on x86-64, `native` or `neon` on AArch64. A level the host cannot run is refused with a
warning and the host's own is used.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import llvmlite.binding as llvm

__all__ = ["SimdShape", "SIMD_SHAPES", "HostTarget", "TARGET_LEVELS", "host_target", "initialize_llvm",
           "narrowed_features", "runnable_levels", "create_target_machine"]


@dataclasses.dataclass(frozen=True)
class SimdShape:
    """What kernel planning needs to know of an instruction set: float32 lanes per vector and
    architectural vector registers."""

    name: str
    width: int
    registers: int


# Every instruction set graphc plans for; plan tests check each of them on any host.
SIMD_SHAPES = {
    "sse": SimdShape("sse", 4, 16),
    "avx2": SimdShape("avx2", 8, 16),
    "avx512": SimdShape("avx512", 16, 32),
    "neon": SimdShape("neon", 4, 32),
}

# Features that need AVX-512 or AVX to be encoded, by prefix; turned off below those levels.
# The trailing "-avx512f" / "-avx" also lets LLVM clear whatever implies them.
_AVX512_PREFIXES = ("avx512", "amx", "avx10", "evex512")
_AVX_PREFIXES = _AVX512_PREFIXES + ("avx", "fma", "f16c", "xop", "vaes", "vpclmulqdq", "sha512", "sm3", "sm4")
_X86_LEVELS = {"avx512": (), "avx2": _AVX512_PREFIXES, "sse": _AVX_PREFIXES}
TARGET_LEVELS = ("native", *_X86_LEVELS, "neon")

_initialize_lock = threading.Lock()
_initialized = False


def initialize_llvm() -> None:
    """Initialize LLVM for the host target; cheap and safe to call any number of times.

    llvmlite 0.50 removed `llvm.initialize()` (it raises); the three native initializers
    are all that code generation and loading for the host need.
    """
    global _initialized
    if _initialized:
        return
    import llvmlite.binding as llvm
    with _initialize_lock:
        if not _initialized:
            llvm.initialize_native_target()
            llvm.initialize_native_asmprinter()
            llvm.initialize_native_asmparser()
            _initialized = True


@dataclasses.dataclass(frozen=True)
class HostTarget:
    """What machine code is specialized to; part of every cache key."""

    triple: str
    cpu: str
    features: str
    level: str = "native"

    def has_feature(self, name: str) -> bool:
        return f"+{name}" in self.features.split(",")

    @property
    def is_aarch64(self) -> bool:
        return self.triple.startswith(("aarch64", "arm64"))

    @property
    def simd(self) -> SimdShape:
        """The vector shape kernels are planned for on this target."""
        if self.has_feature("avx512f"):
            return SIMD_SHAPES["avx512"]
        if self.has_feature("avx"):
            return SIMD_SHAPES["avx2"]
        if self.is_aarch64:
            return SIMD_SHAPES["neon"]
        return SIMD_SHAPES["sse"]


def narrowed_features(features: str, level: str) -> str:
    """`features` (an LLVM feature string) with everything above x86 `level` turned off."""
    prefixes = _X86_LEVELS[level]
    if not prefixes:
        return features
    flags = [flag for flag in features.split(",") if flag]
    narrowed = [f"-{flag[1:]}" if flag[1:].startswith(prefixes) else flag for flag in flags]
    return ",".join(narrowed + ["-avx" if level == "sse" else "-avx512f"])


def _host_features() -> str:
    import llvmlite.binding as llvm
    try:
        return llvm.get_host_cpu_features().flatten()
    except RuntimeError:
        # Some hosts (and some LLVM builds) cannot report features; an empty string means
        # "baseline of the triple", which is always safe.
        return ""


def _runnable_levels(native: HostTarget) -> tuple[str, ...]:
    if native.is_aarch64:
        return ("native", "neon")
    if native.triple.startswith(("x86_64", "amd64")):
        levels = ["native", "sse"]
        if native.has_feature("avx2") and native.has_feature("fma"):
            levels.append("avx2")
        if native.has_feature("avx512f"):
            levels.append("avx512")
        return tuple(levels)
    return ("native",)


def runnable_levels() -> tuple[str, ...]:
    """The GRAPHC_TARGET levels this host can execute."""
    return _runnable_levels(_native_target())


@functools.cache
def _native_target() -> HostTarget:
    import llvmlite.binding as llvm
    initialize_llvm()
    return HostTarget(llvm.get_process_triple(), llvm.get_host_cpu_name(), _host_features())


@functools.cache
def host_target() -> HostTarget:
    """This process's target: the host's CPU, narrowed as GRAPHC_TARGET asks."""
    native = _native_target()
    level = os.environ.get("GRAPHC_TARGET", "").strip().lower() or "native"
    if level not in TARGET_LEVELS or level not in _runnable_levels(native):
        warnings.warn(f"GRAPHC_TARGET={level!r} is not one of this host's levels "
                      f"{', '.join(_runnable_levels(native))}; compiling for the host's own",
                      RuntimeWarning, stacklevel=2)
        return native
    if level in ("native", "neon"):  # NEON is AArch64's baseline: nothing to turn off
        return dataclasses.replace(native, level=level)
    return HostTarget(native.triple, native.cpu, narrowed_features(native.features, level), level)


def create_target_machine(host: HostTarget | None = None, *, opt_level: int,
                          code_model: str = "jitdefault") -> llvm.TargetMachine:
    """A fresh target machine for `host` (default `host_target()`) with the JIT code model.

    Fresh because MCJIT takes ownership of the target machine it is given. On x86-64 the JIT
    code model is the large one: 64-bit absolute addresses for constants and calls, which any
    loader can resolve wherever it places the sections.
    """
    import llvmlite.binding as llvm
    host = host or host_target()
    initialize_llvm()
    return llvm.Target.from_triple(host.triple).create_target_machine(
        cpu=host.cpu, features=host.features, opt=opt_level, reloc="default", codemodel=code_model, jit=True)
