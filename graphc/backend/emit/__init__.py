"""The layer kernels are written in: an IR builder over generic LLVM vectors (kernel_builder),
sympy expressions lowered to vector code (expr), a kernel's phase functions (kernel) and the
program's entry with its barriers (entry)."""
