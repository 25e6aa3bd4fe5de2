"""The per-device step and its math.

The train and eval steps built from an experiment's loss, the losses, optimizers and
precision, and the bundled flax models (`jaxdist.step.models`).
"""
