"""Flax models for the experiments. The core does not need them: any pytree of params fits."""
