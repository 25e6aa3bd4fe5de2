"""Typed experiment configuration.

Its sections, `KEY=VALUE` overrides, JSON, validation and the keys a resumed run may change.
The names below are the package's public ones.
"""

from jaxdist.base.config.checks import MAX_STEPS, validate
from jaxdist.base.config.overrides import (
    apply_overrides,
    check_core_overrides,
    describe_keys,
    leaf_keys,
    parse_value,
)
from jaxdist.base.config.saved import (
    EXPERIMENT_DIGEST_KEY,
    EXPERIMENT_KEY,
    RESUMABLE_KEYS,
    check_allowed_changes,
    flatten,
    from_dict,
    resume_conflicts,
    to_dict,
    to_json,
)
from jaxdist.base.config.sections import (
    ALIASES,
    CheckpointConfig,
    Config,
    EarlyStoppingConfig,
    LoaderConfig,
    OptimizerConfig,
    ParallelConfig,
    TrackingConfig,
    TrainConfig,
)

__all__ = [
    "ALIASES", "EXPERIMENT_DIGEST_KEY", "EXPERIMENT_KEY", "MAX_STEPS", "RESUMABLE_KEYS",
    "CheckpointConfig", "Config", "EarlyStoppingConfig", "LoaderConfig", "OptimizerConfig",
    "ParallelConfig", "TrackingConfig", "TrainConfig", "apply_overrides", "check_allowed_changes",
    "check_core_overrides",
    "describe_keys", "flatten", "from_dict", "leaf_keys", "parse_value", "resume_conflicts",
    "to_dict", "to_json", "validate",
]
