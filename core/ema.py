"""An exponential moving average of the weights, kept beside them (Keras's optimizer use_ema, no overwrite):

    after each update:   ema_w <- d * ema_w + (1 - d) * w        for each trainable w
                         (the first update of a run copies w: ema_w <- w, as Keras does)

The raw weights w keep training; `swapped_in()` puts the averages into the model while evaluating or
exporting, then puts w back bit for bit. The averages are part of a run's state (Runner.state()), so a
resumed run continues them exactly.
"""
import contextlib

import tensorflow as tf

__all__ = ["MovingAverage"]


class MovingAverage(tf.Module):
    """ema_w for each of `variables` (create it under the strategy's scope), decay d in [0, 1). It holds only the
    averages (a checkpoint of it saves those); each method takes the same `variables` it was made for."""

    def __init__(self, decay, variables):
        super().__init__(name="ema")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must be in [0, 1), got {decay!r}")
        self.decay = float(decay)
        self.averages = [tf.Variable(variable.read_value(), trainable=False, name="average")
                         for variable in variables]

    def update(self, variables, first):
        """ema_w <- m * ema_w + (1 - m) * w, m = 0 on a run's first update (`first`, bool tensor), else d."""
        for variable, average in zip(variables, self.averages):
            momentum = tf.cast(tf.logical_not(first), variable.dtype) * self.decay
            average.assign(momentum * average + (1 - momentum) * variable)

    def assign_to(self, variables):
        """w <- ema_w for each of `variables`: the model takes the averages for good."""
        for variable, average in zip(variables, self.averages):
            variable.assign(average)

    @contextlib.contextmanager
    def swapped_in(self, variables):
        """The averages in `variables` for the duration of the block; the raw weights restored after."""
        raw = [tf.identity(variable.read_value()) for variable in variables]
        self.assign_to(variables)
        try:
            yield
        finally:
            for variable, value in zip(variables, raw):
                variable.assign(value)
