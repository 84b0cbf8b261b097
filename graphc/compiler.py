"""`gc.compile` and `gc.compile_training_step`: graphs to native programs.

    optimize (passes/) -> lower + schedule + plan memory + emit LLVM IR (assemble.py)
    -> machine code (codegen/target.py, cached on disk by graphc_runtime) -> a runtime Program.

The returned function runs the whole program in one native call; Python only validates feeds
and allocates outputs.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import llvmlite
import numpy as np

import graphc_runtime as rt

from . import __version__
from .assemble import ProgramSpec, assemble
from .codegen.entry import ENTRY_NAME
from .codegen.target import compile_to_object, target_fingerprint
from .ir import Tensor

# Below this much work per call, fork/join across threads costs more than it saves.
MIN_FLOPS_FOR_THREADS = 2_000_000

_cache: rt.ObjectCache | None = None


def object_cache() -> rt.ObjectCache:
    global _cache
    if _cache is None:
        _cache = rt.ObjectCache()
    return _cache


class CompiledFunction:
    """A compiled graph: call it with the graph's inputs as keyword arguments.

    `graph` is the optimized graph it runs; `llvm_ir` the LLVM IR it was built from; `steps`
    the kernels in execution order.
    """

    def __init__(self, program: rt.Program, spec: ProgramSpec, optimized, outputs, single: bool, recipe):
        self._program = program
        self._spec = spec
        self.recipe = recipe               # how to assemble this program again (e.g. for profiling)
        self.optimization = optimized      # what each pass did (passes.OptimizeResult)
        self.graph = optimized.graph
        self.outputs = outputs
        self._single = single

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
    def num_threads(self) -> int:
        return self._program.num_threads

    @property
    def params(self):
        """The arrays bound as params (the caller's own arrays)."""
        return self._program.params

    def profile(self, repeats: int = 20, **feeds):
        """Time each kernel (see graphc.profile); params are copied, so nothing is updated."""
        from .profile import profile
        return profile(self, feeds, repeats)

    def __call__(self, **feeds):
        results = self._program(**feeds)
        return results[0] if self._single else results

    def describe(self) -> str:
        """The kernels in execution order, what each computes, and the memory plan."""
        lines = [f"{len(self.steps)} kernels, arena {self.memory.arena_bytes / 1024:.1f} KiB "
                 f"(peak live set {self.memory.peak_live_bytes / 1024:.1f} KiB), up to {self._spec.max_threads} threads"]
        for i, step in enumerate(self.steps):
            covered = ", ".join(f"%{n.id}" for n in step.covers)
            lines.append(f"  k{i:<3} {step.label:<24} -> %{step.node.id:<5} {step.node.shape}  covers {covered}")
        return "\n".join(lines)


def compile(outputs, params: Mapping[str, np.ndarray]) -> CompiledFunction:  # noqa: A001 (the API's name)
    """Native code computing `outputs` (a Tensor or a list of them) from the graph's inputs.

    The arrays of `params` are bound without copy: later calls see their current values.
    """
    single = isinstance(outputs, Tensor)
    outputs = [outputs] if single else list(outputs)
    if not outputs:
        raise ValueError("compile: no outputs given")
    for out in outputs:
        if not isinstance(out, Tensor):
            raise TypeError(f"compile: outputs must be graphc Tensors, got {type(out).__name__}")
    _check_params(outputs, params)
    names = [_output_name(out, i) for i, out in enumerate(outputs)]
    return build(CompiledFunction, outputs, params, output_names=names, single=single)


def build(cls, outputs, params, *, output_names, single=False, inplace=(), state_names=()):
    """Optimize, lower, compile (or load from the cache) and bind: the common path of both APIs.

    The first len(output_names) outputs are returned to the caller; each further one is written
    in place into the param (or state buffer) named by the matching entry of `inplace`.
    """
    from .passes import optimize

    optimized = optimize(outputs)
    graph, new_outputs = optimized.graph, optimized.outputs
    n_user = len(output_names)
    user_outputs, write_nodes = new_outputs[:n_user], new_outputs[n_user:]
    inplace_ids = {node.id: name for node, name in zip(write_nodes, inplace)
                   if not (node.op == "param" and node.name == name)}
    work = _estimate_flops(graph, new_outputs)
    threads = rt.get_num_threads() if work >= MIN_FLOPS_FOR_THREADS else 1
    recipe = Recipe(graph, user_outputs, dict(output_names=output_names, inplace=inplace_ids,
                                              state_names=set(state_names), max_threads=threads))
    spec = assemble(recipe.graph, recipe.outputs, **recipe.assemble_args)
    library = rt.NativeLibrary(object_code(spec.llvm_ir))
    program = rt.Program(library, ENTRY_NAME, spec.slots, params, max_threads=threads)
    return cls(program, spec, optimized, user_outputs, single, recipe)


@dataclasses.dataclass
class Recipe:
    graph: object
    outputs: list
    assemble_args: dict


def object_code(llvm_ir: str) -> bytes:
    """Machine code for `llvm_ir`, from the disk cache when this exact IR was compiled before."""
    cache = object_cache()
    key = rt.make_key(llvm_ir, target_fingerprint(), llvmlite.__version__, __version__)
    obj = cache.get(key)
    if obj is None:
        obj = compile_to_object(llvm_ir)
        cache.put(key, obj)
    return obj


def _estimate_flops(graph, outputs) -> int:
    from .lowering import plan_steps
    return sum(step.flops for step in plan_steps(graph, outputs))


def _output_name(tensor: Tensor, index: int) -> str:
    return f"output{index}"


def _check_params(outputs, params):
    graph = outputs[0].graph
    missing = [node.name for node in graph.ancestors(outputs) if node.op == "param" and node.name not in params]
    if missing:
        raise ValueError(f"compile: the outputs depend on params {missing}, which are not in `params`")


class CompiledTrainingStep(CompiledFunction):
    """One native call: forward, backward and the optimizer's update. Returns the loss (a float)
    and updates the bound param arrays in place."""

    def __call__(self, **feeds) -> float:
        return float(self._program(**feeds)[0])

    def reset_state(self) -> None:
        """Zero the optimizer's state (momentum buffers)."""
        self._program.reset_state()


def compile_training_step(loss: Tensor, params: Mapping[str, np.ndarray], optimizer) -> CompiledTrainingStep:
    """Native code for one training step of `loss` w.r.t. every param in `params` it depends on.

    The gradient graph and the updates are built on a copy of the loss's graph: the user's
    graph is left as it was.
    """
    from .autodiff import grad
    from .passes.rebuild import rebuild

    if not isinstance(loss, Tensor) or loss.size != 1:
        raise ValueError(f"compile_training_step: the loss must be a scalar Tensor, got {loss!r}")
    if not hasattr(optimizer, "updates"):
        raise TypeError(f"compile_training_step: expected an optimizer such as gc.SGD, got {optimizer!r}")
    _check_params([loss], params)
    graph, (train_loss,) = rebuild(loss.graph, [loss])
    used = {node.id for node in graph.ancestors([train_loss])}
    trainable = [graph.params[name] for name in params if name in graph.params and graph.params[name].id in used]
    grads = grad(train_loss, trainable)
    writes, state_names = optimizer.updates(graph, trainable, grads)
    return build(CompiledTrainingStep, [train_loss] + [value for _, value in writes], params, output_names=["loss"],
                 inplace=[name for name, _ in writes], state_names=state_names)
