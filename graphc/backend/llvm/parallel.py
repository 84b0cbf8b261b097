"""Compiling a program's LLVM modules to object code while the next module is generated.

A large program is assembled as several modules (assemble.py, llvm/program_modules.py); LLVM's
optimization and code generation of one module is independent of the others', so each is
compiled on LLVM objects of its own (context, module, target machine, pass builder).

`ObjectCompiler` overlaps that with IR generation: the assembler submits each module as soon as
it is complete and goes on generating the next (Python, holding the GIL). A program of several
modules is compiled by worker processes (worker_process.py), one per compile thread besides the
caller's, each with an llvmlite of its own: modules compile truly in parallel through llvmlite's
public API, which serializes the calls of one process with a process-wide lock, and no compile
thread competes for the GIL with the generating one. A one-module program compiles on the
caller's thread, once it is generated. When generation is done, the caller's thread compiles
what is still queued too. Queued modules are taken largest first, so
that the last to finish are small ones. Where no worker process can start, the threads compile
in this process, taking turns at llvmlite's lock.

With one thread (GRAPHC_COMPILE_THREADS=1 or a one-core machine) everything is compiled serially
on the caller's thread, as one module.

The program's IR as text (`ProgramSpec.llvm_ir`, `CompiledFunction.llvm_ir`) is the modules
one after the other; each starts with its `; ModuleID = ...` line, which `split_modules` uses
to take them apart again.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import os
import queue
import re
import threading
import warnings
from concurrent.futures import Future

import llvmlite.binding as llvm

import graphc_runtime as rt
from graphc.backend.llvm import target as host
from graphc.backend.llvm.worker_process import RestartingWorker

__all__ = ["COMPILE_THREADS_VARIABLE", "compile_threads", "compile_module", "compile_modules",
           "split_modules", "ObjectCompiler"]

COMPILE_THREADS_VARIABLE = "GRAPHC_COMPILE_THREADS"
MAX_COMPILE_THREADS = 256   # more would only be idle threads and worker processes
_MODULE_HEADER = re.compile(r"^; ModuleID = ", re.MULTILINE)


def compile_threads() -> int:
    """Threads that compile a program: $GRAPHC_COMPILE_THREADS, else the usable CPUs."""
    default = rt.usable_cpu_count()
    text = os.environ.get(COMPILE_THREADS_VARIABLE, "").strip()
    if not text:
        return default
    try:
        count = int(text)
        if not 1 <= count <= MAX_COMPILE_THREADS:
            raise ValueError(text)
        return count
    except ValueError:
        warnings.warn(f"{COMPILE_THREADS_VARIABLE}={text!r} is not an integer in [1, {MAX_COMPILE_THREADS}]; "
                      f"compiling on {default} threads (the usable CPUs)", RuntimeWarning, stacklevel=2)
        return default


def split_modules(program_ir: str) -> list[str]:
    """The modules of a program's IR text (one or more modules, each from its ModuleID line on)."""
    starts = [match.start() for match in _MODULE_HEADER.finditer(program_ir)]
    if not starts or starts[0] != 0 and program_ir[:starts[0]].strip():
        starts = [0] + starts   # text before the first header: a module without one
    ends = starts[1:] + [len(program_ir)]
    return [program_ir[start:end] for start, end in zip(starts, ends)]


def compile_module(ir_text: str, *, isolated: bool) -> bytes:
    """Object code of one module.

    isolated: on LLVM objects of this call's own (context, module, target machine, pass
    builder), so that it may run on any thread. Otherwise in the global context with the
    shared target machine.
    """
    if not isolated:
        return host.compile_to_object(ir_text)
    with contextlib.ExitStack() as owned:
        # Closed in reverse order: the module before its context, the pass builder before the
        # target machine it points to.
        context = owned.enter_context(llvm.create_context())
        module = owned.enter_context(llvm.parse_assembly(ir_text, context))
        module.verify()
        target_machine = owned.enter_context(host.new_jit_target_machine())
        host.set_target(module, target_machine)
        builder = owned.enter_context(host.pass_builder(target_machine))
        manager = owned.enter_context(host.module_pass_manager())
        manager.run(module, builder)
        return target_machine.emit_object(module)


def compile_modules(ir_texts: list[str], threads: int | None = None) -> list[bytes]:
    """Object code of each module, in order, compiled on up to `threads` threads."""
    with ObjectCompiler(threads) as compiler:
        for index, text in enumerate(ir_texts):
            compiler.submit(text, more_follow=index < len(ir_texts) - 1)
        return compiler.objects()


class ObjectCompiler:
    """Compiles submitted modules in the background; `objects()` returns their object code.

    Use as a context manager: leaving it cancels what was not compiled yet and waits for the
    background threads, so no compilation outlives the block.
    """

    def __init__(self, threads: int | None = None):
        self.threads = compile_threads() if threads is None else max(1, threads)
        self._isolated = self.threads > 1
        # (priority, submission number, IR text, future): largest module first; the shutdown
        # markers, (inf, n, None, None), after every job.
        self._jobs: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()
        self._futures: list[Future] = []
        self._workers: list[threading.Thread] = []
        self._processes_started = False

    def submit(self, ir_text: str, *, more_follow: bool = False) -> None:
        """Queue a module; `more_follow` says the program has more, worth worker processes."""
        future: Future = Future()
        self._futures.append(future)
        self._jobs.put((-len(ir_text), next(self._order), ir_text, future))
        if not self._isolated or self._processes_started:
            return
        if more_follow or len(self._futures) > 1:
            # Several modules: worker processes compile them all, and the caller's thread,
            # generating the next module, does not share the GIL with a compile thread.
            # A program of one module compiles on the caller's thread, in `objects()`.
            self._processes_started = True
            for _ in range(self.threads - 1):
                self._start_worker(self._work_in_process)

    def _start_worker(self, loop) -> None:
        worker = threading.Thread(target=loop, name=f"graphc-compile-{len(self._workers)}", daemon=True)
        worker.start()
        self._workers.append(worker)

    def objects(self) -> list[bytes]:
        """Object code of every submitted module, in submission order; raises the first error."""
        self._run_queued()
        return [future.result() for future in self._futures]

    def close(self) -> None:
        for future in self._futures:
            future.cancel()          # only those no thread started
        for _ in self._workers:
            self._jobs.put((math.inf, next(self._order), None, None))
        for worker in self._workers:
            worker.join()
        self._workers = []

    def __enter__(self) -> ObjectCompiler:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _work_in_process(self) -> None:
        """Compile jobs in a worker process of this thread's own, started at once (or here,
        where no process can start)."""
        worker = RestartingWorker(host.worker_settings(), lambda text: compile_module(text, isolated=True))
        try:
            worker.start()
            while (job := self._jobs.get())[2] is not None:
                self._run(job, worker.compile)
        finally:
            worker.close()

    def _run_queued(self) -> None:
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job[2] is None:       # a shutdown marker: leave it for a worker
                self._jobs.put(job)
                return
            self._run(job)

    def _run(self, job, compile_text=None) -> None:
        _, _, ir_text, future = job
        if not future.set_running_or_notify_cancel():
            return
        try:
            if compile_text is None:
                future.set_result(compile_module(ir_text, isolated=self._isolated))
            else:
                future.set_result(compile_text(ir_text))
        except BaseException as error:  # delivered to whoever asks for the objects
            future.set_exception(error)
