"""A program's scalar call (`Program.call_scalar`, `keyword_call_scalar`: a training step's
call): exact feeds run as they are, every other feed is converted or reported before native
code runs, refused inputs are reported by name, the GIL is released while the entry runs."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from hand_written_ir import load_ir

import graphc_runtime as rt

# total = sum(x) + sum(labels), calls += 1; labels[i] >= 3 is refused (status = argv position 1 + 1).
TOTAL_IR = """
define void @total(ptr %args, i64 %tid, i64 %nthreads) {
entry:
  %x = load ptr, ptr %args
  %labels_slot = getelementptr inbounds ptr, ptr %args, i64 1
  %labels = load ptr, ptr %labels_slot
  %calls_slot = getelementptr inbounds ptr, ptr %args, i64 2
  %calls = load ptr, ptr %calls_slot
  %status_slot = getelementptr inbounds ptr, ptr %args, i64 3
  %status = load ptr, ptr %status_slot
  %out_slot = getelementptr inbounds ptr, ptr %args, i64 4
  %out = load ptr, ptr %out_slot
  %label0 = load i32, ptr %labels
  %label1_at = getelementptr inbounds i32, ptr %labels, i64 1
  %label1 = load i32, ptr %label1_at
  %bad0 = icmp uge i32 %label0, 3
  %bad1 = icmp uge i32 %label1, 3
  %bad = or i1 %bad0, %bad1
  br i1 %bad, label %refuse, label %sum
refuse:
  store i64 2, ptr %status
  ret void
sum:
  %i = phi i64 [ 0, %entry ], [ %next, %sum ]
  %acc = phi float [ 0.0, %entry ], [ %acc_next, %sum ]
  %x_at = getelementptr inbounds float, ptr %x, i64 %i
  %xi = load float, ptr %x_at
  %acc_next = fadd float %acc, %xi
  %next = add i64 %i, 1
  %more = icmp ult i64 %next, 6
  br i1 %more, label %sum, label %done
done:
  %labels_sum = add i32 %label0, %label1
  %labels_float = sitofp i32 %labels_sum to float
  %total = fadd float %acc_next, %labels_float
  store float %total, ptr %out
  %count = load i64, ptr %calls
  %count_next = add i64 %count, 1
  store i64 %count_next, ptr %calls
  ret void
}
"""

SLOTS = [
    rt.Input("x", (2, 3)),
    rt.Input("labels", (2,), "int32", valid_range=(0, 3), range_checked_natively=True),
    rt.State("calls", (1,), "int64"),
    rt.Status(),
    rt.Output("total", ()),
]
X = np.arange(6, dtype=np.float32).reshape(2, 3)
LABELS = np.array([1, 2], np.int32)


@pytest.fixture(scope="module")
def library():
    return load_ir(TOTAL_IR)


@pytest.fixture
def program(library):
    return rt.Program(library, "total", SLOTS)


def calls(program) -> int:
    return int(program.state["calls"][0])


def test_exact_feeds_run_natively_and_return_the_loss_as_a_float(program):
    result = program.keyword_call_scalar(object(), x=X, labels=LABELS)
    assert type(result) is float and result == 15.0 + 3.0
    assert program.call_scalar({"x": X, "labels": LABELS}) == 18.0
    assert calls(program) == 2


class Subclass(np.ndarray):
    pass


@pytest.mark.parametrize("x", [
    X.astype(np.float64),                            # another dtype
    X.astype(X.dtype.newbyteorder()),                # big-endian: another dtype object
    np.zeros((2, 6), np.float32)[:, ::2] + X,        # not contiguous
    np.asfortranarray(X),                            # F-ordered
    X.view(Subclass),                                # a subclass
    X.tolist(),                                      # not an array
])
def test_any_other_feed_is_converted_and_gives_the_same_result(program, x):
    assert program.keyword_call_scalar(object(), x=x, labels=LABELS) == 18.0
    assert program.call_scalar({"x": x, "labels": LABELS.astype(np.int64)}) == 18.0
    assert calls(program) == 2


def test_feeds_are_converted_or_reported_before_native_code_runs(program):
    call = program.keyword_call_scalar
    owner = object()
    assert call(owner, x=X.astype(np.float64), labels=LABELS) == 18.0          # converted
    assert call(owner, x=np.asfortranarray(X), labels=LABELS.tolist()) == 18.0  # copied
    assert calls(program) == 2
    with pytest.raises(ValueError, match=r"input 'x': expected shape \(2, 3\) float32, got shape \(3, 2\)"):
        call(owner, x=X.reshape(3, 2), labels=LABELS)
    assert calls(program) == 2


def test_an_input_the_entry_refuses_is_reported_by_name(program):
    with pytest.raises(ValueError, match=r"input 'labels': values must lie in the valid range \[0, 3\)"):
        program.keyword_call_scalar(object(), x=X, labels=np.array([0, 3], np.int32))
    assert calls(program) == 0
    with pytest.raises(ValueError, match="input 'labels'"):
        program.call_scalar({"x": X, "labels": np.array([5, 0], np.int32)})
    assert program.call_scalar({"x": X, "labels": LABELS}) == 18.0   # the status is cleared again


# Spins until flag[0] is set (by another Python thread) or ~2^31 iterations pass; out = flag[0].
WAIT_IR = """
define void @wait(ptr %args, i64 %tid, i64 %nthreads) {
entry:
  %flag = load ptr, ptr %args
  %out_slot = getelementptr inbounds ptr, ptr %args, i64 1
  %out = load ptr, ptr %out_slot
  br label %spin
spin:
  %i = phi i64 [ 0, %entry ], [ %next, %spin ]
  %value = load volatile float, ptr %flag
  %next = add i64 %i, 1
  %unset = fcmp oeq float %value, 0.0
  %budget = icmp ult i64 %next, 2147483648
  %again = and i1 %unset, %budget
  br i1 %again, label %spin, label %done
done:
  store float %value, ptr %out
  ret void
}
"""


def test_the_gil_is_released_while_the_entry_runs():
    """The entry waits for a Python thread to set a flag: it can only if the call let go of the GIL."""
    program = rt.Program(load_ir(WAIT_IR), "wait", [rt.Input("flag", (1,)), rt.Output("seen", ())])
    flag = np.zeros(1, np.float32)

    def set_flag():
        time.sleep(0.05)
        flag[0] = 1.0

    setter = threading.Thread(target=set_flag)
    setter.start()
    assert program.call_scalar({"flag": flag}) == 1.0
    setter.join()


# out (float64) = x[0] (float64), plus 2^-40: a value a float32 could not hold.
DOUBLE_IR = """
define void @double(ptr %args, i64 %tid, i64 %nthreads) {
  %x = load ptr, ptr %args
  %out_slot = getelementptr inbounds ptr, ptr %args, i64 1
  %out = load ptr, ptr %out_slot
  %value = load double, ptr %x
  %result = fadd double %value, 0x3D70000000000000
  store double %result, ptr %out
  ret void
}
"""


def test_a_float64_output_is_returned_in_full_precision():
    program = rt.Program(load_ir(DOUBLE_IR), "double", [rt.Input("x", (1,), "float64"), rt.Output("out", (), "float64")])
    assert program.call_scalar({"x": np.array([1.0])}) == 1.0 + 2.0 ** -40
    assert program.keyword_call_scalar(object(), x=np.array([3.0])) == 3.0 + 2.0 ** -40
