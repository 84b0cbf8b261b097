"""ONNX's own backend node tests, imported by gc.import_onnx and run two ways: on the numpy
reference executor and compiled to native code, each compared with the test's expected outputs.

The cases are those the `onnx` package ships (onnx/backend/test/case/node: each op's model and
data, from which onnx writes its test_*/model.onnx folders), built in memory, offline. Every
case whose nodes are all of op types graphc imports runs; tests/onnx_backend_excludes.txt lists
those expected to fail, each with its reason, and they must still fail.
"""
import os
import warnings

import numpy as np
import pytest

pytest.importorskip("onnx")

import graphc as gc  # noqa: E402
from graphc.interchange.onnx_import_ops import CONVERTERS, STATIC_SLOTS  # noqa: E402

EXCLUDES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "onnx_backend_excludes.txt")


def read_excludes() -> dict[str, str]:
    excludes = {}
    with open(EXCLUDES_FILE, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                name, reason = line.split(":", 1)
                excludes[name.strip()] = reason.strip()
    return excludes


def supported_cases():
    """The node test cases built only of op types graphc imports."""
    import onnx.backend.test.case.node as node_cases
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # some generators overflow casts on purpose
        cases = node_cases.collect_testcases()
    return [c for c in cases if c.model is not None and c.data_sets
            and all(n.op_type in CONVERTERS and n.domain in ("", "ai.onnx") for n in c.model.graph.node)]


CASES = supported_cases()
EXCLUDES = read_excludes()


def feeds_and_constants(case):
    """The test's inputs: those read at import time (a Reshape's shape) as constants, the rest as feeds."""
    model = case.model
    static = {n.input[i] for n in model.graph.node for i in STATIC_SLOTS.get(n.op_type, ()) if i < len(n.input)}
    initialized = {t.name for t in model.graph.initializer}
    names = [v.name for v in model.graph.input if v.name not in initialized]
    inputs, expected = case.data_sets[0]
    constants = {n: np.asarray(v) for n, v in zip(names, inputs) if n in static}
    feeds = {n: np.asarray(v) for n, v in zip(names, inputs) if n not in static}
    return feeds, constants, [np.asarray(e) for e in expected]


def check_outputs(got, expected, case, atol):
    assert len(got) == len(expected)
    for value, want in zip(got, expected):
        assert value.shape == want.shape
        np.testing.assert_allclose(value, want, rtol=case.rtol, atol=max(case.atol, atol))


def run_case(case):
    feeds, constants, expected = feeds_and_constants(case)
    model = gc.import_onnx(case.model, constants=constants)
    check_outputs(gc.evaluate(model.outputs, feeds, model.params), expected, case, 1e-6)
    compiled = gc.compile(model.outputs, model.params)
    check_outputs(compiled(**feeds), expected, case, 1e-5)


def test_the_supported_cases_are_found():
    assert len(CASES) >= 250
    ops_covered = {n.op_type for c in CASES for n in c.model.graph.node}
    assert ops_covered >= {"Gemm", "MatMul", "Conv", "MaxPool", "AveragePool", "GlobalAveragePool", "Relu",
                           "LeakyRelu", "Sigmoid", "Tanh", "Exp", "Log", "Sqrt", "Softmax", "LogSoftmax", "Flatten",
                           "Reshape", "Transpose", "Concat", "Pad", "Add", "Sub", "Mul", "Div", "Neg",
                           "BatchNormalization", "Dropout", "Identity", "Constant", "ReduceMean", "ReduceSum"}


def test_every_exclusion_names_a_case_and_gives_a_reason():
    names = {c.name for c in CASES}
    # an onnx release may drop a case; an exclusion of a case that exists must say why
    assert all(reason for reason in EXCLUDES.values())
    assert len(set(EXCLUDES) & names) >= 0.9 * len(EXCLUDES)


@pytest.mark.parametrize("case", [c for c in CASES if c.name not in EXCLUDES], ids=lambda c: c.name)
def test_backend_case(case):
    run_case(case)


@pytest.mark.parametrize("case", [c for c in CASES if c.name in EXCLUDES], ids=lambda c: c.name)
def test_excluded_case_still_fails(case):
    with pytest.raises((NotImplementedError, AssertionError)):
        run_case(case)
