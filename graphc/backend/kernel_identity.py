"""When two steps can run the same machine code: a key equal for steps whose kernels are equal.

A deep network repeats its layers: ResNet-20's 490 steps need 93 different kernels. A kernel's
code is a function of the nodes its lowering read: the nodes it computes (op, attributes,
shape, dtype, which operand feeds which), its operands' shapes and dtypes (the values of
constants and fills too, which a lowering may fold into the code), its label and the sources
its side writes update. Buffers are pointers passed by the entry, so where the data lives does
not matter. Steps with equal keys call one kernel (assemble.py), which is then generated,
compiled and loaded once.

tests/test_kernel_identity.py builds both kernels of every pair of steps sharing a key, in
several networks, and checks that their IR is the same.
"""
from __future__ import annotations

from graphc.backend.lowering_rules import Step
from graphc.transforms.rebuild import attrs_key

_VALUE_OPS = ("constant", "fill")


def kernel_key(step: Step) -> tuple:
    local: dict[int, int] = {}

    def position(node) -> int:
        return local.setdefault(node.id, len(local))

    operands = tuple((position(node), node.shape, node.dtype, _value(node)) for node in step.operands)
    covered = tuple((position(node), node.op, attrs_key(node.attrs), node.shape, node.dtype,
                     tuple(position(operand) for operand in node.inputs)) for node in step.covers)
    # nodes a covered node reads that are neither covered nor the step's operands (absorbed
    # into the kernel some other way): what the lowering could see of them is part of the key
    known = {node.id for node in step.operands} | {node.id for node in step.covers}
    others = tuple((position(node), node.op, attrs_key(node.attrs), node.shape, node.dtype)
                   for node in _read_by(step.covers) if node.id not in known)
    side_writes = tuple((position(node), node.shape, node.dtype) for node in step.side_writes)
    extra_outputs = tuple(position(node) for node in step.extra_outputs)
    return (step.label, position(step.node), step.node.shape, step.node.dtype, operands, covered, others,
            side_writes, extra_outputs)


def _value(node):
    return attrs_key(node.attrs) if node.op in _VALUE_OPS else None


def _read_by(nodes) -> list:
    read: dict[int, object] = {}
    for node in nodes:
        for operand in node.inputs:
            read.setdefault(operand.id, operand)
    return list(read.values())
