"""What `compile_training_step(..., comm=)` adds to a step, gathered in one object: the checked
communicator, the MPI ABI the kernels are generated for, the bucket size, how the buckets are
summed, each rank's threads, the agreement check, the communicator slot's words and the
buckets' shared memory."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from graphc.backend.kernels.collective import MpiAbi
from graphc.core.ir import is_int
from graphc.distributed import agreement
from graphc.distributed import comm as comms
from graphc.distributed.buckets import BUCKET_STATE, DEFAULT_BUCKET_BYTES, FINISHED_STATE

__all__ = ["DataParallel", "Binding", "ALLREDUCE_MODES"]

# How the ranks sum their buckets: "shared", in memory they share (every rank on one node);
# "mpi", by MPI_Iallreduce; "auto", shared where it can.
ALLREDUCE_MODES = ("auto", "shared", "mpi")


@dataclasses.dataclass(frozen=True)
class DataParallel:
    comm: object
    abi: MpiAbi
    bucket_bytes: int
    threads: int          # each rank's share of its node's cores
    shared: int = 0       # the ranks, if they sum their buckets in shared memory; 0: MPI does

    @classmethod
    def of(cls, comm, bucket_bytes, where: str, allreduce: str = "auto") -> "DataParallel":
        if bucket_bytes is None:
            bucket_bytes = DEFAULT_BUCKET_BYTES
        elif not is_int(bucket_bytes) or bucket_bytes < 1:
            raise ValueError(f"{where}: bucket_bytes must be a positive int, got {bucket_bytes!r}")
        if allreduce not in ALLREDUCE_MODES:
            raise ValueError(f"{where}: allreduce must be one of {', '.join(map(repr, ALLREDUCE_MODES))}, "
                             f"got {allreduce!r}")
        comm = comms.checked_comm(comm, where)
        shared = 0
        ranks_here = comms.ranks_on_this_node(comm)     # collective: every rank asks, whatever it chose
        if allreduce != "mpi" and comm.Get_size() > 1:
            if ranks_here == comm.Get_size():
                shared = comm.Get_size()
            elif allreduce == "shared":
                raise ValueError(f"{where}: allreduce='shared' needs every rank on one node; the "
                                 f"{comm.Get_size()} ranks of this communicator are not")
        return cls(comm, comms.mpi_abi(), int(bucket_bytes), comms.threads_per_rank(ranks_here), shared)

    @property
    def ranks(self) -> int:
        return self.comm.Get_size()

    def request(self) -> dict:
        """What the program depends on (part of its cache key). Summed by MPI, not the number of
        ranks: the kernels read 1/ranks from the communicator slot, so one program serves any
        count; in shared memory, each done reads every rank's bucket."""
        return {"allreduce": {"bucket_bytes": self.bucket_bytes, "mpi_abi": dataclasses.astuple(self.abi),
                              **({"shared": self.shared} if self.shared else {})}}

    def check_same_program(self, where: str, program_hash: str, request: dict, loss, params: Mapping) -> None:
        """Every rank compiled the program `program_hash` names (its cache key without the thread
        count, which may differ between ranks) from the same params, or ValueError on every rank
        (agreement.py). The description says what differs: the graph's inputs and params, the
        request (optimizer, buffers, buckets), the CPU target and graphc's source."""
        from graphc.backend.llvm.target import target_fingerprint
        from graphc.backend.program_cache import compiler_source_digest
        graph = loss.graph
        bound = [name for name in graph.bound_sources() if name in params]
        description = dict(graph=graph.name, nodes=len(graph.ancestors([loss])),
                           inputs={name: (node.shape, node.dtype) for name, node in graph.inputs.items()},
                           params={name: tuple(np.shape(params[name])) for name in bound},
                           target=target_fingerprint(), graphc_source=compiler_source_digest()[:16],
                           **{key: value for key, value in request.items() if key != "kind"})
        agreement.check_same_program(self.comm, where, program_hash, description,
                                     agreement.params_digest(params, bound))

    def bind(self, name: str | None, buckets: int, slots) -> "Binding":
        """What the program, of at most `buckets` buckets and with runtime slots `slots`, is
        bound to on this rank (its communicator slot is `name`). Collective over the ranks."""
        from graphc_runtime import State
        if name is None:
            raise ValueError("internal error: a data-parallel step without its communicator slot")
        if not self.shared:
            return Binding({name: comms.slot_values(self.comm, buckets)})
        from graphc.distributed.shared_window import SharedBuckets
        states = [slot for slot in slots if isinstance(slot, State)]
        memory = SharedBuckets(self.comm, {slot.name: slot.shape for slot in states
                                           if slot.name.startswith(BUCKET_STATE)})
        tokens = [slot.name for slot in states if slot.name.startswith(FINISHED_STATE)]
        return Binding({name: comms.slot_values(self.comm, buckets, memory.bases)}, memory.arrays,
                       tuple(memory.arrays) + tuple(tokens), memory)


@dataclasses.dataclass(frozen=True)
class Binding:
    """A data-parallel step's binding on one rank: State slots whose words are set once (the
    communicator slot: MPI's handles), State slots bound to memory of their own (the shared
    buckets), the State slots that hold none of the optimizer's state, and the owner of that
    memory, kept while the program lives."""

    fixed_state: dict
    state_memory: dict = dataclasses.field(default_factory=dict)
    hidden: tuple = ()
    memory_owner: object = None
