"""The course and tools layer, on top of the public API: data sets, the training loop, classic
classifiers, features, the demo, plots, checkpoints and the command line."""
