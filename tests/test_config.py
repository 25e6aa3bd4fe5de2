from dataclasses import dataclass

import pytest

from jaxdist.base.config import Config, apply_overrides, leaf_keys, to_dict
from jaxdist.base.errors import UserError


@dataclass
class ModelSection:
    width: int = 4
    dropout: float = 0.0
    use_bias: bool = True


def base() -> Config:
    return Config(model=ModelSection())


def test_overrides_are_parsed_by_the_field_type():
    config = apply_overrides(base(), [
        "train.steps=250", "optimizer.learning_rate=3e-4", "parallel.backend=shard_map",
        "model.use_bias=false", "model.width=8", "parallel.grad_reduce=sum"])
    assert config.train.steps == 250
    assert config.optimizer.learning_rate == pytest.approx(3e-4)
    assert config.parallel.backend == "shard_map"
    assert config.model.use_bias is False and config.model.width == 8
    assert config.parallel.grad_reduce == "sum"


def test_overrides_do_not_touch_the_original():
    original = base()
    apply_overrides(original, ["train.steps=7"])
    assert original.train.steps == Config().train.steps


@pytest.mark.parametrize("word,value", [("full", 0), ("FULL", 0), ("0", 0), ("64", 64)])
def test_batch_size_accepts_full(word, value):
    assert apply_overrides(base(), [f"train.batch_size={word}"]).train.batch_size == value


def test_devices_accepts_all():
    assert apply_overrides(base(), ["parallel.devices=all"]).parallel.devices == 0


@pytest.mark.parametrize("override,fragment", [
    ("train.stepz=3", "did you mean train.steps"),
    ("train.steps=abc", "not an integer"),
    ("train.steps=1.5", "not an integer"),
    ("optimizer.learning_rate=fast", "not a number"),
    ("parallel.backend=gpu", "choose one of: pmap, shard_map"),
    ("model.use_bias=maybe", "not a boolean"),
    ("train=3", "is a section"),
    ("train.steps", "not KEY=VALUE"),
    ("train.steps=0", "train.steps=0 must be in [1, 2147483647]"),
    ("optimizer.learning_rate=-1", "must be > 0"),
    ("nothing.here=1", "unknown config key"),
    # Accepted before, impossible in meaning:
    ("optimizer.learning_rate=inf", "optimizer.learning_rate=inf must be a finite number"),
    ("optimizer.momentum=nan", "optimizer.momentum=nan must be a finite number"),
    ("optimizer.momentum=1.5", "optimizer.momentum=1.5 must be in [0, 1)"),
    ("optimizer.warmup_steps=-1", "optimizer.warmup_steps=-1 must be >= 0"),
    ("optimizer.weight_decay=-0.1", "optimizer.weight_decay=-0.1 must be >= 0"),
    ("train.steps=2147483648", "the step counter is a 32-bit integer"),
    ("train.seed=-1", "train.seed=-1 must be in [0, 2^32)"),
])
def test_bad_overrides_are_refused_with_one_line(override, fragment):
    with pytest.raises(UserError) as info:
        apply_overrides(base(), [override])
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_a_key_given_twice_is_refused_naming_both_values():
    with pytest.raises(UserError, match=r"train.steps is given twice \(train.steps=5, then "
                                        r"train.steps=7\)"):
        apply_overrides(base(), ["train.steps=5", "train.steps=7"])


def test_every_leaf_key_is_listed_and_saved():
    keys = leaf_keys(base())
    for key in ["train.steps", "train.batch_size", "train.seed", "train.log_every",
                "optimizer.name", "optimizer.learning_rate", "parallel.backend",
                "parallel.grad_reduce", "parallel.devices", "model.width"]:
        assert key in keys
    assert to_dict(base())["model"]["width"] == 4


def test_a_key_added_since_a_checkpoint_resumes_only_at_its_default():
    """A checkpoint saved before a config key existed: its absence means the default."""
    from jaxdist.base.config import Config, flatten, resume_conflicts, to_dict

    current = Config()
    saved = to_dict(current)
    del saved["optimizer"]["clip_norm"]  # as if saved before the key existed
    assert resume_conflicts(saved, current) == []
    current.optimizer.clip_norm = 1.0
    assert resume_conflicts(saved, current) == ["optimizer.clip_norm=(absent) there, 1.0 now"]
    assert "optimizer.clip_norm" not in flatten(saved)
