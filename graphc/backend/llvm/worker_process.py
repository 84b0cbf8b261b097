"""A compile worker process (object_worker.py) seen from the compiler: IR text in, object code out.

Separate processes compile modules truly in parallel through llvmlite's public API, where
threads of one process would take turns at llvmlite's process-wide lock. A worker that cannot
start (no usable interpreter) raises WorkerUnavailable before it is given any module; one that
dies while compiling (LLVM aborting on a module) raises WorkerDied, and this process lives on.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import llvmlite

from graphc.backend.llvm import object_worker
from graphc.backend.llvm.object_worker import READY, read_frame, write_frame

__all__ = ["WorkerProcess", "WorkerDied", "WorkerUnavailable"]

_WORKER_SCRIPT = os.path.abspath(object_worker.__file__)
# -I: the worker sees neither the user's PYTHON* variables nor the working directory; it is
# given where llvmlite is, which is all it imports.
_BOOTSTRAP = ("import sys, runpy; sys.path.insert(0, {path!r}); "
              "runpy.run_path({script!r}, run_name='__main__')")


class WorkerDied(RuntimeError):
    """The worker process ended before answering."""


class WorkerUnavailable(OSError):
    """No worker process could be started here."""


class WorkerProcess:
    """One worker, started at construction with the target and passes it compiles for."""

    def __init__(self, settings: dict):
        self._errors = tempfile.TemporaryFile()   # read only if the worker dies: never fills a pipe
        self._process = None
        try:
            bootstrap = _BOOTSTRAP.format(path=os.path.dirname(os.path.dirname(llvmlite.__file__)),
                                          script=_WORKER_SCRIPT)
            self._process = subprocess.Popen([sys.executable, "-I", "-c", bootstrap], stdin=subprocess.PIPE,
                                             stdout=subprocess.PIPE, stderr=self._errors, close_fds=True)
        except OSError as error:
            self.close()
            raise WorkerUnavailable(f"cannot start a graphc compile worker: {error}") from error
        try:
            write_frame(self._process.stdin, json.dumps(settings).encode("utf-8"))
            ready = self._process.stdout.read(1) == READY
        except OSError:         # it ended before reading its settings (a broken pipe): it died
            ready = False
        if not ready:
            report = self._death_report()
            self.close()
            raise WorkerUnavailable(report)

    def compile(self, ir_text: str) -> bytes:
        """Object code of one module; RuntimeError with LLVM's message if it refused the IR."""
        try:
            write_frame(self._process.stdin, ir_text.encode("utf-8"))
            status = self._process.stdout.read(1)
            payload = read_frame(self._process.stdout)
        except (BrokenPipeError, OSError):
            status, payload = b"", None
        if not status or payload is None:
            raise WorkerDied(self._death_report())
        if status != b"\0":
            raise RuntimeError(f"LLVM refused a module: {payload.decode('utf-8', 'replace')}")
        return payload

    def close(self) -> None:
        process = self._process
        if process is not None and process.poll() is None:
            try:
                write_frame(process.stdin, b"")
                process.stdin.close()
                process.wait(timeout=5)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                process.kill()
                process.wait()
        for stream in (process.stdin, process.stdout) if process is not None else ():
            try:
                stream.close()
            except OSError:   # unflushed bytes for a worker that is gone
                pass
        self._errors.close()

    def _death_report(self) -> str:
        try:
            code = self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:   # alive but not answering
            self._process.kill()
            code = self._process.wait()
        self._errors.seek(0)
        said = self._errors.read()[-2000:].decode("utf-8", "replace").strip()
        how = f"signal {-code}" if code < 0 else f"exit status {code}"
        return f"a graphc compile worker died ({how}){': ' + said if said else ''}"


class RestartingWorker:
    """A worker started on first use and restarted once when it dies on a module; where no
    worker can start at all, `compile_here` compiles instead (in this process)."""

    def __init__(self, settings: dict, compile_here):
        self._settings = settings
        self._compile_here = compile_here
        self._worker: WorkerProcess | None = None
        self._unavailable = False

    def compile(self, ir_text: str) -> bytes:
        for attempt in (1, 2):
            worker = self._started()
            if worker is None:
                return self._compile_here(ir_text)
            try:
                return worker.compile(ir_text)
            except WorkerDied:
                self.close()
                if attempt == 2:   # the module itself brings LLVM down: never here
                    raise
        raise AssertionError("unreachable")

    def start(self) -> None:
        """Start the worker now rather than at the first module (no error if none can start)."""
        self._started()

    def close(self) -> None:
        if self._worker is not None:
            self._worker.close()
            self._worker = None

    def _started(self) -> WorkerProcess | None:
        if self._worker is None and not self._unavailable:
            try:
                self._worker = WorkerProcess(self._settings)
            except WorkerUnavailable:
                self._unavailable = True
        return self._worker
