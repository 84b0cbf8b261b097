"""Placing a program's kernels into LLVM modules small enough to compile in parallel.

LLVM optimizes and emits one module on one thread, so a program built as one module compiles on
one core. Here kernels go, in the order assemble.py generates them (by family, then label), into
a module until it holds about `budget` LLVM instructions and the next kernel is of another group
(label); that module is then finished (turned into text and handed to `on_module`, which may
start compiling it while the next one is generated) and a new one begun. The entry comes
after the kernels: its parts fill modules the same way (`part_module`), and the entry itself,
which calls them in turn, is the last module (`entry_module`). A phase or part called from
another module is made external there and declared where it is called.

Helper functions (GEMM micro-kernels, intrinsics) are per module, so a module that needs one
makes its own copy: the price of splitting, paid in compile time only, and kept small by
generating kernels by family and not cutting a group (bench/NOTES.md, "Compile time: program
modules"). An internal helper gets the constant arguments (strides, flags) that every caller in
its module passes folded into it by LLVM, which a register tile short of registers needs. The
conv helpers, called by many kernels, are instead specialized for their constants in Python
and defined once per program (`shared_function`).

Instructions stand in for compile time: what LLVM spends on a kernel grows with its size, and
counting them is cheap next to generating them. A program under the budget stays one module,
exactly as with splitting off.
"""
from __future__ import annotations

import weakref
from typing import Callable

import llvmlite.ir as ir

from graphc.backend.emit.kernel import Kernel
from graphc.backend.llvm import parallel
from graphc.backend.llvm.target import new_module

__all__ = ["INSTRUCTIONS_PER_MODULE", "default_budget", "ProgramModules", "shared_function"]

# Large enough that the fixed cost of a module and its copies of shared helpers stay small,
# small enough that the modules compiled after generation ends make a short tail; smaller and
# larger budgets compiled no faster (bench/NOTES.md, "Compile time: program modules").
INSTRUCTIONS_PER_MODULE = 2000


def default_budget() -> int | None:
    """Instructions per module: None (everything in one module) when compiling on one thread."""
    return None if parallel.compile_threads() == 1 else INSTRUCTIONS_PER_MODULE


class ProgramModules:
    """The modules of one program: add kernels, then build the entry (`entry_module`, and its
    parts in `part_module()`), then `finish()`."""

    def __init__(self, name: str, budget: int | None, on_module: Callable[[str], None] | None = None):
        self.name = name
        self.budget = budget
        self.on_module = on_module
        self.texts: list[str] = []
        self._shared: dict[str, ir.Function] = {}     # shared_function's, by name: where defined
        self._entry_module: ir.Module | None = None
        self._begin_module()

    @property
    def module(self) -> ir.Module:
        """The module being filled; the entry goes into the last one."""
        return self._module

    def add_kernel(self, build: Callable[[ir.Module], Kernel], group: object = None) -> Kernel:
        """Build a kernel into the current module, or into a new one if the current is full.

        Kernels of one `group` (assemble.py: the same label, so mostly the same helpers) stay
        together in a full module, up to twice the budget: cut between them, the next module
        compiled their helpers again (in LeNet-5's step the budget fell between its two
        "gemm+bias+relu" GEMMs and between its two "gemm+ew" ones; bench/NOTES.md).
        """
        if self.budget is not None and (self._size >= 2 * self.budget or
                                        self._size >= self.budget and group != self._group):
            self._finish_module(last=False)
        kernel = build(self._module)
        self._group = group
        self._phases += kernel.phases
        self._size += self._count_new_instructions()
        return kernel

    def callee(self, function: ir.Function, module: ir.Module | None = None) -> ir.Function:
        """`function` (a kernel's phase, a part of the entry), callable from `module` (by default
        the current one): itself, or its declaration there."""
        module = self._module if module is None else module
        if function.module is module:
            return function
        declaration = module.globals.get(function.name)
        if declaration is None:
            declaration = ir.Function(module, function.function_type, function.name)
        return declaration

    def entry_module(self) -> ir.Module:
        """After the last kernel: the module of the entry, finished last. In a program already
        split into modules, the entry's parts go elsewhere (`part_module`): in the entry's
        module they were the largest piece of the program's IR, compiled after all the rest was
        generated. A program whose kernels fit one module keeps the entry in it."""
        if self.budget is None or not self.texts:
            return self._module
        if self._entry_module is None:
            self._entry_module = new_module(f"{self.name}.entry")
            _program_of[self._entry_module] = weakref.ref(self)
        return self._entry_module

    def part_module(self) -> ir.Module:
        """The module for the entry's next part: the current one, or a new one once it is full
        (when the entry has a module of its own)."""
        self._size += self._count_new_instructions()
        if self._entry_module is not None and self._size >= self.budget:
            self._finish_module(last=False)
        return self._module

    def finish(self) -> list[str]:
        """Finish the last module; the text of every module, in order."""
        if self._entry_module is not None:
            if self._module.globals:
                self._finish_module(last=False)
            self._module, self._phases = self._entry_module, []
        self._finish_module(last=True)
        return self.texts

    def _begin_module(self) -> None:
        self._module = new_module(self.name if not self.texts else f"{self.name}.part{len(self.texts)}")
        _program_of[self._module] = weakref.ref(self)
        self._group = None
        self._size = 0
        self._counted = 0
        self._phases: list[ir.Function] = []

    def _count_new_instructions(self) -> int:
        values = list(self._module.globals.values())
        added, self._counted = values[self._counted:], len(values)
        return sum(len(block.instructions) for value in added if isinstance(value, ir.Function)
                   for block in value.blocks)

    def _finish_module(self, last: bool) -> None:
        if not last:
            # The entry, in a later module, calls them.
            for phase in self._phases:
                phase.linkage = "external"
        _mark_nounwind(self._module)
        text = str(self._module)
        self.texts.append(text)
        if self.on_module is not None:
            self.on_module(text, more_follow=not last)
        if not last:
            _release_bodies(self._module)
            self._begin_module()


# module -> a weak reference to its ProgramModules, which refers to its modules: a strong one
# would keep both alive for good
_program_of: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def shared_function(module: ir.Module, name: str, function_type: ir.FunctionType,
                    build: Callable[[ir.Function], None]) -> ir.Function:
    """The helper `name`, callable from `module`: defined by `build` in the first module of the
    program that needs it, declared in the others. `name` must say everything `build` depends
    on (a helper specialized for its callers' constants names them).

    For helpers whose callers pass constants: a copy per module let LLVM fold its callers'
    constants into it, but cost a copy per module; specialized in Python, one copy serves them all.
    A module made outside ProgramModules gets its own internal definition.
    """
    existing = module.globals.get(name)
    if existing is not None:
        return existing
    program = _program_of[module]() if module in _program_of else None
    defined = program._shared.get(name) if program is not None else None
    if defined is not None:
        if defined.function_type != function_type:
            raise TypeError(f"internal error: shared helper {name} declared as {function_type}, "
                            f"defined as {defined.function_type}")
        return ir.Function(module, function_type, name)
    fn = ir.Function(module, function_type, name)
    fn.linkage = "external" if program is not None else "internal"
    build(fn)
    if program is not None:
        program._shared[name] = fn
    return fn


def _release_bodies(module: ir.Module) -> None:
    """Free the instructions of a finished module's functions now. Only its text is used from
    here on, but the kernels keep its phases (their names and types, for the entry's calls),
    and through them the module, whose IR every full garbage collection of the rest of the
    compile walked again (bench/NOTES.md, "compile time, where ResNet-20's cold compile goes")."""
    for function in module.functions:
        for block in function.blocks:
            block.instructions.clear()     # an instruction points to its block: a cycle
        function.blocks.clear()


def _mark_nounwind(module: ir.Module) -> None:
    """Tell LLVM that no function defined here unwinds: nothing in generated code throws (it
    calls its own functions and C library routines, which do not unwind), and without unwind
    tables the object has no .eh_frame section for the loader to map and register (memory
    saved: bench/NOTES.md, "Loading and memory"). The price: debuggers and profilers cannot
    walk the stack through it."""
    for function in module.functions:
        if function.blocks:
            function.attributes.add("nounwind")
