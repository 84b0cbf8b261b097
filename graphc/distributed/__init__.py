"""Data-parallel training on MPI: the pieces `compile_training_step(..., comm=)` and
`graphc.tools.train.train(..., comm=)` use. mpi4py is imported only when a communicator is given."""
