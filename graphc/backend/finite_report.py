"""The error of a check_finite program that stopped: which node made the first NaN or infinity,
in which kernel, where the user built it, and what the kernel read.

The entry only says which check failed (a Status code, emit/finite_check.py); the rest is read
here, after the native call returned, from the program's plan and from its memory as the
entry left it: the arena still holds every value the failed step read, and the buffers the
call updated in place are back to their values from before it.
"""
from __future__ import annotations

import numpy as np

import graphc_runtime as rt
from graphc.backend.assemble import ProgramSpec
from graphc.backend.emit.finite_check import check_index_of
from graphc.backend.lowering import alias_root
from graphc.core.display import node_summary, type_string
from graphc.core.provenance import derivation, origin

MAX_NAMES_LISTED = 6


def stopped_error(spec: ProgramSpec, status: int, memory) -> FloatingPointError:
    """The FloatingPointError for Status `status`; `memory(position)` gives a slot's array."""
    index = check_index_of(status, len(spec.checks))
    if not 0 <= index < len(spec.checks):
        return FloatingPointError(f"check_finite: the program stopped with status {status}, which names none of "
                                  f"its {len(spec.checks)} checks (internal error)")
    check = spec.checks[index]
    step, node = spec.steps[check.step], check.node
    kernel = f"kernel k{check.step} {step.label}"
    reader = _MemoryReader(spec, memory)
    restored = check.location[0] == "slot" and check.location[1] in spec.saved_slots
    found = "a NaN or infinity" if restored else _non_finite_counts(reader.values(node, check.location))
    lines = [f"check_finite: the first NaN or infinity of this call: {found} in %{node.id} {node.op} "
             f"{type_string(node)} made at {node.site}, computed by {kernel} "
             f"(step {check.step + 1} of {len(spec.steps)} in execution order)",
             f"  node: {_described(node)}"]
    if node.grad_of is not None:
        lines += [f"  a backward node; its forward node: {origin(node.grad_of)}",
                  f"  derivative: {derivation(node)}"]
    if node in step.extra_outputs:
        lines.append(f"  {kernel} computes it beside its result %{step.node.id}, in the same pass over the data")
    elif node is not step.node:
        lines.append(f"  {kernel} stores it in place beside its result %{step.node.id}")
    if restored:
        lines.append(f"  it is the new value of {_slot_name(spec.slots[check.location[1]])}, which was restored: "
                     f"its non-finite values are not shown")
    others = [covered for covered in step.covers if covered is not node]
    if others:
        lines.append(f"  {kernel} also computes (fused): " + "; ".join(_described(covered) for covered in others))
    lines.append(f"  the operands of {kernel}, as it read them:")
    seen = set()
    for operand, location in zip(step.operands, spec.operand_locations[check.step]):
        root = alias_root(operand)
        if root.id not in seen:
            seen.add(root.id)
            lines.append(f"    {_described(root)}: {_value_range(reader.values(root, location))}")
    if spec.saved_slots:
        saved = [spec.slots[position] for position in spec.saved_slots]
        groups = [_listed([slot.name for slot in saved if not isinstance(slot, rt.State)], "params and buffers"),
                  _listed([slot.name for slot in saved if isinstance(slot, rt.State)], "optimizer state")]
        lines.append(f"  nothing was updated: {' and '.join(group for group in groups if group)} keep their values "
                     f"from before this call, which is not counted")
    return FloatingPointError("\n".join(lines))


def _described(node) -> str:
    site = "" if node.op in ("input", "param", "constant") else f" at {node.site}"
    return f"%{node.id} {node_summary(node)} {type_string(node)}{site}"


def _listed(names: list[str], kind: str) -> str:
    if not names:
        return ""
    shown = ", ".join(repr(name) for name in names[:MAX_NAMES_LISTED])
    more = f" and {len(names) - MAX_NAMES_LISTED} more" if len(names) > MAX_NAMES_LISTED else ""
    return f"{kind} {shown}{more}"


def _slot_name(slot) -> str:
    kind = "optimizer state" if isinstance(slot, rt.State) else "param"
    return f"{kind} {slot.name!r}"


class _MemoryReader:
    """A node's values at a location of the program's memory after the call."""

    def __init__(self, spec: ProgramSpec, memory):
        self._memory = memory
        self._workspace = next(i for i, slot in enumerate(spec.slots) if isinstance(slot, rt.Workspace))

    def values(self, node, location) -> np.ndarray:
        kind, where = location
        if node.op == "constant":
            return np.asarray(node.attrs["value"].array).reshape(-1)
        dtype = np.dtype(node.dtype)
        if kind == "arena":
            raw = self._memory(self._workspace)
            return raw[where:where + node.size * dtype.itemsize].view(dtype)
        if kind == "slot":
            return np.asarray(self._memory(where)).reshape(-1)[:node.size]
        raise ValueError(f"no values at {location!r}")


def _non_finite_counts(values: np.ndarray) -> str:
    parts = [(np.count_nonzero(np.isnan(values)), "NaN"), (np.count_nonzero(values == np.inf), "+inf"),
             (np.count_nonzero(values == -np.inf), "-inf")]
    found = ", ".join(f"{count} {what}" for count, what in parts if count)
    return f"{found or 'a NaN or infinity'} (of {values.size} values)"


def _value_range(values: np.ndarray) -> str:
    if values.size == 0:
        return "no values"
    if values.dtype.kind != "f":
        return f"min {values.min()}, max {values.max()}"
    finite = values[np.isfinite(values)]
    text = f"min {finite.min():.6g}, max {finite.max():.6g}" if finite.size else "no finite value"
    if finite.size == values.size:
        return text + "; no NaN or inf"
    return f"{text}; {_non_finite_counts(values)}"
