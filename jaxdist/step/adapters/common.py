"""What both adapters share: explanation specs and losses that take the user's module."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from jaxdist.base.pytree import PyTree
from jaxdist.step.experiment import ExplainSpec

ModuleOf = Callable[[PyTree, PyTree], Any]  # (params, model_state) -> the module, eval mode


def explain_on_module(spec: ExplainSpec | None, module_of: ModuleOf) -> ExplainSpec | None:
    """`spec`, whose functions take the module, as the core calls them (params, state).

    With an adapter, `ExplainSpec.output(module, features)`, `features(module, raw)` and
    `coefficients(module)` get the module in evaluation mode in place of the params (and
    the model state).
    """
    if spec is None:
        return None
    output, features, coefficients = spec.output, spec.features, spec.coefficients
    return dataclasses.replace(
        spec,
        output=lambda params, model_state, x: output(module_of(params, model_state), x),
        features=None if features is None else (
            lambda params, raw: features(module_of(params, None), raw)),
        coefficients=None if coefficients is None else (
            lambda params: coefficients(module_of(params, None))))
