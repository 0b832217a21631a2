"""Schedules: monotone where they should be, start and end at the configured levels."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import purecomp as pc
from purecomp.errors import ConfigError
from purecomp.schedules import AdaptiveLevel, adaptive_step, exponential, multistep, polynomial

PROPERTY = settings(max_examples=100)  # on top of the profile tests/conftest.py loads

levels = st.floats(0.0, 0.95)


def ordered(a, b):
    return (min(a, b), max(a, b))


@PROPERTY
@given(levels, levels, st.integers(1, 50), st.floats(0.5, 6.0), st.booleans())
def test_polynomial_starts_ends_and_is_monotone(a, b, target_epoch, power, concave):
    init, target = ordered(a, b)
    schedule = polynomial(init, target, target_epoch, power, concave)
    values = [schedule(pc.Progress(epoch=e)) for e in range(target_epoch + 5)]
    assert values[0] == pytest.approx(init)
    assert values[target_epoch] == pytest.approx(target) and values[-1] == pytest.approx(target)
    assert all(v2 >= v1 - 1e-12 for v1, v2 in zip(values, values[1:]))


@PROPERTY
@given(levels, levels, st.integers(1, 50))
def test_exponential_starts_ends_and_is_monotone(a, b, target_epoch):
    init, target = ordered(a, b)
    schedule = exponential(init, target, target_epoch)
    values = [schedule(pc.Progress(epoch=e)) for e in range(target_epoch + 5)]
    assert values[0] == pytest.approx(init)
    assert values[target_epoch] == pytest.approx(target) and values[-1] == pytest.approx(target)
    assert all(v2 >= v1 - 1e-12 for v1, v2 in zip(values, values[1:]))


@PROPERTY
@given(st.lists(levels, min_size=1, max_size=5).map(sorted), st.data())
def test_multistep_switches_at_the_configured_epochs(levels_, data):
    steps = sorted(data.draw(st.sets(st.integers(1, 40), min_size=len(levels_) - 1, max_size=len(levels_) - 1)))
    schedule = multistep(steps, levels_)
    assert schedule(pc.Progress(epoch=0)) == levels_[0]
    for i, s in enumerate(steps):
        assert schedule(pc.Progress(epoch=s)) == levels_[i + 1]
        assert schedule(pc.Progress(epoch=s - 1)) == levels_[i]


def test_per_optimizer_step_updates_use_the_fractional_epoch():
    schedule = polynomial(0.0, 0.5, 2, power=1, concave=False, update_per_optimizer_step=True, steps_per_epoch=10)
    assert schedule(pc.Progress(step=5, epoch=0)) == pytest.approx(0.125)
    assert schedule(pc.Progress(step=10, epoch=1)) == pytest.approx(0.25)
    by_epoch = polynomial(0.0, 0.5, 2, power=1, concave=False)
    assert by_epoch(pc.Progress(step=5, epoch=0)) == 0.0


def test_adaptive_raises_the_level_after_patience_epochs_of_small_loss():
    state = AdaptiveLevel(0.1, 2)
    state = adaptive_step(state, 0.5, target=0.3, patience=2)  # loss too big: wait
    assert state == AdaptiveLevel(0.1, 2)
    state = adaptive_step(state, 1e-4, target=0.3, patience=2)
    assert state.level == 0.1
    state = adaptive_step(state, 1e-4, target=0.3, patience=2)
    assert state.level == pytest.approx(0.15)
    for _ in range(20):
        state = adaptive_step(state, 1e-4, target=0.3, patience=2)
    assert state.level == pytest.approx(0.3)


@pytest.mark.parametrize(
    "call, path",
    [
        (lambda: polynomial(0.0, 1.0, 3), "sparsity_target"),
        (lambda: polynomial(-0.1, 0.5, 3), "sparsity_init"),
        (lambda: polynomial(0.0, 0.5, 0), "sparsity_target_epoch"),
        (lambda: exponential(0.0, 1.5, 3), "sparsity_target"),
        (lambda: multistep([2, 1], [0.1, 0.2, 0.3]), "multistep_steps"),
        (lambda: multistep([1, 2], [0.1, 0.2]), "multistep_sparsity_levels"),
    ],
)
def test_bad_schedule_settings_raise(call, path):
    with pytest.raises(ConfigError, match=path):
        call()
