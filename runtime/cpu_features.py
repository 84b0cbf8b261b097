"""Which CPU features machine code needs, and whether this CPU has them.

Code compiled for a target may use any instruction its LLVM feature string enables
("+avx2,+fma,..."): run on a CPU without one, it dies of SIGILL. A saved artifact therefore
lists the features its code may use (`required_features`), and loading checks each against
this CPU (`missing_features`) before anything runs.

On x86-64 Linux the CPU's features come from /proc/cpuinfo, under the kernel's names (which
also drops what the OS does not enable, such as AVX-512 state it does not save): no LLVM is
needed to run an artifact. Elsewhere LLVM reports them (llvmlite, imported then).

`_CPUINFO_FLAGS` maps each LLVM feature that code generation may use to the cpuinfo flags that
provide it; `_NEVER_GENERATED` lists the features graphc's code never uses (system, crypto,
transactional and matrix instructions, reachable only through intrinsics it does not call), so
an artifact does not demand them. A feature in neither table is listed as required and cannot
be checked: loading refuses it, which a new feature must be put in one of the tables to change.
"""

from __future__ import annotations

import functools
import platform
import sys

__all__ = ["required_features", "missing_features", "host_is_x86_64_linux"]

_AVX10_1 = ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx512ifma", "avx512vbmi", "avx512_vbmi2",
            "avx512_bitalg", "avx512_vnni", "avx512_vpopcntdq", "avx512_bf16", "avx512_fp16")

# LLVM feature -> the Linux /proc/cpuinfo flags that must all be present.
_CPUINFO_FLAGS = {
    "64bit": ("lm",), "cmov": ("cmov",), "cx8": ("cx8",), "cx16": ("cx16",), "mmx": ("mmx",), "x87": ("fpu",),
    "sahf": ("lahf_lm",), "popcnt": ("popcnt",), "lzcnt": ("abm",), "bmi": ("bmi1",), "bmi2": ("bmi2",),
    "movbe": ("movbe",), "adx": ("adx",), "prfchw": ("3dnowprefetch",), "crc32": ("sse4_2",),
    "sse": ("sse",), "sse2": ("sse2",), "sse3": ("pni",), "ssse3": ("ssse3",), "sse4.1": ("sse4_1",),
    "sse4.2": ("sse4_2",), "sse4a": ("sse4a",), "fma4": ("fma4",), "xop": ("xop",), "tbm": ("tbm",),
    "avx": ("avx",), "avx2": ("avx2",), "fma": ("fma",), "f16c": ("f16c",), "gfni": ("gfni",),
    "avx512f": ("avx512f",), "avx512bw": ("avx512bw",), "avx512cd": ("avx512cd",), "avx512dq": ("avx512dq",),
    "avx512vl": ("avx512vl",), "avx512ifma": ("avx512ifma",), "avx512vbmi": ("avx512vbmi",),
    "avx512vbmi2": ("avx512_vbmi2",), "avx512bitalg": ("avx512_bitalg",), "avx512vnni": ("avx512_vnni",),
    "avx512vpopcntdq": ("avx512_vpopcntdq",), "avx512bf16": ("avx512_bf16",), "avx512fp16": ("avx512_fp16",),
    "avx512vp2intersect": ("avx512_vp2intersect",), "evex512": ("avx512f",), "avx10.1": _AVX10_1,
    "avx10.1-512": _AVX10_1, "avx10.1-256": _AVX10_1, "avxvnni": ("avx_vnni",), "avxifma": ("avx_ifma",),
}

_NEVER_GENERATED = {
    "aes", "vaes", "pclmul", "vpclmulqdq", "sha", "sha512", "sm3", "sm4", "kl", "widekl",
    "rdrnd", "rdseed", "rdpid", "rdpru", "rtm", "tsxldtrk", "sgx", "pku", "invpcid", "pconfig", "ptwrite",
    "wbnoinvd", "shstk", "uintr", "hreset", "enqcmd", "serialize", "waitpkg", "usermsr", "lwp", "mwaitx",
    "clzero", "clflushopt", "clwb", "cldemote", "movdiri", "movdir64b", "movrs", "fsgsbase", "fxsr",
    "xsave", "xsavec", "xsaveopt", "xsaves", "cmpccxadd", "raoint", "prefetchi",
    "amx-tile", "amx-int8", "amx-bf16", "amx-fp16", "amx-complex", "amx-fp8", "amx-tf32", "amx-avx512",
    "amx-movrs", "amx-transpose",
}


def host_is_x86_64_linux() -> bool:
    return sys.platform.startswith("linux") and platform.machine().lower() in ("x86_64", "amd64")


def required_features(triple: str, features: str) -> list[str]:
    """The features code compiled for `triple` with LLVM feature string `features` may use."""
    enabled = sorted({flag[1:] for flag in features.split(",") if flag.startswith("+")})
    if triple.startswith(("x86_64", "amd64")):
        return [name for name in enabled if name not in _NEVER_GENERATED]
    return enabled


def missing_features(required: list[str]) -> list[str]:
    """The features of `required` this CPU lacks, or that cannot be checked here (each with why)."""
    if host_is_x86_64_linux():
        flags = _cpuinfo_flags()
        if flags is None:
            return [f"{name} (/proc/cpuinfo is unreadable)" for name in required]
        missing = []
        for name in required:
            needed = _CPUINFO_FLAGS.get(name)
            if needed is None:
                missing.append(f"{name} (a feature graphc_runtime cannot check)")
            elif not set(needed) <= flags:
                missing.append(name)
        return missing
    host = _llvm_host_features()
    return [name for name in required if name not in host]


@functools.cache
def _cpuinfo_flags() -> frozenset[str] | None:
    """The flags every CPU of /proc/cpuinfo has (a process may move between them)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as file:
            text = file.read(1 << 24)   # a few kilobytes per CPU
    except OSError:
        return None
    per_cpu = [frozenset(line.split(":", 1)[1].split()) for line in text.splitlines()
               if line.startswith("flags") and ":" in line]
    return frozenset.intersection(*per_cpu) if per_cpu else None


def _llvm_host_features() -> set[str]:
    import llvmlite.binding as llvm
    try:
        features = llvm.get_host_cpu_features().flatten()
    except RuntimeError:
        return set()
    return {flag[1:] for flag in features.split(",") if flag.startswith("+")}
