"""The backend: from an optimized graph to a loaded native program.

    lowering      which kernel computes which node, with what fused in (kernel families register
                  their rules in kernels/)
    memory        the static memory plan: buffer lifetimes, reuse, in-place updates
    assemble      the schedule, the slots and the entry: a program's LLVM IR
    emit/         the IR-building layer the kernels are written in
    kernels/      the kernel families: GEMM, convolution, pooling, reductions, softmax, layouts...
    llvm/         the LLVM driver: the target, compiling modules to objects in parallel
    compiler      gc.compile and gc.compile_training_step, with the on-disk program cache
    costs         each kernel's FLOPs, by one rule per kernel family (bytes: Step.bytes_moved)
    profile       each kernel's measured time; gemm_peak the GEMM rate it is compared with
    finite_report the FloatingPointError of a check_finite program, built after the call stopped
    kernel_identity  which steps can call one kernel (repeated layers)
"""
