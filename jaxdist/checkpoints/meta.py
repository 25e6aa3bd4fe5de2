"""What a run's checkpoint keeps besides its TrainState: `RunMeta`, typed.

The store adds its own keys to meta.json (`format`, `step`, `signature`, `split`: what a
restore needs, `jaxdist.checkpoints.integrity.STATE_META_SHAPE`); a run adds these, and
each hook with a `key` its own state under that key (`jaxdist.loop.hooks`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from jaxdist.checkpoints.integrity import STATE_META_SHAPE


@dataclass
class RunMeta:
    """Everything but the TrainState that a resumed run needs (JSON-able)."""

    loader: dict[str, int]  # the loader's position: {"epoch", "index"}
    identity: dict[str, Any]  # the experiment and its data's fingerprint
    devices: int  # how many devices trained it
    window: dict[str, Any]  # the metric window's partial sums since the last log point
    config: dict[str, Any]  # the config as run
    stop_reason: str  # "completed", "early_stopped" or "preempted"
    eval: dict[str, float] | None  # the evaluation of this step, if it had one
    hooks: dict[str, Any] = field(default_factory=dict)  # each keyed hook's state, by key

    def to_json(self) -> dict[str, Any]:
        """The keys meta.json holds (the hooks' states beside the run's own)."""
        own = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "hooks"}
        return {**own, **self.hooks}

    @classmethod
    def from_json(cls, meta: dict[str, Any]) -> RunMeta:
        """Read back what `to_json` wrote (the store's keys left aside)."""
        own = {f.name for f in fields(cls) if f.name != "hooks"}
        hooks = {key: value for key, value in meta.items()
                 if key not in own and key not in STATE_META_SHAPE}
        return cls(**{key: meta[key] for key in own}, hooks=hooks)
