"""Models of other libraries as experiments: `from_nnx` (Flax NNX) and `from_equinox`.

Each adapter turns the user's module into the pieces an `Experiment` takes (a params tree
of arrays, the model state, a pure loss over them) and hands the module back, merged from
the trained params, to the user's loss on each device. The libraries are imported by the
adapter's own module, when it is used.
"""
