"""What `compile_training_step(..., comm=)` adds to a step, gathered in one object: the checked
communicator, the MPI ABI the kernels are generated for, the bucket size, each rank's threads,
the agreement check and the communicator slot's words."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from graphc.backend.kernels.collective import MpiAbi
from graphc.core.ir import is_int
from graphc.distributed import agreement
from graphc.distributed import comm as comms
from graphc.distributed.buckets import DEFAULT_BUCKET_BYTES

__all__ = ["DataParallel"]


@dataclasses.dataclass(frozen=True)
class DataParallel:
    comm: object
    abi: MpiAbi
    bucket_bytes: int
    threads: int          # each rank's share of its node's cores

    @classmethod
    def of(cls, comm, bucket_bytes, where: str) -> "DataParallel":
        if bucket_bytes is None:
            bucket_bytes = DEFAULT_BUCKET_BYTES
        elif not is_int(bucket_bytes) or bucket_bytes < 1:
            raise ValueError(f"{where}: bucket_bytes must be a positive int, got {bucket_bytes!r}")
        comm = comms.checked_comm(comm, where)
        return cls(comm, comms.mpi_abi(), int(bucket_bytes), comms.threads_per_rank(comm))

    @property
    def ranks(self) -> int:
        return self.comm.Get_size()

    def request(self) -> dict:
        """What the program depends on (part of its cache key). Not the number of ranks: the
        kernels read 1/ranks from the communicator slot, so one program serves any count."""
        return {"allreduce": {"bucket_bytes": self.bucket_bytes, "mpi_abi": dataclasses.astuple(self.abi)}}

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

    def slot_values(self, name: str | None, buckets: int) -> dict[str, np.ndarray]:
        """{the communicator slot's name: its words}, for a program of at most `buckets` buckets."""
        if name is None:
            raise ValueError("internal error: a data-parallel step without its communicator slot")
        return {name: comms.slot_values(self.comm, buckets)}
