"""`gc.compile` and `gc.compile_training_step`: graphs to native programs.

    optimize (passes/) -> lower + schedule + plan memory + emit LLVM IR (assemble.py)
    -> machine code (llvm/parallel.py) -> a runtime Program (graphc_runtime)

With `check_finite` (or GRAPHC_CHECK_FINITE=1), the program is another one: its entry scans
every kernel's results and stops at the first NaN or infinity, its updates undone, and the
call raises FloatingPointError naming the node (finite_report.py).

A large program's IR is several modules, compiled on all cores while the next is still being
generated (llvm/parallel.py); its machine code is then several object files, loaded
together.

Compiled programs are cached on disk (program_cache.py), keyed by the graph before optimization:
a warm compile finds the entry and loads it, running no pass and generating no IR; the optimized
graph and the IR are made again only if someone asks to see them. The returned function runs the
whole program in one native call; Python only validates feeds and allocates outputs.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os
import warnings
from collections import Counter
from typing import Mapping

import numpy as np

import graphc_runtime as rt
from graphc.backend import step_state, thread_costs
from graphc.backend.assemble import CALLS_SLOT, ProgramSpec, assemble
from graphc.backend.call_values import CallValues
from graphc.backend.emit.entry import ENTRY_NAME
from graphc.backend.finite_report import stopped_error
from graphc.backend.llvm.parallel import ObjectCompiler, compile_modules, split_modules
from graphc.backend.llvm.program_modules import default_budget
from graphc.backend.program_cache import CachedProgram, pack_entry, program_key, unpack_entry
from graphc.core.errors import building_for, user_site
from graphc.core.ir import Tensor
from graphc.core.reference import checked_seed
from graphc_runtime.call_values import FunctionCalls, TrainingStepCalls

_cache: rt.ObjectCache | None = None
CHECK_FINITE_VARIABLE = "GRAPHC_CHECK_FINITE"


def object_cache() -> rt.ObjectCache:
    global _cache
    if _cache is None:
        _cache = rt.ObjectCache()
    return _cache


@dataclasses.dataclass
class Recipe:
    """Everything `assemble` needs to build a program again (for IR inspection or profiling)."""

    graph: object
    outputs: list
    assemble_args: dict           # outputs, in-place writes, state buffers, threads
    # How the program is split into modules (by the compile threads). The IR shown for a program
    # loaded from the cache is made again with this process's split: the same kernels, perhaps
    # in other modules.
    instructions_per_module: int | None = None

    def assemble(self, **overrides) -> ProgramSpec:
        return assemble(self.graph, self.outputs, **{
            **self.assemble_args, "instructions_per_module": self.instructions_per_module, **overrides})


class Plan:
    """How a program is made from its graph: the optimized graph and the recipe to assemble it.

    Made on demand: a program loaded from the cache needs neither to run, only to be shown
    (`graph`, `llvm_ir`, `describe()`) or profiled. `max_threads` is fixed when the program is
    compiled, so that the plan made later has the cached program's kernels.
    """

    def __init__(self, outputs, request: dict | None = None, max_threads: int | None = None, *,
                 check_finite: bool = False):
        # `outputs` may be a function giving (outputs, request): a training step loaded from the
        # cache builds its gradient graph only if someone asks to see it.
        self._source = outputs if request is None else (lambda: (outputs, request))
        self._max_threads = max_threads
        self.check_finite = check_finite   # the program checks every kernel's results (assemble.py)

    @functools.cached_property
    def _built(self) -> tuple[list, dict]:
        return self._source()

    @property
    def _outputs(self) -> list:
        return self._built[0]

    @property
    def source_outputs(self) -> list:
        return self._built[0]

    @property
    def _request(self) -> dict:
        return self._built[1]

    @functools.cached_property
    def optimized(self):
        from graphc.transforms import optimize
        return optimize(self._outputs)

    @property
    def max_threads(self) -> int:
        if self._max_threads is None:
            self._max_threads = self._thread_count()
        return self._max_threads

    def _thread_count(self) -> int:
        """The most threads worth using, by this host's measured costs (thread_costs.py)."""
        requested = self._request["threads"]
        if requested == 1:
            return 1
        from graphc.backend.lowering import plan_steps
        graph, outputs = self.optimized.graph, self.optimized.outputs
        sources = graph.bound_sources()
        inplace = {node_id: sources[name] for node_id, name in self._inplace_ids().items()}
        steps = plan_steps(graph, outputs, inplace)
        return thread_costs.choose_thread_count(sum(step.flops for step in steps), len(steps), requested,
                                   self._request["thread_costs"])

    def _inplace_ids(self) -> dict[int, str]:
        """Optimized node id -> the param or state it is written over (its own value excepted)."""
        outputs = self.optimized.outputs
        write_nodes = outputs[len(self._request["output_names"]):]
        return {node.id: name for node, name in zip(write_nodes, self._request["inplace"])
                if not (node.op == "param" and node.name == name)}

    @functools.cached_property
    def recipe(self) -> Recipe:
        graph, outputs = self.optimized.graph, self.optimized.outputs
        output_names = self._request["output_names"]
        args = dict(output_names=output_names, inplace=self._inplace_ids(),
                    state_names=set(self._request["state_names"]), max_threads=self.max_threads)
        if self.check_finite:   # only then: the program without checks is assembled as it always was
            args["check_finite"] = True
        return Recipe(graph, outputs[:len(output_names)], args, instructions_per_module=default_budget())

    @functools.cached_property
    def spec(self) -> ProgramSpec:
        # Generated on demand: a program loaded from the cache never needed its IR.
        return self.recipe.assemble()


class CompiledFunction(FunctionCalls):
    """A compiled graph: call it with the graph's inputs as keyword arguments.

    `graph` is the optimized graph it runs, `optimization` what each pass did, `llvm_ir` the
    LLVM IR of the program (its modules one after the other, each from its `; ModuleID` line;
    the entry is in the last), `describe()` its kernels and memory plan, `profile(**feeds)` the
    time of each kernel. All of these are made on first use, not by a compile that loaded the
    program from the disk cache.
    """

    def __init__(self, program: rt.Program, plan: Plan, single: bool, call_values: CallValues):
        self._program = program
        self._plan = plan
        self._single = single
        self._call_values = call_values

    @property
    def optimization(self):
        return self._plan.optimized

    @property
    def source_outputs(self) -> list:
        """The outputs before optimization (a training step's loss, then its in-place writes),
        in the graph the compiler differentiated: what reports draw as the forward and backward graphs."""
        return list(self._plan.source_outputs)

    @property
    def graph(self):
        return self._plan.optimized.graph

    @property
    def recipe(self) -> Recipe:
        return self._plan.recipe

    @property
    def outputs(self) -> list:
        return self._plan.recipe.outputs

    @property
    def _spec(self) -> ProgramSpec:
        return self._plan.spec

    @property
    def check_finite(self) -> bool:
        """Whether every call checks each kernel's results for NaN and infinities (see `compile`)."""
        return self._plan.check_finite

    @property
    def llvm_ir(self) -> str:
        return self._spec.llvm_ir

    @property
    def steps(self):
        return self._spec.steps

    @property
    def memory(self):
        return self._spec.memory

    @property
    def shares_code_with(self) -> list[int]:
        """For each step, the step whose kernel it calls (itself, or an earlier, identical one)."""
        return self._spec.shares_code_with

    @property
    def params(self):
        """The arrays bound as params (the caller's own arrays, as now in the `params` it was
        compiled with: an array put there after compiling is bound at the next call)."""
        return self._program.params

    def save(self, path) -> None:
        """Write this function or step, with its params and state, to `path`: an artifact that
        `graphc_runtime.load(path)` runs without the compiler (graphc/backend/artifact.py)."""
        from graphc.backend.artifact import save
        save(path, program=self._program, values=self._call_values, single_output=self._single,
             kind="training step" if isinstance(self, CompiledTrainingStep) else "function",
             source_outputs=self.source_outputs,     # builds a cached step's gradient graph if not yet built
             check_finite=self.check_finite)

    def describe(self) -> str:
        """The kernels in execution order, what each computes, and the memory plan."""
        spec = self._spec
        lines = [f"{len(spec.steps)} kernels, arena {spec.memory.arena_bytes / 1024:.1f} KiB "
                 f"(peak live set {spec.memory.peak_live_bytes / 1024:.1f} KiB), up to {spec.max_threads} threads"]
        if self.check_finite:
            saved = sum(math.prod(spec.slots[position].shape) * spec.slots[position].dtype.itemsize
                        for position in spec.saved_slots)
            lines.append(f"check_finite: {len(spec.checks)} results scanned after their kernels; "
                         f"{len(spec.saved_slots)} updated buffers ({saved / 1024:.1f} KiB) saved before the first")
        for i, step in enumerate(spec.steps):
            covered = ", ".join(f"%{n.id}" for n in step.covers)
            lines.append(f"  k{i:<3} {step.label:<24} -> %{step.node.id:<5} {step.node.shape}  covers {covered}")
        return "\n".join(lines)

    def profile(self, feeds: Mapping[str, object] | None = None, /, *, repeats: int = 20, **keyword_feeds):
        """Time each kernel (see graphc.profile); params are copied, so nothing is updated.

        Feeds are keywords, or a dict for inputs named like the keyword `repeats`."""
        if feeds is not None and not isinstance(feeds, Mapping):
            raise TypeError(f"profile: feeds are keywords or a dict, got {type(feeds).__name__}; "
                            f"the number of calls is the keyword repeats (repeats=20)")
        if isinstance(repeats, bool) or not isinstance(repeats, numbers.Integral):
            raise TypeError(f"profile: repeats must be an int, got {type(repeats).__name__}; to feed an input "
                            f"named 'repeats', pass the feeds as a dict: fn.profile({{'repeats': ...}}, repeats=20)")
        from graphc.backend.profile import profile
        return profile(self, {**(feeds or {}), **keyword_feeds}, int(repeats))


class CompiledTrainingStep(TrainingStepCalls, CompiledFunction):
    """One native call: forward, backward and the optimizer's update. Returns the loss (a float)
    and updates the bound param and buffer arrays in place."""

    def __init__(self, program: rt.Program, plan: Plan, single: bool, call_values: CallValues):
        super().__init__(program, plan, single, call_values)
        if program.keyword_call_scalar is not None and not call_values.per_call:
            # A class of its own whose __call__ is the program's: step(x=..., y=...) binds the
            # arrays straight to its parameters, without the method below's frame and dict of
            # keywords (see runtime/program.py's _keyword_call_scalar).
            self.__class__ = type(type(self).__name__, (type(self),), {
                "__call__": program.keyword_call_scalar, "__module__": type(self).__module__,
                "__qualname__": type(self).__qualname__})

    def state_dict(self) -> dict[str, np.ndarray]:
        """Everything a resumed run needs to continue bit for bit, as float32 arrays by name
        (for `gc.save_params`): the params and buffers, the optimizer's state under
        "optimizer:<name>", the call and step counts and dropout's seed (see step_state.py)."""
        with self._call_values.lock:
            return step_state.state_dict(self.params, self.state, self._call_values)

    def load_state_dict(self, values: Mapping[str, np.ndarray]) -> None:
        """Restore what `state_dict` gave (e.g. `gc.load_params(path)`): every name must match.
        Everything is checked before anything is written."""
        with self._call_values.lock:
            step_state.load_state_dict(values, self._program, self.state, self._call_values)


def compile(outputs, params: Mapping[str, np.ndarray], seed: int = 0,  # noqa: A001
            check_finite: bool | None = None) -> CompiledFunction:
    """Native code computing `outputs` (a Tensor or a list of them) from the graph's inputs.

    The arrays of `params` are bound without copy: later calls see their current values. Buffers
    the outputs' ops update (batch norm's running statistics) are updated in place at every
    call. Random masks (dropout) are drawn from `seed`: call 0's masks first, new ones at every
    call.

    `check_finite=True` compiles a program that checks every kernel's results: the first NaN
    or infinity raises FloatingPointError naming the node, its kernel, the user's line and the
    value ranges of what the kernel read, with nothing updated (buffers keep their values,
    the call is not counted). None (the default) means False unless the environment variable
    GRAPHC_CHECK_FINITE=1 was set when compiling; an explicit False is never overridden.
    """
    single = isinstance(outputs, Tensor)
    outputs = [outputs] if single else list(outputs)
    if not outputs:
        raise ValueError("compile: no outputs given")
    for out in outputs:
        if not isinstance(out, Tensor):
            raise TypeError(f"compile: outputs must be graphc Tensors, got {type(out).__name__}")
    seed = checked_seed(seed, "compile")
    check_finite = _check_finite_wanted(check_finite, "compile")
    graph = outputs[0].graph
    updates = graph.buffer_updates_for(outputs)
    writes = [update.value for update in updates]
    _check_params(outputs + writes, params)
    names = _unclaimed_names(graph, [f"output{i}" for i in range(len(outputs))])
    return _build(CompiledFunction, outputs + writes, params, output_names=names, single=single,
                  inplace=[update.buffer.name for update in updates], seed=seed, check_finite=check_finite)


def compile_training_step(loss: Tensor, params: Mapping[str, np.ndarray], optimizer,
                          seed: int = 0, check_finite: bool | None = None, *, comm=None,
                          bucket_bytes: int | None = None, allreduce: str = "auto") -> CompiledTrainingStep:
    """Native code for one training step of `loss` w.r.t. every param in `params` it depends on.

    The gradient graph and the updates are built on a copy of the loss's graph: the user's
    graph is left as it was. Buffers are updated by their ops, never by the optimizer; dropout
    masks are drawn from `seed`, new ones at every call.

    A step compiled before (same forward graph, params, optimizer and threads) is found in the
    disk cache by its forward graph alone: the gradient graph is built only if someone asks to
    see it.

    `check_finite`: as for `compile`. A step that meets a NaN or infinity raises
    FloatingPointError before its update takes effect: params, buffers and the optimizer's
    state keep their values, and neither the call count (dropout's masks) nor Adam's step
    count advances.

    `comm` (an mpi4py communicator) makes a data-parallel step: every rank compiles the same
    step for its shard of the global batch, and the step averages the loss, the gradients and
    the buffers' new values over the ranks before the update, summing each bucket of about
    `bucket_bytes` as soon as the backward has computed it (see graphc/distributed/).
    `allreduce` says how: "shared", in memory the ranks share, MPI only synchronizing them
    (every rank must run on one node); "mpi", with MPI_Iallreduce; "auto" (the default),
    shared where every rank runs on one node. Compiling is collective: the ranks check that
    they compiled the same program from the same params, and raise ValueError on every rank
    if not. Each rank uses its share of its node's cores. Run it under
    `mpiexec -n N python -m mpi4py script.py`, so that an exception on one rank aborts them all.
    """
    from graphc.core.optim import Optimizer

    if not isinstance(loss, Tensor) or loss.size != 1:
        raise ValueError(f"compile_training_step: the loss must be a scalar Tensor, got {loss!r}")
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"compile_training_step: expected an optimizer such as gc.SGD or gc.Adam, got {optimizer!r}")
    seed = checked_seed(seed, "compile_training_step")
    data_parallel = None
    if comm is not None:
        from graphc.distributed.data_parallel import DataParallel
        data_parallel = DataParallel.of(comm, bucket_bytes, "compile_training_step", allreduce)
        check_finite = _without_finite_checks(check_finite)
    elif bucket_bytes is not None:
        raise ValueError("compile_training_step: bucket_bytes sizes the all-reduces of a step compiled with comm=")
    elif allreduce != "auto":
        raise ValueError("compile_training_step: allreduce chooses how a step compiled with comm= averages; "
                         "there is no comm")
    else:
        check_finite = _check_finite_wanted(check_finite, "compile_training_step")
    buffer_updates = loss.graph.buffer_updates_for([loss])
    forward_outputs = [loss] + [update.value for update in buffer_updates]
    _check_params(forward_outputs, params, "compile_training_step")
    used = {node.id for node in loss.graph.ancestors([loss])}
    trainable = [name for name in params if name in loss.graph.params and loss.graph.params[name].id in used]
    averaged = 1 + len(buffer_updates) + len(trainable)   # with comm: the loss, buffers and gradients

    site = user_site()

    def training_graph() -> _TrainingGraph:
        with building_for(site):     # also when built later, for a step loaded from the cache
            return _training_graph(loss, buffer_updates, trainable, optimizer, data_parallel)

    threads = rt.get_num_threads() if data_parallel is None else data_parallel.threads
    optimizer_key = _optimizer_key(optimizer)
    if optimizer_key is None:    # an optimizer we cannot describe exactly: keyed by its update graph
        built = training_graph()
        if data_parallel is not None:   # keyed by its class: its repr may hold an address
            request = dict(optimizer=f"{type(optimizer).__module__}.{type(optimizer).__qualname__}")
            data_parallel.check_same_program("compile_training_step", program_key(built.graph, built.outputs, request),
                                             request, loss, params)
        return _build(CompiledTrainingStep, built.outputs, params, output_names=built.output_names,
                      inplace=built.inplace, state_names=built.state_names, state_names_for_caller=built.renames,
                      seed=seed, optimizer=optimizer, hyper_slots=built.hyper_slots, check_finite=check_finite,
                      threads=threads, binding=_comm_binding(data_parallel, built.comm_slot, averaged))
    step_request = dict(kind="training step", trainable=trainable, optimizer=optimizer_key,
                        buffers=[update.buffer.name for update in buffer_updates],
                        **(data_parallel.request() if data_parallel is not None else {}),
                        **_check_finite_request(check_finite))
    if data_parallel is not None:   # the threads may differ between ranks: not part of the hash
        program_hash = program_key(loss.graph, forward_outputs, step_request)
        data_parallel.check_same_program("compile_training_step", program_hash, step_request, loss, params)
    step_request.update(_thread_request(threads))
    cache = object_cache()
    step_key = program_key(loss.graph, forward_outputs, step_request)
    compiled, library = _load(cache, step_key)
    made = _step_names(compiled, optimizer, data_parallel is not None) if compiled is not None else None
    if made is not None:
        plan = Plan(lambda: training_graph().outputs_and_request(threads, check_finite),
                    max_threads=compiled.max_threads, check_finite=check_finite)
        return _bound(CompiledTrainingStep, compiled, library, plan, params, loss.graph,
                      single=False, seed=seed, optimizer=optimizer, renames=made["renames"],
                      hyper_slots=made["hyper_slots"], random_key=made["random_key"], check_finite=check_finite,
                      binding=_comm_binding(data_parallel, made.get("comm_slot"), averaged))
    built = training_graph()
    extras = {"step": {"renames": built.renames, "hyper_slots": built.hyper_slots,
                       "random_key": built.graph.random_key.name if built.graph.random_key is not None else None,
                       **({"comm_slot": built.comm_slot} if built.comm_slot is not None else {})}}
    return _build(CompiledTrainingStep, built.outputs, params, output_names=built.output_names,
                  inplace=built.inplace, state_names=built.state_names, state_names_for_caller=built.renames,
                  seed=seed, optimizer=optimizer, hyper_slots=built.hyper_slots, missed_key=step_key, extras=extras,
                  check_finite=check_finite, threads=threads,
                  binding=_comm_binding(data_parallel, built.comm_slot, averaged))


def _without_finite_checks(check_finite) -> bool:
    """check_finite for a data-parallel step: refused, for a rank that stopped at a NaN would leave
    the others waiting for its gradients; off, with a warning, when only the environment asks."""
    if not _check_finite_wanted(check_finite, "compile_training_step"):
        return False
    if check_finite is None:
        warnings.warn(f"{CHECK_FINITE_VARIABLE} is set, but a step compiled with comm= has no finite checks: a "
                      f"rank stopping at a NaN would leave the other ranks waiting", RuntimeWarning, stacklevel=3)
        return False
    raise ValueError("compile_training_step: check_finite=True cannot be combined with comm=: a rank stopping "
                     "at a NaN would leave the other ranks waiting for its gradients")


def _comm_binding(data_parallel, name: str | None, values: int):
    """For `_bound`, a data-parallel step's binding (DataParallel.bind, given the program's
    slots); None for another step."""
    if data_parallel is None:
        return None
    return lambda slots: data_parallel.bind(name, values, slots)


def _optimizer_key(optimizer) -> str | None:
    """What of the optimizer its compiled update depends on, exactly: its class and every field
    but the learning rate (a slot set at run time); None for one that is not a dataclass."""
    if not dataclasses.is_dataclass(optimizer):
        return None
    fields = {field.name: getattr(optimizer, field.name) for field in dataclasses.fields(optimizer) if field.name != "lr"}
    return f"{type(optimizer).__module__}.{type(optimizer).__qualname__}{sorted(fields.items())!r}"


def _step_names(compiled: CachedProgram, optimizer, data_parallel: bool = False) -> dict | None:
    """A cached training step's state names (see compile_training_step), if the entry has them
    and they name its own State slots; else None, and the step is compiled afresh."""
    made = compiled.extras.get("step")
    if not isinstance(made, dict):
        return None
    if not all(isinstance(made.get(field), dict) and all(isinstance(k, str) and isinstance(v, str)
                                                         for k, v in made[field].items())
               for field in ("renames", "hyper_slots")):
        return None
    key = made.get("random_key")
    states = {slot.name for slot in compiled.slots if isinstance(slot, rt.State)}
    named = set(made["hyper_slots"].values()) | ({key} if key is not None else set())
    if (key is not None and not isinstance(key, str)) or not named <= states or not set(made["renames"]) <= states:
        return None
    if set(made["hyper_slots"]) != set(optimizer.hyper_values(optimizer.lr, 1)):
        return None
    if data_parallel and made.get("comm_slot") not in states:
        return None
    return made


def _thread_request(threads: int) -> dict:
    """The threads asked for and this host's costs, which decide a program's thread count."""
    return dict(threads=threads, thread_costs=thread_costs.measured_thread_costs(threads) if threads > 1 else None)


@dataclasses.dataclass
class _TrainingGraph:
    """The graph a training step runs: loss, then each in-place write (params' and optimizer
    state's new values, buffers'), with what the compiler needs to know of its names."""

    graph: object
    outputs: list
    output_names: list
    inplace: list
    state_names: list
    renames: dict         # graph name of a state buffer -> the name step.state shows
    hyper_slots: dict     # hyperparameter -> its slot's graph name
    comm_slot: str | None = None    # a data-parallel step's communicator slot (its graph name)

    def outputs_and_request(self, threads: int, check_finite: bool) -> tuple[list, dict]:
        return self.outputs, _request(self.graph, self.output_names, self.inplace, self.state_names, threads,
                                      check_finite)


def _training_graph(loss, buffer_updates, trainable_names, optimizer, data_parallel=None) -> _TrainingGraph:
    from graphc.core.autodiff import grad
    from graphc.transforms.rebuild import rebuild

    graph, (train_loss, *buffer_values) = rebuild(loss.graph, [loss] + [update.value for update in buffer_updates])
    trainable = [graph.params[name] for name in trainable_names]
    if data_parallel is not None:
        from graphc.distributed.buckets import declare_comm_slot
        comm = declare_comm_slot(graph, _unclaimed_names(graph, ["mpi:comm"])[0],
                                 1 + len(buffer_values) + len(trainable), data_parallel.shared)
    grads = grad(train_loss, trainable)
    if data_parallel is not None:
        # The loss, the buffers' new values and the gradients, averaged over the ranks.
        from graphc.distributed.buckets import averaged_values
        graph, (train_loss, *averages) = averaged_values(
            graph, [train_loss, *buffer_values, *grads], comm, abi=dataclasses.astuple(data_parallel.abi),
            bucket_bytes=data_parallel.bucket_bytes, shared=data_parallel.shared)
        buffer_values, grads = averages[:len(buffer_values)], averages[len(buffer_values):]
        trainable = [graph.params[name] for name in trainable_names]
    optimizer_graph = _OptimizerGraph(graph)
    writes, state_names = optimizer.updates(optimizer_graph, trainable, grads, hyper=optimizer_graph.hyper)
    writes += [(update.buffer.name, value) for update, value in zip(buffer_updates, buffer_values)]
    comm_slot = [comm.name] if data_parallel is not None else []
    if data_parallel is not None and data_parallel.shared:
        writes, shared_states = _with_shared_buckets(graph, comm.name, train_loss, writes, data_parallel)
        comm_slot += shared_states
    return _TrainingGraph(graph, [train_loss] + [value for _, value in writes], _unclaimed_names(graph, ["loss"]),
                          [name for name, _ in writes],
                          list(state_names) + list(optimizer_graph.hyper_names.values()) + comm_slot,
                          optimizer_graph.names_for_caller(), dict(optimizer_graph.hyper_names),
                          comm_slot[0] if comm_slot else None)


def _with_shared_buckets(graph, comm_name: str, train_loss, writes: list, data_parallel) -> tuple[list, list[str]]:
    """A shared-memory step's writes: the step's own, each bucket into its State, and the
    finish barrier's token after every value computed from the buckets (the loss and each
    write no other write reads; those others are computed in the same kernels). Also the
    State names they add."""
    from graphc.core.ops.collective import allreduce_finish
    from graphc.distributed.buckets import FINISHED_STATE, shared_writes
    buckets = shared_writes(graph)
    read_by_writes = {operand.id for _, value in writes for operand in value.inputs}
    results = [train_loss] + [value for _, value in writes if value.id not in read_by_writes]
    token_name = _unclaimed_names(graph, [FINISHED_STATE])[0]
    graph.param(token_name, (1,), "int32")
    token = allreduce_finish(graph.params[comm_name], results, abi=dataclasses.astuple(data_parallel.abi))
    return writes + buckets + [(token_name, token)], [name for name, _ in buckets] + [token_name]


class _OptimizerGraph:
    """The step's graph as the optimizer sees it, to declare its state buffers as params.

    A buffer whose name the graph already has gets a graph name of its own (SGD names the
    momentum buffer of param 'w' "momentum:w", and a user may have named a param so); its
    State slot keeps the name asked for, since the runtime keeps state names apart from the
    names of inputs and params (see `names_for_caller`).
    """

    def __init__(self, graph):
        self._graph = graph
        self._asked_for: dict[str, str] = {}     # graph name -> name the optimizer asked for
        self.hyper_names: dict[str, str] = {}    # hyperparameter -> its slot's graph name
        self._hyper_nodes: dict[str, Tensor] = {}

    def param(self, name, *args, **kwargs):
        graph_name = _unclaimed_names(self._graph, [name])[0]
        node = self._graph.param(graph_name, *args, **kwargs)
        self._asked_for[graph_name] = name
        return node

    def hyper(self, name: str):
        """The (1,)-shaped slot of hyperparameter `name`, written before calls (call_values.py)."""
        if name not in self.hyper_names:
            node = self.param(f"optim:{name}", (1,))
            self.hyper_names[name] = node.name
            self._hyper_nodes[name] = node
        return self._hyper_nodes[name]

    def __getattr__(self, attribute):
        return getattr(self._graph, attribute)

    def names_for_caller(self) -> dict[str, str]:
        """Graph name -> the name asked for, of each renamed buffer whose asked-for name no
        other buffer asked for (step.state is keyed by these)."""
        asked = Counter(self._asked_for.values())
        return {graph_name: name for graph_name, name in self._asked_for.items()
                if graph_name != name and asked[name] == 1}


def _unclaimed_names(graph, names: list[str]) -> list[str]:
    """Each of `names`, or if the graph has an input or param of that name, the first of
    name#1, name#2, ... it has not: the compiler's own names never take a user's."""
    def unclaimed(name):
        candidate, k = name, 0
        while graph.has_name(candidate):
            k += 1
            candidate = f"{name}#{k}"
        return candidate
    return [unclaimed(name) for name in names]


def _build(cls, outputs, params, *, output_names, single=False, inplace=(), state_names=(),
           state_names_for_caller=None, seed=0, optimizer=None, hyper_slots=None, missed_key=None, extras=None,
           check_finite=False, threads=None, binding=None):
    """Load the program from the cache or optimize, assemble and compile it; bind params.

    The first len(output_names) outputs are returned to the caller; each further one is written
    in place into the param (or state buffer) named by the matching entry of `inplace`.
    `state_names_for_caller` renames State slots (graph name -> the name step.state shows).
    `missed_key`: the caller's own cache key, already looked up and missed; the program is
    stored under it (with `extras`) instead of under the key of `outputs`' graph. `threads`:
    the most the program may use (default gc.get_num_threads()); `binding`: see `_bound`.
    """
    graph = outputs[0].graph
    random_key = graph.random_key.name if graph.random_key is not None else None
    threads = rt.get_num_threads() if threads is None else threads
    request = _request(graph, output_names, inplace, state_names, threads, check_finite)
    cache = object_cache()
    key = missed_key or program_key(outputs[0].graph, outputs, request)
    compiled, library = _load(cache, key) if missed_key is None else (None, None)
    if compiled is None:
        plan = Plan(outputs, request, check_finite=check_finite)
        compiled = dataclasses.replace(compile_recipe(plan.recipe), extras=extras or {})
        cache.put(key, pack_entry(compiled))
        library = rt.NativeLibrary(compiled.objects)
    else:
        plan = Plan(outputs, request, compiled.max_threads, check_finite=check_finite)
    return _bound(cls, compiled, library, plan, params, graph, single=single, seed=seed, optimizer=optimizer,
                  renames=state_names_for_caller or {}, hyper_slots=hyper_slots or {}, random_key=random_key,
                  check_finite=check_finite, binding=binding)


def _request(graph, output_names, inplace, state_names, threads: int, check_finite: bool = False) -> dict:
    """What is asked of a program besides its graph: part of its cache key and of its plan."""
    random_key = [graph.random_key.name] if graph.random_key is not None else []
    # The costs decide the program's thread count, so they are part of its cache key.
    return dict(output_names=list(output_names), inplace=list(inplace),
                state_names=sorted(list(state_names) + random_key), **_thread_request(threads),
                **_check_finite_request(check_finite))


def _check_finite_request(check_finite: bool) -> dict:
    # Asked for only when on: a program without checks keeps the key it always had.
    return {"check_finite": True} if check_finite else {}


def _check_finite_wanted(check_finite, where: str) -> bool:
    """The check_finite argument, or for None the environment's GRAPHC_CHECK_FINITE (read at
    every compile: a program's checks are fixed when it is compiled)."""
    if check_finite is not None:
        if not isinstance(check_finite, (bool, np.bool_)):
            raise TypeError(f"{where}: check_finite must be True, False or None, got {check_finite!r}")
        return bool(check_finite)
    text = os.environ.get(CHECK_FINITE_VARIABLE, "").strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text not in ("", "0", "false", "no", "off"):
        warnings.warn(f"{CHECK_FINITE_VARIABLE}={text!r} is neither 1 nor 0; compiling without finite checks",
                      RuntimeWarning, stacklevel=3)
    return False


def _bound(cls, compiled: CachedProgram, library, plan: Plan, params, graph, *, single, seed, optimizer,
           renames: dict, hyper_slots: dict, random_key: str | None, check_finite: bool,
           binding=None):
    """The compiled function or step running `compiled` with `params` bound. `binding`, given
    the slots, returns a data-parallel step's (distributed/data_parallel.Binding)."""
    from graphc.distributed.data_parallel import Binding
    slots = _renamed_state_slots(compiled.slots, renames)
    bound = binding(slots) if binding is not None else Binding({})
    # The error names nodes and kernels: made from the plan, which a cached program builds then.
    on_stop = (lambda status, memory: stopped_error(plan.spec, status, memory)) if check_finite else None
    program = rt.Program(library, ENTRY_NAME, slots, params, max_threads=compiled.max_threads,
                         ignored_inputs=graph.inputs, on_stop=on_stop, state_memory=bound.state_memory)
    program.memory_owner = bound.memory_owner      # kept while the program lives
    call_values = CallValues(program.state, CALLS_SLOT, seed=seed, random_key_slot=random_key, optimizer=optimizer,
                             hyper_slots={name: renames.get(slot, slot) for name, slot in hyper_slots.items()},
                             fixed_state=bound.fixed_state, hidden_state=bound.hidden)
    return cls(program, plan, single, call_values)


def _renamed_state_slots(slots, names: dict[str, str]) -> list:
    return [dataclasses.replace(slot, name=names[slot.name]) if isinstance(slot, rt.State) and slot.name in names
            else slot for slot in slots]


def _load(cache: rt.ObjectCache, key: str) -> tuple[CachedProgram | None, rt.NativeLibrary | None]:
    """The cached program under `key` and its loaded code, or (None, None): an entry of another
    format, or one whose objects the loader refuses, is rebuilt."""
    blob = cache.get(key)
    if blob is None:
        return None, None
    try:
        compiled = unpack_entry(blob)
        return compiled, rt.NativeLibrary(compiled.objects)
    except (ValueError, KeyError, TypeError):
        return None, None


def compile_recipe(recipe: Recipe) -> CachedProgram:
    with ObjectCompiler() as compiler:
        # Each module compiles in the background as soon as assemble has finished it.
        spec = recipe.assemble(on_module=compiler.submit)
        objects = compiler.objects()
    return CachedProgram(objects, spec.slots, recipe.assemble_args["max_threads"])


def object_code(llvm_ir: str) -> list[bytes]:
    """Machine code for a program's LLVM IR text, one object per module, for `rt.NativeLibrary`
    (not cached: callers cache whole programs)."""
    return compile_modules(split_modules(llvm_ir))


def _check_params(outputs, params, where: str = "compile"):
    graph = outputs[0].graph
    missing = [node.name for node in graph.ancestors(outputs)
               if node.op == "param" and node is not graph.random_key and node.name not in params]
    if missing:
        raise ValueError(f"{where}: the outputs depend on params or buffers {missing}, which are not in `params`")
