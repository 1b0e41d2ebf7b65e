"""Gradient accumulation: one update from the gradients of K batches.

    batches 1 .. K-1:   s_i <- s_i + g_i          (add; no update, no communication)
    batch K:            g_i <- (s_i + g_i) / K    (mean), s_i <- 0

With K batches of B examples and a loss that is a mean over its batch, the mean of the K batch gradients is
the gradient of the mean loss over the K * B examples: the update of one batch of K * B (up to float32
rounding; BatchNorm normalizes each batch of B with its own statistics, and dropout draws other masks).
The loss is averaged the same way. Under a tf.distribute strategy each replica sums its own slices (ON_READ
variables, no collective); the mean is all-reduced once per update, after `mean`.

The sums are zero at every update boundary, which is where the training loop stops, saves and resumes, so
they are not part of a checkpoint.
"""
import tensorflow as tf

__all__ = ["GradientSum"]


def _local(initial, name):
    """A variable each replica of a strategy updates on its own (no communication); a plain one without."""
    return tf.Variable(initial, trainable=False, name=name, synchronization=tf.VariableSynchronization.ON_READ,
                       aggregation=tf.VariableAggregation.SUM)


class GradientSum(tf.Module):
    """The running sum of the loss and the gradients of the first K - 1 batches of an update (create it under the
    strategy's scope, for `variables` [w_i])."""

    def __init__(self, steps, variables):
        super().__init__(name="gradient_sum")
        self.steps = int(steps)
        self.loss = _local(tf.zeros([], tf.float32), "loss")
        self.gradients = [_local(tf.zeros_like(variable), "gradient") for variable in variables]

    def add(self, loss, gradients):
        """s <- s + g for the loss and each gradient (batches 1 .. K-1 of an update)."""
        self.loss.assign_add(tf.cast(loss, tf.float32))
        for total, gradient in zip(self.gradients, gradients):
            total.assign_add(tf.cast(gradient, total.dtype))

    def mean(self, loss, gradients):
        """(L, [g_i]) of the update's last batch -> the means over its K batches; the sums back to zero."""
        steps = float(self.steps)
        loss = (self.loss.read_value() + tf.cast(loss, tf.float32)) / steps
        means = [(total.read_value() + tf.cast(gradient, total.dtype)) / steps
                 for total, gradient in zip(self.gradients, gradients)]
        with tf.control_dependencies([loss] + means):
            self.loss.assign(tf.zeros_like(self.loss))
            for total in self.gradients:
                total.assign(tf.zeros_like(total))
        return loss, means
