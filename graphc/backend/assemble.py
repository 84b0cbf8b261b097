"""From an optimized graph to LLVM modules and the runtime's argument slots.

Lowering picks a kernel for each step (lowering.py), the schedule and memory plan place them
(memory.py), and the entry (emit/entry.py) calls them in order. The kernels fill one or more
modules, the entry goes into the last (llvm/program_modules.py), so that a large program
compiles on all cores. The result, a `ProgramSpec`, holds everything the runtime needs to load
and call the program.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable

import numpy as np

import graphc_runtime as rt
from graphc.backend.emit.entry import EntryBuilder, emit_ticks_function
from graphc.backend.emit.finite_check import FiniteGuard
from graphc.backend.kernel_identity import kernel_key
from graphc.backend.kernels.layout import copy_step
from graphc.backend.llvm.program_modules import ProgramModules
from graphc.backend.lowering import Step, alias_root, plan_steps
from graphc.backend.lowering_rules import LOWERINGS
from graphc.backend.memory import ALIGNMENT, MemoryPlan, plan_memory, schedule
from graphc.core.ir import Graph, Tensor

SUPPORTED_DTYPES = ("float32", "int32")
PROFILE_SLOT = "profile:ticks"
CALLS_SLOT = "graphc:calls"   # completed calls, counted by the entry (dropout's call index, Adam's t)

# Integer inputs whose valid range (class labels) the entry checks itself (see
# EntryBuilder.refuse_out_of_range); others are checked in Python before the call.
NATIVE_RANGE_CHECK_DTYPES = (np.dtype("int32"), np.dtype("int64"))


@dataclasses.dataclass
class FiniteCheck:
    """A buffer a check_finite program scans after step `step`: `node`'s value at `location`
    (("slot", i) or ("arena", offset)), the step's result or one of its side writes."""

    step: int
    node: Tensor
    location: tuple


@dataclasses.dataclass
class ProgramSpec:
    modules: list[str]           # LLVM IR of each module; the last holds the entry
    slots: list
    steps: list[Step]            # in schedule order
    memory: MemoryPlan
    max_threads: int
    phase_steps: list[int]       # for each phase the entry calls, the index of its step
    operand_locations: list[list[tuple]] = dataclasses.field(default_factory=list)   # each step's, in order
    # check_finite only: the buffers scanned, in the order the entry scans them (a Status code
    # names one, emit/finite_check.py), and the slots saved before the first kernel
    checks: list[FiniteCheck] = dataclasses.field(default_factory=list)
    saved_slots: list[int] = dataclasses.field(default_factory=list)
    # For each step, the step whose kernel it calls: itself, or an earlier one with the same
    # code (kernel_identity.py), whose functions are named after that step (k<index>.<label>)
    shares_code_with: list[int] = dataclasses.field(default_factory=list)

    @property
    def llvm_ir(self) -> str:
        """The whole program's IR: its modules one after the other (llvm/parallel.split_modules
        takes them apart)."""
        return "\n".join(self.modules)


def assemble(graph: Graph, outputs: list[Tensor], *, output_names: list[str], inplace: dict[int, str],
             state_names: set[str], max_threads: int, profile: bool = False,
             check_finite: bool = False, instructions_per_module: int | None = None,
             on_module: Callable[[str], None] | None = None) -> ProgramSpec:
    """Lower `outputs` of `graph`.

    `inplace` maps a node id to the name of the param, buffer or state whose memory receives
    that node's value: the optimizer's updates, batch norm's running statistics. Params named in
    `state_names` become runtime-owned State slots (optimizer state, hyperparameter slots, the
    random key) instead of caller-bound params.

    A module is finished once it holds `instructions_per_module` LLVM instructions (None: the
    whole program is one module; llvm/program_modules.default_budget() suits the compile
    threads of this machine), and `on_module` is given its text at once, so that compiling it
    can start while the next is generated.

    `check_finite`: the entry scans every step's results and stops at the first NaN or
    infinity, with every buffer updated in place restored (emit/finite_check.py); without it,
    the program is exactly the one it was before the option existed.
    """
    writes = [graph.nodes[i] for i in inplace]
    needed = graph.ancestors(list(outputs) + writes)
    _check_supported(needed)

    slots, locations = _slots(graph, needed, outputs, output_names, inplace, state_names)
    sources = graph.bound_sources()
    written = {sources[name].id: graph.nodes[node_id] for node_id, name in inplace.items()}   # source -> new value
    saved_slots = list(dict.fromkeys(locations[source_id][1] for source_id in written)) if check_finite else []
    steps = plan_steps(graph, list(outputs) + writes, {node_id: sources[name] for node_id, name in inplace.items()})
    inplace_sources = {node_id: sources[name].id for node_id, name in inplace.items()}
    _place_writes(graph, steps, outputs, inplace, sources, locations, inplace_sources)

    step_ids = {step.node.id for step in steps}
    output_steps, output_locations = [], {}
    for k, out in enumerate(outputs):
        slot = ("slot", next(i for i, s in enumerate(slots) if isinstance(s, rt.Output) and s.name == output_names[k]))
        if out.id in step_ids and out.id not in inplace and out.id not in output_locations:
            output_locations[out.id] = slot
        else:
            output_steps.append((copy_step(out, alias_root(out)), slot))
    locations.update(output_locations)

    ordered = schedule(steps, inplace_sources) + [step for step, _ in output_steps]
    step_out = [locations.get(step.node.id) for step in ordered[: len(steps)]] + [slot for _, slot in output_steps]

    modules = ProgramModules(graph.name, instructions_per_module, on_module)
    kernels = [None] * len(ordered)
    shares_code_with = list(range(len(ordered)))
    generated: dict[tuple, int] = {}
    for i in sorted(range(len(ordered)), key=lambda i: _generation_order(ordered[i])):
        first = generated.setdefault(kernel_key(ordered[i]), i)
        if first != i:      # a repeated layer: the same code, called with other buffers
            kernels[i], shares_code_with[i] = kernels[first], first
            continue
        kernels[i] = modules.add_kernel(_kernel_builder(i, ordered[i], max_threads), group=ordered[i].label)
    module = modules.entry_module()  # the last: the entry and the profiling clock go here
    memory = plan_memory(ordered, [k.scratch_floats * 4 for k in kernels], [loc is None for loc in step_out])

    checks = _finite_checks(ordered[:len(steps)], step_out, locations, memory, written) if check_finite else []
    backups, workspace_bytes = _backups(saved_slots, slots, memory.arena_bytes)
    workspace_index = len(slots)
    slots.append(rt.Workspace(max(workspace_bytes, 64)))
    calls_index = len(slots)
    slots.append(rt.State(CALLS_SLOT, (1,), "int64"))
    phase_steps = [i for i, kernel in enumerate(kernels) for _ in kernel.phases]
    profile_index = None
    if profile:
        profile_index = len(slots)
        slots.append(rt.State(PROFILE_SLOT, (len(phase_steps),), "int64"))
        emit_ticks_function(module)
    range_checks = [(position, math.prod(slot.shape), slot.dtype.itemsize * 8, *slot.valid_range)
                    for position, slot in enumerate(slots)
                    if isinstance(slot, rt.Input) and slot.range_checked_natively]
    status_index = None
    if range_checks or check_finite:
        status_index = len(slots)
        slots.append(rt.Status())
    entry = EntryBuilder(module, len(slots), workspace_index, profile_index, calls_slot=calls_index,
                         modules=modules)
    if range_checks:
        entry.refuse_out_of_range(status_index, range_checks)
    guard, checks_of_step = None, {}
    if check_finite:
        for check in checks:
            checks_of_step.setdefault(check.step, []).append(check)
        guard = FiniteGuard(entry, status_index, len(checks))
        guard.save([(entry.pointer(("slot", position)), entry.pointer(("arena", offset)), nbytes)
                    for position, offset, nbytes in backups])
    operand_locations = []
    for i, (step, kernel) in enumerate(zip(ordered, kernels)):
        entry.begin_step()
        out_location = step_out[i] if step_out[i] is not None else ("arena", memory.offset_of_value(step.node.id))
        in_locations = [_location_of(alias_root(o), locations, memory) for o in step.operands]
        operand_locations.append(in_locations)
        extra_out_locations = [("arena", memory.offset_of_value(node.id)) for node in step.extra_outputs]
        in_pointers = [entry.pointer(location) for location in in_locations + extra_out_locations]
        scratch_offset = memory.offset_of_scratch(i)
        scratch = entry.pointer(("arena", scratch_offset)) if scratch_offset is not None else None
        phases = [modules.callee(phase) for phase in kernel.phases]
        entry.call_phases(phases, entry.pointer(out_location), in_pointers, scratch)
        if guard is not None and checks_of_step.get(i):
            guard.check([(entry.pointer(check.location), check.node.size) for check in checks_of_step[i]])
    entry.finish()
    if guard is not None:
        guard.finish()      # after the last part: the stop block is the entry's
    return ProgramSpec(modules.finish(), slots, ordered, memory, max_threads, phase_steps, operand_locations,
                       checks, saved_slots, shares_code_with)


def _finite_checks(steps: list[Step], step_out: list, locations: dict, memory: MemoryPlan,
                   written: dict[int, Tensor]) -> list[FiniteCheck]:
    """The buffers to scan after each step (the output copies excepted: they compute nothing):
    its result, then the state its side writes updated, each float32 one of some elements."""
    checks = []
    for i, step in enumerate(steps):
        out_location = step_out[i] if step_out[i] is not None else ("arena", memory.offset_of_value(step.node.id))
        results = [(step.node, out_location)] + [(written[source.id], locations[source.id])
                                                 for source in step.side_writes]
        results += [(node, ("arena", memory.offset_of_value(node.id))) for node in step.extra_outputs]
        checks += [FiniteCheck(i, node, location) for node, location in results
                   if node.dtype == "float32" and node.size > 0]
    return checks


def _backups(saved_slots: list[int], slots: list, arena_bytes: int) -> tuple[list[tuple[int, int, int]], int]:
    """Where check_finite saves each slot the program overwrites: (slot position, workspace
    offset, bytes), after the arena; and the workspace's size."""
    backups, offset = [], _aligned(arena_bytes)
    for position in saved_slots:
        slot = slots[position]
        nbytes = math.prod(slot.shape) * slot.dtype.itemsize
        backups.append((position, offset, nbytes))
        offset += _aligned(nbytes)
    return backups, offset if backups else arena_bytes


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGNMENT) * ALIGNMENT


def _generation_order(step: Step) -> tuple:
    """Kernels are generated, and so placed into modules, by family, not in schedule order.

    A module holds one copy of each helper its kernels call (GEMM micro-kernels and packers,
    conv tiles): kernels of one family call the same helpers, and placed side by side they
    share one copy. The family is the label's leading word (every GEMM's label starts with
    "gemm", every convolution's with "conv2d"); within a family, kernels go by label. In
    schedule order, LeNet-5's forward and backward convolutions and its dense layers' GEMMs
    fell into different modules, each compiling its own copy of the helpers they share
    (bench/NOTES.md, "Compile time: program modules").
    """
    family = re.match(r"[a-z0-9]+", step.label)
    return (family.group(0) if family else step.label, step.label)


def _kernel_builder(index: int, step: Step, max_threads: int):
    def build(module):
        kernel = step.build(module, _kernel_name(index, step), max_threads)
        _keep_phases_apart(kernel)
        return kernel
    return build


def _keep_phases_apart(kernel) -> None:
    """Forbid inlining the phases into the entry, their only caller.

    Inlined, they would make the entry one function as large as the whole program, on which
    LLVM's function passes take longer than on the phases apart (bench/NOTES.md, "Compile
    time: IR and its functions"); one call per phase and step costs nothing measurable.
    """
    for phase in kernel.phases:
        phase.attributes.add("noinline")


def _place_writes(graph, steps: list[Step], outputs, inplace: dict[int, str], sources: dict, locations: dict,
                  inplace_sources: dict[int, int]) -> None:
    """Where each in-place write's value is computed into its source's memory:

    - by the step computing it (its result, or a side write), unless that step also reads
      the source at other positions than the one it writes (only an elementwise kernel reads
      each element before writing it);
    - by the kernel computing the value it views (a reshape of it), or the value its step
      would copy (`Step.forwards_operand`), when that value is a step's own result, not an
      output or another write, and that kernel does not read the source;
    - else by a copy step, scheduled as any other (after the readers of the source's old
      value, before the writers of what it copies), from the value's own buffer.

    Adds the copy steps to `steps`; updates `locations` and `inplace_sources` (which orders
    each writing step after the readers of the source's old value)."""
    step_of = {step.node.id: step for step in steps}
    side_written = {source.id for step in steps for source in step.side_writes}
    taken = {out.id for out in outputs} | set(inplace)

    def may_write(step: Step, source_id: int) -> bool:
        return step.node.op == "ew" or all(alias_root(t).id != source_id for t in step.operands)

    def write_directly(value, memory, source_id: int) -> bool:
        root = alias_root(value)
        if root.id not in step_of or root.id in taken or not may_write(step_of[root.id], source_id):
            return False
        locations[root.id], inplace_sources[root.id] = memory, source_id
        taken.add(root.id)
        return True

    for node_id, name in inplace.items():
        node, memory, source_id = graph.nodes[node_id], locations[sources[name].id], sources[name].id
        step = step_of.get(node_id)
        if step is not None and may_write(step, source_id) or step is None and source_id in side_written:
            locations[node_id] = memory
            if step is not None and step.forwards_operand is not None:
                write_directly(step.operands[step.forwards_operand], memory, source_id)
            continue
        del inplace_sources[node_id]        # the value is computed elsewhere, then copied
        if step is None and write_directly(node, memory, source_id):
            locations[node_id] = memory
            continue
        # A node standing for the copy's result, which no graph holds: it only carries the copy's
        # place in the schedule and its destination.
        copied = Tensor(graph, len(graph.nodes) + len(steps), "copy", (node,), {}, node.shape, node.dtype,
                        node.name, node.site, None)
        steps.append(copy_step(copied, alias_root(node)))
        locations[copied.id], inplace_sources[copied.id] = memory, source_id


def _slots(graph, needed, outputs, output_names, inplace, state_names):
    """The runtime slots (inputs, params, state, outputs) and where each source node lives."""
    needed_ids = {node.id for node in needed}
    updated = set(inplace.values())
    slots, locations = [], {}
    label_ranges = _label_ranges(needed)
    for name, node in graph.inputs.items():
        if node.id in needed_ids:
            locations[node.id] = ("slot", len(slots))
            valid_range = label_ranges.get(node.id)
            slots.append(rt.Input(name, node.shape, node.dtype, valid_range=valid_range,
                                  range_checked_natively=valid_range is not None and node.size > 0
                                  and np.dtype(node.dtype) in NATIVE_RANGE_CHECK_DTYPES))
    for name, node in graph.bound_sources().items():
        if node.id in needed_ids or name in updated:
            locations[node.id] = ("slot", len(slots))
            if name in state_names:
                slots.append(rt.State(name, node.shape, node.dtype))
            else:
                slots.append(rt.Param(name, node.shape, node.dtype, updated=name in updated))
    for name, out in zip(output_names, outputs):
        slots.append(rt.Output(name, out.shape, out.dtype))
    return slots, locations


def _label_ranges(nodes) -> dict[int, tuple[int, int]]:
    """Integer inputs a kernel indexes by (class ids) must lie in [0, classes): the runtime checks
    them before native code runs. Which ones, each kernel family's lowering rules say."""
    ranges: dict[int, tuple[int, int]] = {}
    for node in nodes:
        rule = LOWERINGS.get(node.op)
        if rule is None or rule.label_range is None:
            continue
        labels, classes = rule.label_range(node)
        if labels.op == "input":
            lo, hi = ranges.get(labels.id, (0, classes))
            ranges[labels.id] = (0, min(hi, classes))
    return ranges


def _location_of(node, locations, memory):
    if node.id in locations:
        return locations[node.id]
    if node.op == "constant":
        return ("constant", (f"graphc.const{node.id}", node.attrs["value"].array))
    offset = memory.offset_of_value(node.id)
    if offset is None:
        raise RuntimeError(f"internal error: no buffer for %{node.id} ({node.op})")
    return ("arena", offset)


def _kernel_name(index: int, step: Step) -> str:
    return f"k{index}.{re.sub(r'[^A-Za-z0-9_]', '_', step.label)}"


def _check_supported(nodes):
    for node in nodes:
        if node.dtype not in SUPPORTED_DTYPES:
            label = f" {node.name!r}" if node.name else ""
            raise NotImplementedError(
                f"native code supports float32 and int32 tensors; %{node.id} ({node.op}{label}, at {node.site}) is "
                f"{node.dtype}. {_dtype_advice(node.dtype)}")


def _dtype_advice(dtype: str) -> str:
    if dtype == "int64":
        # compiled functions convert int64 label arrays to an int32 input after a range check
        return 'Declare it with dtype="int32"; int64 arrays can still be fed to it.'
    return "Use gc.evaluate for float64."
