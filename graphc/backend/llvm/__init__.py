"""The LLVM driver: the target machine (target), modules compiled to object code while the next
is generated (parallel, with worker processes: worker_process, object_worker), and how a
program's kernels are split into modules (program_modules)."""
