"""A compile worker process (object_worker.py) seen from the compiler: IR text in, object code out.

Separate processes compile modules truly in parallel through llvmlite's public API, where
threads of one process would take turns at llvmlite's process-wide lock. A worker that dies
(LLVM aborts on some malformed input) raises an error here; the compiler's process lives on.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import llvmlite

from graphc.backend.llvm import object_worker
from graphc.backend.llvm.object_worker import read_frame, write_frame

__all__ = ["WorkerProcess", "WorkerDied"]

_WORKER_SCRIPT = os.path.abspath(object_worker.__file__)
# -I: the worker sees neither the user's PYTHON* variables nor the working directory; it is
# given where llvmlite is, which is all it imports.
_BOOTSTRAP = ("import sys, runpy; sys.path.insert(0, {path!r}); "
              "runpy.run_path({script!r}, run_name='__main__')")


class WorkerDied(RuntimeError):
    """The worker process ended before answering."""


class WorkerProcess:
    """One worker, started at construction with the target and passes it compiles for."""

    def __init__(self, settings: dict):
        self._errors = tempfile.TemporaryFile()   # read only if the worker dies: never fills a pipe
        bootstrap = _BOOTSTRAP.format(path=os.path.dirname(os.path.dirname(llvmlite.__file__)),
                                      script=_WORKER_SCRIPT)
        self._process = subprocess.Popen([sys.executable, "-I", "-c", bootstrap], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=self._errors, close_fds=True)
        write_frame(self._process.stdin, json.dumps(settings).encode("utf-8"))

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
        if self._process.poll() is None:
            try:
                write_frame(self._process.stdin, b"")
                self._process.stdin.close()
                self._process.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self._process.kill()
                self._process.wait()
        for stream in (self._process.stdin, self._process.stdout, self._errors):
            stream.close()

    def _death_report(self) -> str:
        code = self._process.wait()
        self._errors.seek(0)
        said = self._errors.read()[-2000:].decode("utf-8", "replace").strip()
        how = f"signal {-code}" if code < 0 else f"exit status {code}"
        return f"a graphc compile worker died ({how}){': ' + said if said else ''}"
