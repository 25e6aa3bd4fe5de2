"""The typed sections of a config: train, optimizer, parallel, loader, checkpoint, tracking.

A config is a tree of dataclasses. The core sections are defined here; an experiment may
add its own dataclasses under `model` and `data`. Every leaf has a type annotation, by
which an override is parsed (`jaxdist.base.config.overrides`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

# Field metadata key: words accepted in place of a value, e.g. {"full": 0} for batch_size.
ALIASES = "aliases"


@dataclass
class EarlyStoppingConfig:
    """Stop when an evaluation metric has not improved for `patience` evaluations."""

    patience: int = 0  # 0 turns early stopping off
    metric: str = "loss"  # a key of the eval split's logged metrics
    mode: Literal["min", "max"] = "min"
    min_delta: float = 0.0  # smaller improvements do not count


@dataclass
class TrainConfig:
    """How long to train, and how often to report, evaluate and save."""

    steps: int = 100
    # Global batch over all devices; 0 (or "full") means the whole training set every step.
    batch_size: int = field(default=0, metadata={ALIASES: {"full": 0}})
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end
    checkpoint_every: int = 1000  # a checkpoint is also saved at the end and on preemption
    # A step whose global gradient is not finite is skipped on every device; this many in a
    # row stop the run with an error (0 never stops it).
    max_nonfinite: int = 10
    skip_nonfinite: bool = True
    # How a skipped step keeps the state: cond (a branch; the finite path touches nothing
    # extra) or where (a select over every parameter; no branch). Bit-identical results.
    skip_with: Literal["cond", "where"] = "cond"
    # bf16: compute in bfloat16, keep params and optimizer state in float32.
    precision: Literal["fp32", "bf16"] = "fp32"
    # Split each device's batch into this many micro-batches, one update for all of them.
    grad_accum: int = 1
    # Log grad_norm (before clipping), param_norm and update_norm on every train point.
    log_norms: bool = True
    # START:COUNT: a jax.profiler trace of steps START to START+COUNT-1 in WORKDIR/profile/,
    # on process 0 (on every process with profile_all_processes); "": none.
    profile_steps: str = ""
    profile_all_processes: bool = False
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)


@dataclass
class OptimizerConfig:
    """Which optax transformation updates the parameters, and its learning-rate schedule."""

    name: Literal["sgd", "momentum", "adam", "adamw", "lamb"] = "sgd"
    learning_rate: float = 0.1  # the peak rate of a schedule
    momentum: float = 0.9
    weight_decay: float = 0.0
    # constant; warmup_cosine: linear warmup, then cosine decay to final_fraction * rate;
    # step: multiply the rate by step_factor every step_every steps.
    schedule: Literal["constant", "warmup_cosine", "step"] = "constant"
    warmup_steps: int = 0
    decay_steps: int = 0  # 0: decay over train.steps
    final_fraction: float = 0.0
    step_every: int = 0
    step_factor: float = 0.1
    clip_norm: float = 0.0  # global-norm gradient clipping; 0 turns it off


@dataclass
class ParallelConfig:
    """How the per-device step is mapped over devices and how gradients are combined."""

    backend: Literal["pmap", "shard_map"] = "pmap"
    grad_reduce: Literal["mean", "sum"] = "mean"
    # ZeRO: what is split over the devices instead of copied on each (jaxdist.parallel.layout):
    # none; optimizer (its state); gradients (and the reduced gradient); params (all three).
    shard: Literal["none", "optimizer", "gradients", "params"] = "none"
    # How many local devices to use; 0 (or "all") means every local device.
    devices: int = field(default=0, metadata={ALIASES: {"all": 0}})


@dataclass
class LoaderConfig:
    """How training examples are ordered and fed to the devices."""

    shuffle: bool = True
    # Skip the incomplete last batch of an epoch; false pads it with weight-0 rows instead.
    drop_remainder: bool = True
    # balanced: draw examples with replacement so that every class (by label_key) is equally
    # likely; uniform: every example once per epoch.
    sampling: Literal["uniform", "balanced"] = "uniform"
    label_key: str = "label"
    prefetch: int = 2  # batches kept placed on the devices ahead of the step


@dataclass
class CheckpointConfig:
    """Which checkpoints are kept."""

    keep: int = 3  # the most recent ones kept, besides the best
    best_metric: str = "loss"  # eval metric that picks the best checkpoint; "" for none
    best_mode: Literal["min", "max"] = "min"
    # Write checkpoints in a background thread while training goes on (the state is first
    # copied to host memory, so a save holds one extra copy of it there until written).
    background: bool = True


@dataclass
class TrackingConfig:
    """Experiment trackers that get every logged point, besides metrics.jsonl and TensorBoard."""

    # An MLflow tracking URI (http://127.0.0.1:5000, or a database URI such as
    # sqlite:///mlflow.db); "" turns MLflow off. Needs `pip install "jaxdist[mlflow]"`.
    mlflow: str = ""
    mlflow_experiment: str = ""  # the MLflow experiment; "": the jaxdist experiment's name
    # A Weights & Biases project; "" turns W&B off. Needs `pip install "jaxdist[wandb]"`; W&B's
    # own settings (WANDB_MODE=offline, WANDB_API_KEY, WANDB_DIR, ...) apply.
    wandb: str = ""
    wandb_entity: str = ""  # the W&B entity (user or team); "": W&B's default
    run_name: str = ""  # the tracker run's name; "": the workdir's folder name


@dataclass
class Config:
    """A whole experiment configuration: core sections plus the experiment's own."""

    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    model: Any = None
    data: Any = None


