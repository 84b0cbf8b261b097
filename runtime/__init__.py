"""graphc_runtime: what running a compiled graphc program needs, and nothing more.

    host         the target code is compiled for: this CPU, or a narrower level (GRAPHC_TARGET)
    cache        on-disk cache of compiled object code (ObjectCache, make_key)
    loader       links object code into the process (NativeLibrary, create_host_target_machine)
    elf_link     the linker NativeLibrary uses on x86-64 ELF hosts, MCJIT's stand-in (internal)
    threads      thread count and the team that runs an entry on several threads (ThreadTeam)
    slots        descriptions of the entry's arguments (Input, Param, State, Output, Workspace)
    program      a loaded program, callable with numpy arrays (Program)
    buffers      aligned allocation and fast data pointers (internal)
    team_native  the native fork/join code behind ThreadTeam (internal)
    native_ir    compiles and caches the runtime's own LLVM IR (team_native's) (internal)
    deployed     programs saved to a file and loaded without the compiler (load, LoadedFunction)
    artifact     the file: a checksummed manifest and sections (internal)
    manifest     what the manifest says, checked (internal)
    optimizers   graphc's optimizers' per-call hyperparameters, for loaded steps (internal)
    cpu_features the CPU features code needs and this CPU has (internal)

The ABI between compiler and runtime: a program is one function

    void entry(void **args, int64_t tid, int64_t nthreads)

run concurrently by threads tid = 0 .. nthreads-1, where args[i] points to the memory of
slot i. It imports neither the compiler nor sympy nor networkx, and imports llvmlite only to
compile its own helpers or link with MCJIT: running a saved artifact on x86-64 Linux needs
numpy alone.
"""

from . import host
from .cache import CacheStats, ObjectCache, default_cache_directory, make_key
from .deployed import LoadedFunction, LoadedTrainingStep, load
from .loader import (
    HostTarget,
    MissingSymbolError,
    NativeLibrary,
    create_host_target_machine,
    host_target,
    initialize_llvm,
)
from .program import Program
from .slots import Input, Output, Param, State, Status, Workspace
from .threads import (
    MAX_THREADS,
    EntryFunction,
    ThreadTeam,
    default_team,
    get_num_threads,
    set_num_threads,
    usable_cpu_count,
)

__version__ = "0.1.0"

__all__ = [
    "CacheStats",
    "EntryFunction",
    "HostTarget",
    "Input",
    "LoadedFunction",
    "LoadedTrainingStep",
    "MAX_THREADS",
    "MissingSymbolError",
    "NativeLibrary",
    "ObjectCache",
    "Output",
    "Param",
    "Program",
    "State",
    "ThreadTeam",
    "Status",
    "Workspace",
    "create_host_target_machine",
    "default_cache_directory",
    "default_team",
    "get_num_threads",
    "host_target",
    "initialize_llvm",
    "load",
    "make_key",
    "set_num_threads",
    "usable_cpu_count",
]
