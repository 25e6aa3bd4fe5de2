"""The train step as XLA sees it: lowered, compiled, and what its program holds.

For checks and reports that need the step without training it: the collectives of the
optimized program (what crosses devices, and how many elements), host round trips that
would stall a step (host callbacks, infeed/outfeed), the dtypes of the matrix products, and
XLA's own memory analysis.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from jaxdist.base.config import Config
from jaxdist.data import training_loader
from jaxdist.loop.start import Start, prepare_run, step_options
from jaxdist.parallel.backend import AXIS
from jaxdist.parallel.backends import make_backend
from jaxdist.parallel.layout import StateLayout
from jaxdist.step.experiment import Experiment
from jaxdist.step.optimizers import build_optimizer, fix_schedule_horizon
from jaxdist.step.steps import TrainState, make_train_step

# Instructions of an optimized HLO module that move data between devices.
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
               "collective-permute", "collective-broadcast", "send", "recv")
# Instructions that make a step wait for the host.
HOST_ROUND_TRIPS = ("infeed", "outfeed", "host-compute")
_HOST_CALLBACK = re.compile(r'custom_call_target="[^"]*callback[^"]*"', re.IGNORECASE)
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>\(.*?\)|\S+)\s+(?P<op>[a-z\-]+)(?P<rest>\(.*)$")
_ARRAY = re.compile(r"(?P<dtype>[a-z]+[0-9]*)\[(?P<dims>[0-9,]*)\]")


@dataclass(frozen=True)
class Instruction:
    """One instruction of an HLO module: its op, and the arrays its result holds."""

    op: str
    arrays: tuple[tuple[str, tuple[int, ...]], ...]  # (dtype, shape) of each result array

    @property
    def elements(self) -> int:
        """How many elements its result holds (all arrays of a tuple together)."""
        return sum(int(np.prod(shape)) for _, shape in self.arrays)


def instructions(hlo_text: str) -> list[Instruction]:
    """Every instruction of an HLO module's text (`Compiled.as_text()`)."""
    found = []
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if match is None:
            continue
        arrays = tuple((m["dtype"], tuple(int(d) for d in m["dims"].split(",") if d))
                       for m in _ARRAY.finditer(match["shape"]))
        found.append(Instruction(match["op"], arrays))
    return found


def collectives(hlo_text: str) -> list[Instruction]:
    """The cross-device instructions (an async pair `*-start`/`*-done` counts once)."""
    return [i for i in instructions(hlo_text)
            if i.op in COLLECTIVES or (i.op.endswith("-start") and i.op[:-6] in COLLECTIVES)]


_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f16": 2, "bf16": 2, "s16": 2, "u16": 2, "f32": 4,
          "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}


def ring_traffic(hlo_text: str, devices: int) -> float:
    """Bytes each device sends per step for the program's collectives, done as rings.

    An all-reduce of B bytes sends 2(n-1)/n B; an all-gather of B bytes (its result) and a
    reduce-scatter of B bytes (its input, n times its result) send (n-1)/n B each.
    """
    if devices <= 1:
        return 0.0
    share = (devices - 1) / devices
    sent = 0.0
    for instruction in collectives(hlo_text):
        op = instruction.op.removesuffix("-start")
        nbytes = sum(int(np.prod(shape)) * _BYTES.get(dtype, 4)
                     for dtype, shape in instruction.arrays)
        if op == "all-reduce":
            sent += 2 * share * nbytes
        elif op == "all-gather":
            sent += share * nbytes
        elif op == "reduce-scatter":
            sent += share * nbytes * devices
    return sent


def host_round_trips(hlo_text: str) -> list[str]:
    """The instructions that would make a step wait for the host (callbacks, in/outfeed)."""
    found = [i.op for i in instructions(hlo_text) if i.op in HOST_ROUND_TRIPS]
    found += [m.group(0) for m in _HOST_CALLBACK.finditer(hlo_text)]
    return found


def lower_train_step(experiment: Experiment, config: Config) -> tuple[Any, Start]:
    """The run's train step lowered for its devices (`jax.stages.Lowered`), and its `Start`.

    Nothing is trained and no workdir is touched. `.compile()` gives the optimized program
    (`.as_text()`, `.memory_analysis()`); `.as_text()` the program before optimization.
    """
    start = prepare_run(experiment, config, None, False, ())
    backend, layout = start.backend, start.layout
    sharded = layout.sharded_or_none
    state = backend.placed_shapes(layout.split_shapes(start.host_state), sharded)
    return start.train_step.lower(state, backend.batch_shapes(start.loader.peek())), start


def lower_abstract_train_step(experiment: Experiment, config: Config) -> tuple[Any, Any]:
    """The run's train step lowered from the shapes of its state alone, and its layout.

    Unlike `lower_train_step`, no parameter is initialized (`jax.eval_shape`), so a model
    too large for this host's memory can be compiled for its memory analysis. The batch's
    shapes come from the experiment's loader.
    """
    config = fix_schedule_horizon(config)
    backend = make_backend(config.parallel.backend, config.parallel.devices)
    splits = config.parallel.shard != "none" and len(backend.global_devices) > 1
    tx = build_optimizer(config.optimizer, across=AXIS if splits else None,
                             devices=len(backend.global_devices))

    def fresh_state():
        init_key, state_key, train_key = jax.random.split(jax.random.key(0), 3)
        model_state = experiment.init_model_state(state_key) if experiment.has_state else None
        return TrainState.create(experiment.init_params(init_key), tx, train_key, model_state)

    state = jax.eval_shape(fresh_state)
    layout = StateLayout(config.parallel.shard, state, tx, backend)
    step = make_train_step(experiment.loss_fn, tx, layout.strategy(),
                           step_options(experiment, config), has_state=experiment.has_state)
    sharded = layout.sharded_or_none
    compiled = backend.compile(step, traced=True, sharded=sharded)
    shapes = backend.placed_shapes(layout.split_shapes(state), sharded)
    batch = training_loader(experiment.train_data, config, backend.num_devices,
                            experiment.train_transform).peek()
    return compiled.lower(shapes, backend.batch_shapes(batch)), layout


_MATMUL = re.compile(r"stablehlo\.(?P<op>dot_general|convolution)\b[^\n]*?:\s*"
                     r"\(tensor<(?P<lhs>[^>]*)>,\s*tensor<(?P<rhs>[^>]*)>\)")


_ALGORITHM = re.compile(r"lhs_precision_type = (?P<lhs>\w+), rhs_precision_type = (?P<rhs>\w+)")


def matmul_dtypes(lowered_text: str) -> list[tuple[str, str, str]]:
    """`(op, lhs dtype, rhs dtype)` of every dot and convolution of a lowered program.

    Read from the program before XLA optimizes it (`Lowered.as_text()`): that is what the
    model asked for; a backend may still change how it computes (XLA:CPU upcasts bf16). A
    dot with an explicit algorithm (JAX's attention backward pass multiplies float32
    probabilities this way) reports the types its operands are rounded to.
    """
    found = []
    for m in _MATMUL.finditer(lowered_text):
        algorithm = _ALGORITHM.search(m.group(0))
        if algorithm:  # operands are rounded to these types, whatever they are stored in
            found.append((m["op"], algorithm["lhs"], algorithm["rhs"]))
        else:
            found.append((m["op"], m["lhs"].split("x")[-1], m["rhs"].split("x")[-1]))
    return found
