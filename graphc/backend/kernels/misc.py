"""Native kernels for the ops that are neither GEMM, convolution nor elementwise: one import
point for the program assembler.

  * reductions (`emit_sum`): reduce_kernels.py
  * softmax, softmax cross-entropy, one-hot: softmax_kernels.py
  * copy, broadcast, transpose: layout_kernels.py

Each emitter returns a `Kernel` (see kernel.py): float32 buffers (int32 labels), shapes fixed
at generation time, phases callable by up to `max_threads` threads.
"""
from graphc.backend.kernels.layout import emit_broadcast_copy, emit_copy, emit_transpose
from graphc.backend.kernels.reduce import emit_sum
from graphc.backend.kernels.softmax import emit_one_hot, emit_softmax, emit_softmax_cross_entropy

__all__ = ["emit_sum", "emit_softmax", "emit_softmax_cross_entropy", "emit_one_hot",
           "emit_transpose", "emit_broadcast_copy", "emit_copy"]
