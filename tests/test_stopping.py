import pytest

from jaxdist.base.errors import UserError
from jaxdist.loop.stopping import EarlyStopping, NonfiniteGuard


def first_stop(rule, values):
    for step, value in enumerate(values, start=1):
        if rule.update(step * 10, {"loss": value, "accuracy": -value}):
            return step * 10
    return None


def test_early_stopping_stops_after_patience_evaluations_without_improvement():
    sequence = [5.0, 4.0, 3.0, 3.5, 3.2, 2.9, 3.0, 3.1, 2.95, 4.0, 1.0]
    assert first_stop(EarlyStopping(patience=3), sequence) == 90
    assert first_stop(EarlyStopping(patience=2), sequence) == 50
    assert first_stop(EarlyStopping(patience=4), sequence) == 100
    assert first_stop(EarlyStopping(patience=0), sequence) is None
    rule = EarlyStopping(patience=3)
    first_stop(rule, sequence[:6])
    assert rule.best == 2.9 and rule.best_step == 60


def test_early_stopping_modes_and_min_delta():
    assert first_stop(EarlyStopping(patience=2, metric="accuracy", mode="max"),
                      [5.0, 4.0, 4.5, 4.2, 3.0]) == 40
    # improvements smaller than min_delta do not count
    assert first_stop(EarlyStopping(patience=2, min_delta=0.5), [5.0, 4.8, 4.6, 3.0]) == 30


def test_early_stopping_state_round_trips():
    sequence = [5.0, 4.0, 4.5, 4.2, 4.1, 3.0]
    whole = EarlyStopping(patience=3)
    split = EarlyStopping(patience=3)
    first_stop(split, sequence[:3])
    resumed = EarlyStopping(patience=3)
    resumed.restore(split.state())
    assert first_stop(whole, sequence) == 50
    assert [resumed.update(s, {"loss": v}) for s, v in [(40, 4.2), (50, 4.1)]] == [False, True]


def test_early_stopping_names_a_missing_metric():
    with pytest.raises(UserError, match="choose one of: loss"):
        EarlyStopping(patience=1, metric="acc").update(1, {"loss": 1.0})


def test_nonfinite_guard_counts_runs_in_a_row():
    guard = NonfiniteGuard(limit=3)
    assert [guard.update(bad) for bad in [True, True, False, True, True, True]] == [
        False, False, False, False, False, True]
    assert guard.run == 3
    assert not any(NonfiniteGuard(limit=0).update(True) for _ in range(5))  # 0 never stops
