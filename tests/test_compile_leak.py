"""Compiling graph after graph must not make the process grow: every LLVM object a compile
creates is freed with it. Measured in a child process of its own, so that what other tests
allocate (and caches they fill) does not count."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")

# The child prints the growth of its resident set in KiB, from after `warm_up` compiles (which
# fill what is filled once: LLVM's and the compiler's caches, the allocator's arenas) to after
# `measured` more, each of a graph not compiled before. A compile leaves some objects in
# reference cycles (llvmlite's IR, graphs) that reach the oldest generation, collected only
# every few thousand compiles: full collections every few compiles keep that garbage, which
# is no leak, from counting.
_DISTINCT_COMPILES = """
    import gc as garbage, os, sys
    import numpy as np
    import graphc as gc

    def resident_kib():
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024

    def compile_distinct(index):
        graph = gc.Graph(f"leak{index}")
        x = graph.input("x", (1, 4 + index))      # a new shape: a new program, never cached
        function = gc.compile(gc.relu(x) * 2.0, {})
        assert function(x=np.ones((1, 4 + index), np.float32))[0, 0] == 2.0

    warm_up, measured = int(sys.argv[1]), int(sys.argv[2])
    for index in range(warm_up):
        compile_distinct(index)
    garbage.collect()
    before = resident_kib()
    for index in range(warm_up, warm_up + measured):
        compile_distinct(index)
        if index % 5 == 0:
            garbage.collect()
    garbage.collect()
    print(resident_kib() - before)
"""

_PASS_MANAGERS = """
    import os, sys
    from graphc.backend.llvm import target

    def resident_kib():
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024

    count = int(sys.argv[1])
    for _ in range(100):
        with target.module_pass_manager():
            pass
    before = resident_kib()
    for _ in range(count):
        with target.module_pass_manager():
            pass
    print(resident_kib() - before)
"""


def _child_growth_kib(script: str, *arguments, tmp_path) -> int:
    environment = {**os.environ, "GRAPHC_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script), *map(str, arguments)],
                            capture_output=True, text=True, timeout=300, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    return int(result.stdout.split()[-1])


def test_distinct_compiles_do_not_grow_the_process(tmp_path):
    """A compile once kept its module pass manager for good (bench/NOTES.md). Most of what
    remains is llvmlite's: each pass builder leaves its instrumentation callbacks behind, and
    no API frees them."""
    growth = _child_growth_kib(_DISTINCT_COMPILES, 100, 300, tmp_path=tmp_path)
    assert growth < 1024, f"300 distinct compiles grew the resident set by {growth} KiB"


def test_pass_managers_are_reused(tmp_path):
    """llvmlite's module pass manager never frees its LLVM object: one per compile grew the
    process for good. Borrowed and returned, one serves every compile."""
    growth = _child_growth_kib(_PASS_MANAGERS, 3000, tmp_path=tmp_path)
    assert growth < 1024, f"3,000 pipeline runs' pass managers kept {growth} KiB"
