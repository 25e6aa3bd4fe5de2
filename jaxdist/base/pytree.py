"""The one name for a nested structure of arrays (what jax calls a pytree)."""

from typing import Any

PyTree = Any  # dicts, lists, tuples, named tuples and dataclasses of arrays, nested
