"""Data-parallel steps on MPI: each test starts `mpiexec -n N` on loopback with the scripts of
tests/mpi_scripts/, under a timeout (MPIEXEC_TIMEOUT, and the subprocess's own), so that a
bug fails the test instead of hanging it. N = 3 runs oversubscribed on a 2-core machine:
MPICH's hydra needs no flag for it.

Skipped, saying why, where mpi4py or an mpiexec able to start it is missing
(pip install ".[test]" installs mpi4py and the mpich wheel).
"""
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).parent / "mpi_scripts"
TIMEOUT = 120   # seconds a job may take: compiling and a few steps take a few


@functools.lru_cache(maxsize=None)
def _mpiexec() -> tuple[str | None, str]:
    """(mpiexec that starts this Python's mpi4py, None) or (None, why not)."""
    beside = Path(sys.executable).parent / "mpiexec"     # the mpich wheel's, in this environment
    found = str(beside) if beside.exists() else shutil.which("mpiexec")
    if found is None:
        return None, "no mpiexec (pip install mpich)"
    probe = subprocess.run([sys.executable, "-c", "import mpi4py.MPI"], capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        return None, f"mpi4py cannot load an MPI library (pip install mpi4py mpich): {probe.stderr.strip()[-300:]}"
    started = subprocess.run([found, "-n", "2", sys.executable, "-c",
                              "from mpi4py import MPI; assert MPI.COMM_WORLD.Get_size() == 2"],
                             capture_output=True, text=True, timeout=60, env={**os.environ, "MPIEXEC_TIMEOUT": "50"})
    if started.returncode != 0:
        return None, f"{found} does not start mpi4py's MPI: {started.stderr.strip()[-300:]}"
    return found, ""


@pytest.fixture
def mpiexec() -> str:
    found, why = _mpiexec()
    if found is None:
        pytest.skip(why)
    return found


def run(mpiexec: str, ranks: int, script: str, *args, abort_on_error: bool = True) -> subprocess.CompletedProcess:
    """`mpiexec -n ranks python [-m mpi4py] script args`, killed after TIMEOUT seconds."""
    main = ["-m", "mpi4py"] if abort_on_error else []
    command = [mpiexec, "-n", str(ranks), sys.executable, *main, str(SCRIPTS / script), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT + 30,
                          env={**os.environ, "MPIEXEC_TIMEOUT": str(TIMEOUT)})


def result_of(job: subprocess.CompletedProcess) -> dict:
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    lines = [line for line in job.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, job.stdout[-3000:] + job.stderr[-3000:]
    return json.loads(lines[0][len("RESULT "):])


# "auto": every rank is on this machine, so the ranks sum their buckets in shared memory;
# "mpi": MPI_Iallreduce sums them, as across machines.
@pytest.mark.parametrize("allreduce", ["auto", "mpi"])
@pytest.mark.parametrize("ranks, model, optimizer", [
    (2, "convnet", "sgd"),       # momentum and weight decay: updates fused into the all-reduce's kernel
    (3, "mlp", "adam"),          # Adam's moments; three ranks, oversubscribed
    (2, "mlp", "plain_sgd"),     # also checked against the reference executor's gradients
])
def test_equals_one_process_on_the_global_batch(mpiexec, ranks, model, optimizer, allreduce):
    result = result_of(run(mpiexec, ranks, "train_steps.py", model, optimizer, 5, allreduce))
    assert result["ranks"] == ranks
    assert result["shared"] == (allreduce == "auto")
    assert not any(name.startswith("mpi") for name in result["state"])
    assert result["identical"], "the ranks' params differ"
    for distributed, single in result["losses"]:
        assert distributed == pytest.approx(single, rel=1e-5)
    assert result["param_error"] < 1e-4
    if optimizer == "plain_sgd":
        assert result["reference_error"] < 1e-4


def test_shared_buckets_copy_what_no_kernel_can_write_in_place(mpiexec):
    """Tied gradients (one node in two buckets), a gradient that is an input, one-value
    buckets: the shared-memory step trains as the MPI one does."""
    result = result_of(run(mpiexec, 2, "odd_gradients.py"))
    assert result["identical"] == [True, True]
    for name, difference in result["difference"].items():
        assert difference < 1e-6, name


@pytest.mark.parametrize("allreduce", ["auto", "mpi"])
def test_reset_state_keeps_the_communicator(mpiexec, allreduce):
    result = result_of(run(mpiexec, 2, "train_steps.py", "mlp", "sgd", 4, "reset", allreduce))
    assert result["identical"] and result["param_error"] < 1e-4


def test_batch_norm_buffers_stay_identical(mpiexec):
    """Batch statistics are each rank's own (as DDP without SyncBatchNorm); the running
    statistics are averaged, so that params and buffers stay the same on every rank."""
    result = result_of(run(mpiexec, 2, "train_steps.py", "bn", "sgd", 4))
    assert result["identical"]


@pytest.mark.parametrize("ranks, allreduce", [(2, "auto"), (3, "auto"), (3, "mpi")])
def test_runs_are_bitwise_reproducible(mpiexec, ranks, allreduce):
    first = result_of(run(mpiexec, ranks, "train_steps.py", "convnet", "sgd", 6, allreduce))
    second = result_of(run(mpiexec, ranks, "train_steps.py", "convnet", "sgd", 6, allreduce))
    assert first["identical"] and second["identical"]
    assert first["digest"] == second["digest"]
    assert first["losses"] == second["losses"]


@pytest.mark.parametrize("mode, ranks, message", [
    ("shape", 2, "the ranks compiled different programs: rank 0 vs rank 1; between rank 0 and rank 1: "
                 "params {'fc1.w': (16, 32)"),
    ("params", 3, "the ranks start from different params: ranks [0, 1] vs rank 2; ['fc1.w', 'fc2.w'] differ"),
])
def test_mismatched_programs_raise_on_every_rank(mpiexec, mode, ranks, message):
    job = run(mpiexec, ranks, "faults.py", mode)
    assert job.returncode == 0, job.stderr[-3000:]
    # each rank prints one line; mpiexec may interleave the ranks' output
    assert sorted(re.findall(r"ERROR (\d+) ", job.stdout)) == [str(rank) for rank in range(ranks)], job.stdout
    assert job.stdout.count(message) == ranks, job.stdout


@pytest.mark.parametrize("mode", ["raise", "kill"])
def test_a_failing_rank_ends_the_job_within_seconds(mpiexec, mode):
    """Rank 1 raises (python -m mpi4py calls MPI_Abort) or is killed (mpiexec kills the rest)
    while the others wait inside a step for its gradients."""
    started = time.monotonic()
    job = run(mpiexec, 2, "faults.py", mode)
    elapsed = time.monotonic() - started
    assert job.returncode != 0
    assert elapsed < 30, f"the job took {elapsed:.0f} s to end"
    if mode == "raise":
        assert "injected failure on rank 1" in job.stderr


def test_checkpoint_written_by_rank_zero_resumes_bit_for_bit(mpiexec, tmp_path):
    result = result_of(run(mpiexec, 2, "resume.py", tmp_path))
    assert result["same"]
    assert result["resumed"] == pytest.approx(result["straight"], rel=1e-6)


def test_one_rank_is_the_plain_step(mpiexec, tmp_path):
    result = result_of(run(mpiexec, 1, "single_rank.py", tmp_path))
    for distributed, plain in result["losses"]:
        assert distributed == plain
    assert result["param_error"] < 1e-6
    # the profiling twin has no communicator: it runs as one process, and trains nothing
    assert "allreduce_start" in result["profiled_kernels"] and result["profile_kept_params"]
    assert not any(name.startswith("mpi") for name in result["state"] + result["state_dict"])
    assert "data-parallel step" in result["save_refused"]
    assert result["report_bytes"] > 10000
    assert result["refused"] == {
        "check_finite": "ValueError: compile_training_step: check_finite=True cannot be combined with comm=: a rank "
                        "stopping at a NaN would leave the other ranks waiting for its gradients",
        "bucket_bytes": "ValueError: compile_training_step: bucket_bytes must be a positive int, got 0",
        "comm": "TypeError: compile_training_step: comm must be an mpi4py intracommunicator such as MPI.COMM_WORLD, "
                "got 'world'",
        "allreduce": "ValueError: compile_training_step: allreduce must be one of 'auto', 'shared', 'mpi', "
                     "got 'ring'"}
    for own, reference in result["hand_written"]:      # an optimizer that is not a dataclass
        assert own == pytest.approx(reference, rel=1e-6)
