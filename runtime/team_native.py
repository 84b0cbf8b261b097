"""Native fork/join for `ThreadTeam`, written in LLVM IR, compiled once per machine and kept
in the object cache (`team_functions`).

Why native: a fork/join through Python locks (GIL handoffs and futex round trips per worker)
costs more than a whole small training step (bench/NOTES.md, "Thread team"). Here each worker
thread makes one ctypes call that never returns until shutdown (so it never holds the GIL),
and a fork/join is one ctypes call from the caller: it publishes the job, runs tid 0 itself,
and waits; waiting spins briefly on a cache line, then sleeps on a condition variable.

Shared control block (byte offsets below; one cache line per independently written field):

    job line:        shutdown flag, entry pointer, args pointer, nthreads (written by the
                     caller only while no worker is running, read by participating workers)
    remaining:       workers of the current job that have not finished
    caller_sleeping: the caller sleeps on `done_cond`, the last worker must signal it
    mutex, start_cond, done_cond: pthread objects, used only on the sleeping paths
    mailboxes:       one line per worker tid: a job sequence number the caller increments
                     to hand that worker a job, and the worker's own "sleeping" flag

Per-worker mailboxes (rather than one shared generation counter) mean a job wakes exactly
the workers it needs; workers beyond the job's thread count stay asleep and never read
the job fields, so the caller may rewrite them as soon as the participants are done.

Sleeping without lost wake-ups: a sleeper sets its flag and then re-reads its condition
under the mutex; the waker changes the condition and then reads the flag, all sequentially
consistent, so at least one of the two sees the other's write; a waker that sees the flag
broadcasts under the mutex, which cannot fall between the sleeper's check and its wait.
"""

from __future__ import annotations

import ctypes
import functools
import string

from .loader import NativeLibrary, host_target

MAX_THREADS = 1024  # mailbox capacity; tid 0 (the caller) needs none but keeps indexing simple

# Control block layout, in bytes.
SHUTDOWN = 0
ENTRY = 8
ARGS = 16
NTHREADS = 24
REMAINING = 64
CALLER_SLEEPING = 128
PTHREAD_OBJECT_BYTES = 128  # room for pthread_mutex_t / pthread_cond_t (40 / 48 on glibc, 64 / 48 on macOS)
MUTEX = 192
START_COND = MUTEX + PTHREAD_OBJECT_BYTES
DONE_COND = START_COND + PTHREAD_OBJECT_BYTES
MAILBOXES = DONE_COND + PTHREAD_OBJECT_BYTES
MAILBOX_BYTES = 64  # sequence number at +0, sleeping flag at +8
CONTROL_BLOCK_BYTES = MAILBOXES + MAILBOX_BYTES * MAX_THREADS

# Spin iterations before sleeping: 0.1-0.5 ms depending on the CPU's `pause` latency, long
# enough to bridge the Python code a training loop runs between two steps, short enough
# that idle workers soon stop taking CPU from the rest of the program.
SPIN_ITERATIONS = 4096
YIELD_AFTER = 1024
YIELD_EVERY = 64

_TEAM_IR = string.Template(r"""
declare i32 @pthread_mutex_init(ptr, ptr)
declare i32 @pthread_mutex_destroy(ptr)
declare i32 @pthread_mutex_lock(ptr)
declare i32 @pthread_mutex_unlock(ptr)
declare i32 @pthread_cond_init(ptr, ptr)
declare i32 @pthread_cond_destroy(ptr)
declare i32 @pthread_cond_wait(ptr, ptr)
declare i32 @pthread_cond_broadcast(ptr)
declare i32 @sched_yield()
$relax_declaration

; One iteration of a spin-wait. The pause hint frees pipeline resources for a sibling
; hyperthread. After $YIELD_AFTER iterations every $YIELD_EVERY-th one also yields the CPU:
; when threads outnumber cores, the thread being waited for may need this one's core.
define private void @relax(i64 %spins) {
entry:
  $relax_call
  %late = icmp uge i64 %spins, $YIELD_AFTER
  %phase = urem i64 %spins, $YIELD_EVERY
  %on_beat = icmp eq i64 %phase, 0
  %yield_now = and i1 %late, %on_beat
  br i1 %yield_now, label %yield, label %done
yield:
  call i32 @sched_yield()
  br label %done
done:
  ret void
}

define i32 @graphc_team_init(ptr %team) {
  %mutex = getelementptr inbounds i8, ptr %team, i64 $MUTEX
  %start = getelementptr inbounds i8, ptr %team, i64 $START_COND
  %done = getelementptr inbounds i8, ptr %team, i64 $DONE_COND
  %mutex_error = call i32 @pthread_mutex_init(ptr %mutex, ptr null)
  %start_error = call i32 @pthread_cond_init(ptr %start, ptr null)
  %done_error = call i32 @pthread_cond_init(ptr %done, ptr null)
  %some_error = or i32 %mutex_error, %start_error
  %any_error = or i32 %some_error, %done_error
  ret i32 %any_error
}

define void @graphc_team_destroy(ptr %team) {
  %mutex = getelementptr inbounds i8, ptr %team, i64 $MUTEX
  %start = getelementptr inbounds i8, ptr %team, i64 $START_COND
  %done = getelementptr inbounds i8, ptr %team, i64 $DONE_COND
  call i32 @pthread_cond_destroy(ptr %done)
  call i32 @pthread_cond_destroy(ptr %start)
  call i32 @pthread_mutex_destroy(ptr %mutex)
  ret void
}

define private ptr @mailbox(ptr %team, i64 %tid) {
  %offset = mul i64 %tid, $MAILBOX_BYTES
  %first = getelementptr inbounds i8, ptr %team, i64 $MAILBOXES
  %box = getelementptr inbounds i8, ptr %first, i64 %offset
  ret ptr %box
}

define private void @broadcast(ptr %team, i64 %cond_offset) {
  %mutex = getelementptr inbounds i8, ptr %team, i64 $MUTEX
  %cond = getelementptr inbounds i8, ptr %team, i64 %cond_offset
  call i32 @pthread_mutex_lock(ptr %mutex)
  call i32 @pthread_cond_broadcast(ptr %cond)
  call i32 @pthread_mutex_unlock(ptr %mutex)
  ret void
}

; Worker side: wait until this worker's sequence number differs from %seen; return it.
define private i64 @await_job(ptr %team, i64 %tid, i64 %seen) {
entry:
  %box = call ptr @mailbox(ptr %team, i64 %tid)
  br label %spin
spin:
  %spins = phi i64 [ 0, %entry ], [ %next_spins, %keep_spinning ]
  %sequence = load atomic i64, ptr %box acquire, align 8
  %posted = icmp ne i64 %sequence, %seen
  br i1 %posted, label %got_job, label %keep_spinning
keep_spinning:
  call void @relax(i64 %spins)
  %next_spins = add i64 %spins, 1
  %spin_more = icmp ult i64 %next_spins, $SPIN_ITERATIONS
  br i1 %spin_more, label %spin, label %sleep
got_job:
  ret i64 %sequence
sleep:
  %mutex = getelementptr inbounds i8, ptr %team, i64 $MUTEX
  %start = getelementptr inbounds i8, ptr %team, i64 $START_COND
  %sleeping = getelementptr inbounds i8, ptr %box, i64 8
  call i32 @pthread_mutex_lock(ptr %mutex)
  store atomic i64 1, ptr %sleeping seq_cst, align 8
  br label %check
check:
  %sequence_now = load atomic i64, ptr %box seq_cst, align 8
  %posted_now = icmp ne i64 %sequence_now, %seen
  br i1 %posted_now, label %woken, label %wait
wait:
  call i32 @pthread_cond_wait(ptr %start, ptr %mutex)
  br label %check
woken:
  store atomic i64 0, ptr %sleeping monotonic, align 8
  call i32 @pthread_mutex_unlock(ptr %mutex)
  ret i64 %sequence_now
}

; Caller side: hand the current job to workers 1 .. %nthreads-1 (%nthreads >= 2).
define private void @post_job(ptr %team, i64 %nthreads) {
entry:
  br label %post
post:
  %tid = phi i64 [ 1, %entry ], [ %next_tid, %post ]
  %box = call ptr @mailbox(ptr %team, i64 %tid)
  atomicrmw add ptr %box, i64 1 seq_cst
  %next_tid = add i64 %tid, 1
  %post_more = icmp ult i64 %next_tid, %nthreads
  br i1 %post_more, label %post, label %scan
scan:
  %scan_tid = phi i64 [ 1, %post ], [ %next_scan_tid, %scan_next ]
  %scan_box = call ptr @mailbox(ptr %team, i64 %scan_tid)
  %sleeping = getelementptr inbounds i8, ptr %scan_box, i64 8
  %is_sleeping = load atomic i64, ptr %sleeping seq_cst, align 8
  %asleep = icmp ne i64 %is_sleeping, 0
  br i1 %asleep, label %wake, label %scan_next
scan_next:
  %next_scan_tid = add i64 %scan_tid, 1
  %scan_more = icmp ult i64 %next_scan_tid, %nthreads
  br i1 %scan_more, label %scan, label %done
wake:
  call void @broadcast(ptr %team, i64 $START_COND)
  br label %done
done:
  ret void
}

; Caller side: wait until every worker of the current job has finished.
define private void @await_workers(ptr %team) {
entry:
  %remaining = getelementptr inbounds i8, ptr %team, i64 $REMAINING
  br label %spin
spin:
  %spins = phi i64 [ 0, %entry ], [ %next_spins, %keep_spinning ]
  %left = load atomic i64, ptr %remaining acquire, align 8
  %finished = icmp eq i64 %left, 0
  br i1 %finished, label %done, label %keep_spinning
keep_spinning:
  call void @relax(i64 %spins)
  %next_spins = add i64 %spins, 1
  %spin_more = icmp ult i64 %next_spins, $SPIN_ITERATIONS
  br i1 %spin_more, label %spin, label %sleep
sleep:
  %mutex = getelementptr inbounds i8, ptr %team, i64 $MUTEX
  %done_cond = getelementptr inbounds i8, ptr %team, i64 $DONE_COND
  %sleeping = getelementptr inbounds i8, ptr %team, i64 $CALLER_SLEEPING
  call i32 @pthread_mutex_lock(ptr %mutex)
  store atomic i64 1, ptr %sleeping seq_cst, align 8
  br label %check
check:
  %left_now = load atomic i64, ptr %remaining seq_cst, align 8
  %finished_now = icmp eq i64 %left_now, 0
  br i1 %finished_now, label %woken, label %wait
wait:
  call i32 @pthread_cond_wait(ptr %done_cond, ptr %mutex)
  br label %check
woken:
  store atomic i64 0, ptr %sleeping monotonic, align 8
  call i32 @pthread_mutex_unlock(ptr %mutex)
  br label %done
done:
  ret void
}

; Worker side: count this worker out of the job; the last one wakes a sleeping caller.
define private void @report_done(ptr %team) {
entry:
  %remaining = getelementptr inbounds i8, ptr %team, i64 $REMAINING
  %before = atomicrmw sub ptr %remaining, i64 1 seq_cst
  %last = icmp eq i64 %before, 1
  br i1 %last, label %check_caller, label %done
check_caller:
  %sleeping = getelementptr inbounds i8, ptr %team, i64 $CALLER_SLEEPING
  %caller_sleeping = load atomic i64, ptr %sleeping seq_cst, align 8
  %asleep = icmp ne i64 %caller_sleeping, 0
  br i1 %asleep, label %wake, label %done
wake:
  call void @broadcast(ptr %team, i64 $DONE_COND)
  br label %done
done:
  ret void
}

; Run entry(args, tid, nthreads) for tid 0 .. nthreads-1 concurrently; tid 0 here.
; Workers 1 .. nthreads-1 must be running @graphc_team_worker. nthreads >= 2.
define void @graphc_team_run(ptr %team, ptr %entry, ptr %args, i64 %nthreads) {
  %entry_slot = getelementptr inbounds i8, ptr %team, i64 $ENTRY
  %args_slot = getelementptr inbounds i8, ptr %team, i64 $ARGS
  %nthreads_slot = getelementptr inbounds i8, ptr %team, i64 $NTHREADS
  %remaining = getelementptr inbounds i8, ptr %team, i64 $REMAINING
  store ptr %entry, ptr %entry_slot, align 8
  store ptr %args, ptr %args_slot, align 8
  store i64 %nthreads, ptr %nthreads_slot, align 8
  %workers = sub i64 %nthreads, 1
  store atomic i64 %workers, ptr %remaining seq_cst, align 8
  call void @post_job(ptr %team, i64 %nthreads)
  call void %entry(ptr %args, i64 0, i64 %nthreads)
  call void @await_workers(ptr %team)
  ret void
}

; Make workers 1 .. %workers leave @graphc_team_worker (no job may be running).
define void @graphc_team_shutdown(ptr %team, i64 %workers) {
  %shutdown = getelementptr inbounds i8, ptr %team, i64 $SHUTDOWN
  store atomic i64 1, ptr %shutdown monotonic, align 8
  %threads = add i64 %workers, 1
  call void @post_job(ptr %team, i64 %threads)
  ret void
}

; The whole life of worker %tid: wait for a job, run it, report, until shutdown.
define void @graphc_team_worker(ptr %team, i64 %tid) {
entry:
  %shutdown = getelementptr inbounds i8, ptr %team, i64 $SHUTDOWN
  %entry_slot = getelementptr inbounds i8, ptr %team, i64 $ENTRY
  %args_slot = getelementptr inbounds i8, ptr %team, i64 $ARGS
  %nthreads_slot = getelementptr inbounds i8, ptr %team, i64 $NTHREADS
  br label %wait
wait:
  %seen = phi i64 [ 0, %entry ], [ %sequence, %work ]
  %sequence = call i64 @await_job(ptr %team, i64 %tid, i64 %seen)
  %stop = load atomic i64, ptr %shutdown monotonic, align 8
  %quit = icmp ne i64 %stop, 0
  br i1 %quit, label %exit, label %work
work:
  %job_entry = load ptr, ptr %entry_slot, align 8
  %job_args = load ptr, ptr %args_slot, align 8
  %job_nthreads = load i64, ptr %nthreads_slot, align 8
  call void %job_entry(ptr %job_args, i64 %tid, i64 %job_nthreads)
  call void @report_done(ptr %team)
  br label %wait
exit:
  ret void
}
""")

# Spin-wait hints per architecture; elsewhere the spin loop simply runs without one.
_RELAX_BY_ARCH = {
    "x86_64": ("declare void @llvm.x86.sse2.pause()", "call void @llvm.x86.sse2.pause()"),
    "aarch64": ("declare void @llvm.aarch64.hint(i32)", "call void @llvm.aarch64.hint(i32 1)"),
}


def team_ir(triple: str) -> str:
    """The LLVM IR of the fork/join functions for a target triple."""
    relax_declaration, relax_call = _RELAX_BY_ARCH.get(triple.split("-")[0], ("", ""))
    return _TEAM_IR.substitute(
        relax_declaration=relax_declaration,
        relax_call=relax_call,
        SHUTDOWN=SHUTDOWN,
        ENTRY=ENTRY,
        ARGS=ARGS,
        NTHREADS=NTHREADS,
        REMAINING=REMAINING,
        CALLER_SLEEPING=CALLER_SLEEPING,
        MUTEX=MUTEX,
        START_COND=START_COND,
        DONE_COND=DONE_COND,
        MAILBOXES=MAILBOXES,
        MAILBOX_BYTES=MAILBOX_BYTES,
        SPIN_ITERATIONS=SPIN_ITERATIONS,
        YIELD_AFTER=YIELD_AFTER,
        YIELD_EVERY=YIELD_EVERY,
    )


class TeamFunctions:
    """ctypes entry points of the compiled fork/join code (addresses are plain ints)."""

    def __init__(self, library: NativeLibrary):
        self.library = library  # keeps the code mapped while the functions exist
        self.init = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_void_p)(library.address("graphc_team_init"))
        self.destroy = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(library.address("graphc_team_destroy"))
        self.run = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)(
            library.address("graphc_team_run")
        )
        self.shutdown = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64)(
            library.address("graphc_team_shutdown")
        )
        self.worker = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64)(library.address("graphc_team_worker"))


@functools.cache
def team_functions() -> TeamFunctions:
    """The fork/join code for this host, once per process (see `native_ir.library_from_ir`)."""
    from .native_ir import library_from_ir   # LLVM only here: a saved artifact brings this code
    return TeamFunctions(library_from_ir("graphc-team", team_ir(host_target().triple), __file__))
