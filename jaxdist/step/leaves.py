"""What an experiment's params and model state must be, checked before the first step.

The step differentiates the params and the optimizer keeps a state per leaf, so every
params leaf must be a floating-point array; the model state is carried from step to step,
so its leaves must be arrays and its structure must not change. A model of another
library handed over as it is (an NNX module, an equinox module with its static fields)
fails these checks, and the message names the adapter that turns it into such trees.
"""

from __future__ import annotations

import sys
from typing import Any

import jax
import numpy as np

from jaxdist.base.errors import UserError
from jaxdist.base.pytree import PyTree

NNX_FIX = ("use jaxdist.from_nnx(make_model, loss_fn, ...), which trains the module's "
           "nnx.Param state and carries the rest")
EQUINOX_FIX = ("use jaxdist.from_equinox(make_model, loss_fn, ...), which trains the "
               "module's arrays and keeps its other fields static")


def library_of(value: Any) -> str | None:
    """"nnx" or "equinox" when `value` is a module or variable of that library, else None.

    Neither library is imported here: a value can only be one of theirs when its library
    was imported already.
    """
    nnx = sys.modules.get("flax.nnx")
    if nnx is not None and isinstance(value, (nnx.Module, nnx.Variable)):
        return "nnx"
    eqx = sys.modules.get("equinox")
    if eqx is not None and isinstance(value, eqx.Module):
        return "equinox"
    return None


def _is_library_node(value: Any) -> bool:
    return library_of(value) is not None


def _is_nnx_node(value: Any) -> bool:
    # An NNX node is reported whole; an equinox module is a pytree whose leaves are checked.
    return library_of(value) == "nnx"


def _where(path: tuple) -> str:
    return jax.tree_util.keystr(path) or "(the root)"


def _fix_for(tree: PyTree) -> str:
    """The adapter to name for a tree of another library's nodes, or the plain advice."""
    libraries = {library_of(node) for node in jax.tree.leaves(tree, is_leaf=_is_library_node)}
    if "nnx" in libraries:
        return NNX_FIX
    if "equinox" in libraries:
        return EQUINOX_FIX
    return "return a dict (or any pytree) of jnp arrays"


def check_params(params: PyTree, what: str = "init_params") -> None:
    """Refuse params that the step cannot differentiate and update, in one line.

    Every leaf must be a floating-point array (jax or numpy); an NNX module or variable,
    a function, a Python number or an integer array is named by its path.
    """
    fix = _fix_for(params)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_nnx_node)[0]:
        library = library_of(leaf)
        if library == "nnx":
            raise UserError(f"{what} returned an NNX {type(leaf).__name__} at {_where(path)}, "
                            f"not arrays; {NNX_FIX}")
        if not isinstance(leaf, (jax.Array, np.ndarray, np.generic)):
            raise UserError(f"{what} returned a {type(leaf).__name__} at {_where(path)}, not "
                            f"an array: every params leaf is trained, so it must be a float "
                            f"array; {fix}")
        dtype = np.dtype(leaf.dtype) if not jax.dtypes.issubdtype(
            leaf.dtype, jax.dtypes.prng_key) else None
        if dtype is None or not np.issubdtype(dtype, np.inexact):
            raise UserError(f"{what} returned a {leaf.dtype} array at {_where(path)}: "
                            f"gradients train only floating-point params; keep counters, "
                            f"keys and other state in init_model_state, or {fix}")


def check_model_state(model_state: PyTree, what: str = "init_model_state") -> None:
    """Refuse a model state whose leaves are not arrays, in one line naming the leaf."""
    fix = _fix_for(model_state)
    for path, leaf in jax.tree_util.tree_flatten_with_path(model_state,
                                                           is_leaf=_is_nnx_node)[0]:
        if library_of(leaf) == "nnx":
            raise UserError(f"{what} returned an NNX {type(leaf).__name__} at {_where(path)}, "
                            f"not arrays; {NNX_FIX}")
        if not isinstance(leaf, (jax.Array, np.ndarray, np.generic)):
            raise UserError(f"{what} returned a {type(leaf).__name__} at {_where(path)}, not "
                            f"an array; {fix}")


def _described(tree: PyTree) -> list[tuple[str, tuple, Any]]:
    return [(_where(path), tuple(np.shape(leaf)), getattr(leaf, "dtype", type(leaf)))
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def check_same_structure(new: PyTree, old: PyTree, what: str = "model state") -> None:
    """Refuse (one line, at trace time) a new model state shaped unlike the one it replaces.

    The step carries the state to the next step, saves it and selects between it and the
    old one leaf by leaf, so its keys, shapes and dtypes must stay as `init_model_state`
    made them (a module that adds a variable, or sows intermediates, as it runs changes them).
    """
    before, after = _described(old), _described(new)
    if before == after and jax.tree.structure(new) == jax.tree.structure(old):
        return
    paths_before = {path for path, _, _ in before}
    paths_after = {path for path, _, _ in after}
    if paths_after - paths_before:
        change = f"{sorted(paths_after - paths_before)[0]} appeared"
    elif paths_before - paths_after:
        change = f"{sorted(paths_before - paths_after)[0]} disappeared"
    else:
        change = next((f"{a[0]} changed from {b[2]}{list(b[1])} to {a[2]}{list(a[1])}"
                       for a, b in zip(after, before, strict=True) if a != b),
                      "its tree structure changed")
    raise UserError(f"the {what} returned by loss_fn is not shaped as init_model_state made "
                    f"it: {change}; return the state with the same entries, shapes and "
                    f"dtypes (create every variable when the model is built, and do not "
                    f"sow intermediates in training)")


def closed_over_module(fn: Any, depth: int = 3) -> tuple[str, str] | None:
    """The name and library of an NNX or equinox module with arrays that `fn` closes over.

    A loss that uses such a module rather than the params it is given computes with
    constants: the gradient never reaches the module's arrays and the update never
    changes them. Looks through closures, `functools.partial` and the globals a function
    names, `depth` functions deep, skipping the functions of jax and the model libraries.
    """
    seen: set[int] = set()

    def arrays_in(value: Any) -> bool:
        return any(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(value))

    def search(fn: Any, depth: int) -> tuple[str, str] | None:
        if id(fn) in seen or depth < 0:
            return None
        seen.add(id(fn))
        values: list[tuple[str, Any]] = []
        func = getattr(fn, "func", None)
        if func is not None and hasattr(fn, "args"):  # functools.partial
            values += [("a partial argument", v) for v in (*fn.args, *fn.keywords.values())]
            values.append(("the partial's function", func))
        code = getattr(fn, "__code__", None)
        if code is not None:
            module = getattr(fn, "__module__", "") or ""
            if module.split(".")[0] in ("jax", "jaxlib", "flax", "optax", "equinox", "numpy"):
                return None
            cells = fn.__closure__ or ()
            values += [(name, cell.cell_contents) for name, cell in
                       zip(code.co_freevars, cells, strict=False) if _filled(cell)]
            globals_ = getattr(fn, "__globals__", {})
            values += [(name, globals_[name]) for name in code.co_names if name in globals_]
        for name, value in values:
            library = library_of(value)
            if library is not None and arrays_in(value):
                return name, library
            if callable(value) and library is None and not isinstance(value, type):
                found = search(value, depth - 1)
                if found is not None:
                    return found
        return None

    return search(fn, depth)


def _filled(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018 (an empty cell raises)
    except ValueError:
        return False
    return True


def check_loss_closure(fn: Any, what: str = "loss_fn") -> None:
    """Refuse a loss that closes over a module with arrays of its own, naming the module."""
    found = closed_over_module(fn)
    if found is None:
        return
    name, library = found
    fix = NNX_FIX if library == "nnx" else EQUINOX_FIX
    raise UserError(f"{what} closes over {name!r}, an {'NNX' if library == 'nnx' else 'equinox'} "
                    f"module with arrays of its own: the step would compute with them as "
                    f"constants and never update them; {fix}, so that the loss gets the "
                    f"module back from the trained params")
