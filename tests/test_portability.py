"""Code for CPUs with fewer features than this one: an x86-64 without AVX and FMA (SSE4.2 only).

The generated code is plain LLVM vectors and target-independent intrinsics, so it must compile
for any CPU, compute the same results, and not fall back to a library call per lane (a GEMM
built on llvm.fma became a libm `fmaf` call per multiply-add there: 20x slower steps).
"""
import platform

import numpy as np
import pytest
from cross_targets import aarch64_target_machine

import graphc as gc
import graphc_runtime as rt
from graphc.backend import compiler
from graphc.backend.llvm import parallel, target
from graphc.tools import models
from graphc_runtime import host

pytestmark = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                                reason="SSE-only code runs on x86-64 hosts")

@pytest.fixture
def sse_only(monkeypatch, tmp_path):
    """Compile, until the test ends, for this CPU with AVX, AVX2 and FMA turned off."""
    monkeypatch.setenv("GRAPHC_TARGET", "sse")
    host.host_target.cache_clear()
    monkeypatch.setattr(compiler, "_cache", rt.ObjectCache(tmp_path))
    yield
    monkeypatch.undo()
    host.host_target.cache_clear()


@pytest.mark.parametrize("network", ["mlp", "lenet5"])
def test_sse_only_training_step_matches_the_reference_without_libm_fma(sse_only, network):
    assert target.vector_width_f32() == 4
    model = {"mlp": lambda: models.mlp(8, sizes=(64, 32, 10)), "lenet5": lambda: models.lenet5(4)}[network]()
    feeds = models.random_batch(model, np.random.default_rng(0))
    params = gc.init_params(model.graph, seed=0)
    names = list(params)
    reference = gc.evaluate([model.loss] + gc.grad(model.loss, [model.graph.params[n] for n in names]), feeds, params)
    step = gc.compile_training_step(model.loss, params, gc.SGD(lr=0.1))
    objects = parallel.compile_modules(parallel.split_modules(step.llvm_ir), threads=1)
    needed = {name for obj in objects for name in rt.loader.undefined_symbols(obj)}
    assert not needed & {"fmaf", "fma"}, sorted(needed)
    expected = {n: params[n] - 0.1 * g for n, g in zip(names, reference[1:])}
    loss = step(**feeds)
    np.testing.assert_allclose(loss, reference[0], rtol=1e-5)
    for name in names:
        np.testing.assert_allclose(params[name], expected[name], rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("network", ["mlp", "lenet5"])
def test_steps_compile_for_arm_and_call_only_libc_and_libm(sse_only, network):
    """Kernels use target-independent IR only: a step's modules compile for AArch64 (NEON, 4
    lanes) and need nothing but the C and math libraries: no x86 intrinsic, no fmaf per lane."""
    import re

    import llvmlite.binding as llvm
    machine = aarch64_target_machine()
    model = {"mlp": lambda: models.mlp(8, sizes=(64, 32, 10)), "lenet5": lambda: models.lenet5(4)}[network]()
    step = gc.compile_training_step(model.loss, gc.init_params(model.graph, seed=0), gc.SGD(lr=0.1))
    defined, needed = set(), set()
    for text in parallel.split_modules(step.llvm_ir):
        text = re.sub(r'^target (triple|datalayout) = ".*"$', "", text, flags=re.MULTILINE)
        module = llvm.parse_assembly(text)
        module.triple = machine.triple
        module.data_layout = str(machine.target_data)
        module.verify()
        arm_object = machine.emit_object(module)
        assert arm_object[18:20] == (183).to_bytes(2, "little")   # ELF e_machine: EM_AARCH64
        defined |= set(rt.loader.defined_symbols(arm_object))
        needed |= set(rt.loader.undefined_symbols(arm_object))
    assert needed - defined <= {"expf", "logf", "tanhf", "memset", "memcpy", "sched_yield"}, sorted(needed - defined)
