"""Every instruction set graphc plans for, on any host: the target levels (graphc_runtime.host)
and their planning logic checked here by injected hosts, and the kernel tests executed again at
every narrower level this host can run (GRAPHC_TARGET), so that an AVX-512 host also runs the
AVX2 and SSE code and an AVX2 host the SSE code."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from graphc_runtime import host
from graphc_runtime.host import SIMD_SHAPES, HostTarget

TESTS = os.path.dirname(os.path.abspath(__file__))

X86_AVX512 = HostTarget("x86_64-unknown-linux-gnu", "sapphirerapids",
                        "+64bit,+sse4.2,+avx,+avx2,+fma,+f16c,+avx512f,+avx512bw,+avx512vl,+amx-tile,+vaes,+popcnt")
X86_AVX2 = HostTarget("x86_64-unknown-linux-gnu", "znver3", "+64bit,+sse4.2,+avx,+avx2,+fma,-avx512f,+popcnt")
X86_SSE = HostTarget("x86_64-unknown-linux-gnu", "nehalem", "+64bit,+sse4.2,-avx,-avx2,-fma,-avx512f")
ARM = HostTarget("aarch64-unknown-linux-gnu", "neoverse-n1", "+neon,+fp-armv8,+crc")


@pytest.mark.parametrize("target, shape", [(X86_AVX512, "avx512"), (X86_AVX2, "avx2"),
                                           (X86_SSE, "sse"), (ARM, "neon")])
def test_each_host_plans_for_its_vectors(target, shape):
    assert target.simd == SIMD_SHAPES[shape]


@pytest.mark.parametrize("target, levels", [
    (X86_AVX512, {"native", "sse", "avx2", "avx512"}),
    (X86_AVX2, {"native", "sse", "avx2"}),
    (X86_SSE, {"native", "sse"}),
    (ARM, {"native", "neon"}),
    (HostTarget("riscv64-unknown-linux-gnu", "generic", "+v"), {"native"}),
])
def test_a_host_runs_only_the_levels_its_cpu_has(target, levels):
    assert set(host._runnable_levels(target)) == levels


def test_narrowing_turns_off_every_wider_feature_and_keeps_the_rest():
    avx2 = HostTarget(X86_AVX512.triple, X86_AVX512.cpu, host.narrowed_features(X86_AVX512.features, "avx2"))
    assert avx2.simd == SIMD_SHAPES["avx2"]
    assert avx2.has_feature("avx2") and avx2.has_feature("fma") and avx2.has_feature("vaes")
    assert not any(avx2.has_feature(f) for f in ("avx512f", "avx512bw", "avx512vl", "amx-tile"))
    assert avx2.features.endswith(",-avx512f")   # and LLVM clears whatever implies it

    sse = HostTarget(X86_AVX512.triple, X86_AVX512.cpu, host.narrowed_features(X86_AVX512.features, "sse"))
    assert sse.simd == SIMD_SHAPES["sse"]
    assert sse.has_feature("sse4.2") and sse.has_feature("popcnt")
    assert not any(sse.has_feature(f) for f in ("avx", "avx2", "fma", "f16c", "vaes", "avx512f"))
    assert host.narrowed_features(X86_AVX512.features, "avx512") == X86_AVX512.features


@pytest.fixture
def fresh_target(monkeypatch):
    """host_target() read again from the environment, then restored."""
    host.host_target.cache_clear()
    yield monkeypatch
    monkeypatch.undo()
    host.host_target.cache_clear()


def test_graphc_target_sets_the_code_generators_target(fresh_target):
    narrowest = next(level for level in ("sse", "neon", "native") if level in host.runnable_levels())
    fresh_target.setenv("GRAPHC_TARGET", narrowest)
    target = host.host_target()
    assert target.level == narrowest
    from graphc.backend.llvm import target as codegen_target
    assert codegen_target.host_features() == target.features
    assert codegen_target.simd() == target.simd
    if narrowest != "native":
        assert codegen_target.vector_width_f32() == 4


def test_an_unknown_or_unrunnable_level_warns_and_compiles_for_the_host(fresh_target):
    fresh_target.setenv("GRAPHC_TARGET", "avx9000")
    with pytest.warns(RuntimeWarning, match=r"GRAPHC_TARGET='avx9000' is not one of this host's levels"):
        target = host.host_target()
    assert target.level == "native" and target.features == host._native_target().features


NARROWER_LEVELS = [level for level in ("avx2", "sse")
                   if level in host.runnable_levels() and SIMD_SHAPES[level] != host._native_target().simd]

# The tests that compile and execute kernels, and whole steps, at the process's target.
KERNEL_TESTS = ["test_gemm_kernels.py", "test_misc_kernels.py", "test_conv_pool_kernels.py",
                "test_conv_batch_lanes.py", "test_networks.py", "test_compile_ops.py", "test_pad_slice.py",
                "test_dropout_mask.py", "test_concat_leaky_relu.py", "test_optimizers.py", "test_sum_prologue.py"]


@pytest.mark.skipif(not NARROWER_LEVELS, reason="this host runs no narrower instruction set")
@pytest.mark.parametrize("level", NARROWER_LEVELS or ["none"])
def test_kernels_pass_at_every_narrower_level_this_host_runs(level):
    environment = {**os.environ, "GRAPHC_TARGET": level}
    command = [sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-x", "-p", "no:cacheprovider",
               *(os.path.join(TESTS, name) for name in KERNEL_TESTS)]
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"GRAPHC_TARGET={level}:\n{result.stdout[-4000:]}\n{result.stderr[-2000:]}"
    assert " passed" in result.stdout
