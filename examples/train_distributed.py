"""Data-parallel training on MPI: the digits CNN (batch norm, dropout) on every rank, each rank
training on its own shard with its part of the global batch, the gradients averaged by the
compiled step itself.

    mpiexec -n 2 python -m mpi4py examples/train_distributed.py [--epochs 10] [--checkpoint ckpt.npz]

`python -m mpi4py` makes an exception on one rank abort every rank (MPI_Abort) instead of
leaving the others waiting for its gradients. With --checkpoint, rank 0 writes the whole
training state after every epoch, and a run started again resumes from it. Rank 0 alone shows
the progress bar and writes the loss curves (graphc-out/distributed_curves.png).
"""
import argparse

from mpi4py import MPI

from graphc.core.optim import Adam
from graphc.tools import models
from graphc.tools.data import load_digits
from graphc.tools.train import train


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32, help="examples per rank and step")
    parser.add_argument("--checkpoint", default=None, help="a path: save after every epoch, resume if it exists")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    rank, ranks = comm.Get_rank(), comm.Get_size()

    digits = load_digits()
    result = train(models.digits_cnn, digits, epochs=args.epochs, batch_size=args.batch,
                   optimizer=Adam(lr=3e-3), schedule="cosine", comm=comm, checkpoint=args.checkpoint)
    if rank == 0:
        print(f"{ranks} ranks x {args.batch} examples per step: {args.epochs} epochs in {result.train_seconds:.2f} s "
              f"(+ {result.compile_seconds:.2f} s compiling); test accuracy "
              f"{1 - result.history[-1].test_error:.2%}")
        try:
            from graphc.tools.plots import plot_training_curves
            print(f"curves: {plot_training_curves(result.history, 'graphc-out/distributed_curves.png')}")
        except ImportError:            # matplotlib is in the demo extra
            pass


if __name__ == "__main__":
    main()
