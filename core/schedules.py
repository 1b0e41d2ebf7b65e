"""Learning-rate schedules: tf.Modules mapping the optimizer's step (int64) to a float32 learning rate."""
import tensorflow as tf


class ExponentialDecay(tf.Module):
    """lr(step) = minimum + initial * decay_rate ^ (step / decay_steps)  (step / decay_steps floored if staircase).

    The codelab's per-epoch rule 0.0001 + 0.02 * 0.666^epoch is
    ExponentialDecay(0.02, 0.666, decay_steps=steps_per_epoch, staircase=True, minimum=0.0001);
    the original per-step rule lr_min + lr_0 * e^(-step / k) is ExponentialDecay(lr_0, e^-1, k, minimum=lr_min).
    With minimum = 0 this is exactly keras.optimizers.schedules.ExponentialDecay (same float32 ops).
    """

    def __init__(self, initial, decay_rate, decay_steps, staircase=False, minimum=0.0, name=None):
        super().__init__(name=name or "exponential_decay")
        if not initial > 0:
            raise ValueError(f"ExponentialDecay: initial learning rate must be > 0, got {initial!r}")
        if not decay_rate > 0:
            raise ValueError(f"ExponentialDecay: decay_rate must be > 0, got {decay_rate!r}")
        if not decay_steps > 0:
            raise ValueError(f"ExponentialDecay: decay_steps must be > 0, got {decay_steps!r}")
        if not minimum >= 0:
            raise ValueError(f"ExponentialDecay: minimum must be >= 0, got {minimum!r}")
        self.initial = float(initial)
        self.decay_rate = float(decay_rate)
        self.decay_steps = decay_steps
        self.staircase = bool(staircase)
        self.minimum = float(minimum)

    def __call__(self, step):
        p = tf.cast(step, tf.float32) / tf.cast(self.decay_steps, tf.float32)
        if self.staircase:
            p = tf.floor(p)
        decayed = tf.constant(self.initial, tf.float32) * tf.pow(tf.constant(self.decay_rate, tf.float32), p)
        return self.minimum + decayed

    def __repr__(self):
        return (f"ExponentialDecay(initial={self.initial}, decay_rate={self.decay_rate}, "
                f"decay_steps={self.decay_steps}, staircase={self.staircase}, minimum={self.minimum})")


class Constant(tf.Module):
    """lr(step) = value."""

    def __init__(self, value, name=None):
        super().__init__(name=name or "constant")
        if not value > 0:
            raise ValueError(f"Constant: learning rate must be > 0, got {value!r}")
        self.value = float(value)

    def __call__(self, step):
        return tf.constant(self.value, tf.float32)

    def __repr__(self):
        return f"Constant({self.value})"
