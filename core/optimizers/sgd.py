"""SGD: w = w - lr * g, with momentum or Nesterov momentum, exactly as Keras 3 computes it."""
import tensorflow as tf

from core.optimizers import Optimizer


class SGD(Optimizer):
    """Stochastic gradient descent, as Keras 3 computes it.

    momentum = 0:   w = w - lr * g
    momentum > 0:   velocity = momentum * velocity - lr * g
                    w = w + velocity                                  (nesterov=False)
                    w = w + momentum * velocity - lr * g              (nesterov=True, velocity already updated)
    One `velocity` slot per variable (shape of the variable), only when momentum > 0.
    """

    def __init__(self, learning_rate, momentum=0.0, nesterov=False, name=None):
        super().__init__(learning_rate, name=name or "sgd")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
            raise ValueError(f"SGD: momentum must be a number in [0, 1], got {momentum!r}")
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)
        self.velocity = []

    def _create_slots(self, variables):
        if self.momentum != 0.0:
            self.velocity = [tf.Variable(tf.zeros_like(w), trainable=False, name="velocity") for w in variables]

    def _update(self, g, w, i, learning_rate):
        if self.momentum == 0.0:
            w.assign_sub(g * learning_rate)
            return
        velocity = self.velocity[i]
        velocity.assign(velocity * self.momentum - g * learning_rate)
        if self.nesterov:
            w.assign_add(velocity * self.momentum - g * learning_rate)
        else:
            w.assign_add(velocity)
