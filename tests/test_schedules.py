"""ExponentialDecay against keras.optimizers.schedules.ExponentialDecay and the codelab's two rules."""
import math

import numpy as np
import pytest
import tensorflow as tf

keras = pytest.importorskip("keras")

from core import schedules  # noqa: E402

STEPS = np.array([0, 1, 2, 99, 100, 101, 599, 600, 601, 1234, 5000, 12345, 60000], np.int64)


@pytest.mark.parametrize("staircase", [False, True])
def test_matches_keras_exponential_decay(staircase):
    ours = schedules.ExponentialDecay(0.02, 0.666, 600, staircase=staircase)
    theirs = keras.optimizers.schedules.ExponentialDecay(0.02, decay_steps=600, decay_rate=0.666,
                                                         staircase=staircase)
    for step in STEPS:
        a = ours(tf.constant(step, tf.int64))
        assert a.dtype == tf.float32
        np.testing.assert_array_equal(a.numpy(), theirs(tf.constant(step, tf.int64)).numpy())


def test_codelab_per_epoch_rule_with_minimum():
    """0.0001 + 0.02 * 0.666^epoch with 600 steps per epoch, constant within an epoch."""
    lr = schedules.ExponentialDecay(0.02, 0.666, 600, staircase=True, minimum=0.0001)
    for step in [0, 599, 600, 1199, 1200, 6000]:
        epoch = step // 600
        assert float(lr(step)) == pytest.approx(0.0001 + 0.02 * 0.666 ** epoch, rel=1e-6)
    assert float(lr(10**7)) == pytest.approx(0.0001, rel=1e-6)


def test_original_per_step_rule():
    """lr_min + lr_0 * e^(-step / k) with decay_rate = e^-1, decay_steps = k."""
    lr = schedules.ExponentialDecay(0.003, math.exp(-1), 2000, minimum=0.0001)
    for step in [0, 1, 1000, 2000, 7777]:
        assert float(lr(step)) == pytest.approx(0.0001 + 0.003 * math.exp(-step / 2000), rel=1e-6)


def test_follows_a_step_variable_inside_tf_function():
    step = tf.Variable(0, dtype=tf.int64)
    lr = schedules.ExponentialDecay(1.0, 0.5, 10, staircase=True)
    f = tf.function(lambda: lr(step))
    values = []
    for _ in range(25):
        values.append(float(f()))
        step.assign_add(1)
    assert values[:10] == [1.0] * 10 and values[10:20] == [0.5] * 10 and values[20] == 0.25


def test_constant():
    assert float(schedules.Constant(0.003)(tf.constant(5, tf.int64))) == pytest.approx(0.003)


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match="decay_steps must be > 0"):
        schedules.ExponentialDecay(0.1, 0.5, 0)
    with pytest.raises(ValueError, match="initial learning rate must be > 0"):
        schedules.ExponentialDecay(0.0, 0.5, 10)
    with pytest.raises(ValueError, match="minimum must be >= 0"):
        schedules.ExponentialDecay(0.1, 0.5, 10, minimum=-1.0)
    with pytest.raises(ValueError, match="learning rate must be > 0"):
        schedules.Constant(-0.1)
