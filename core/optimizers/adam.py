"""Adam: w = w - alpha * m / (sqrt(v) + epsilon), exactly as Keras 3 computes it."""
import tensorflow as tf

from core.optimizers import Optimizer


class Adam(Optimizer):
    """Adam (Kingma & Ba 2014) exactly as Keras 3 computes it, with t = step + 1:

    alpha = lr * sqrt(1 - beta_2^t) / (1 - beta_1^t)
    m = m + (g - m) * (1 - beta_1)          (= beta_1 * m + (1 - beta_1) * g)
    v = v + (g^2 - v) * (1 - beta_2)        (= beta_2 * v + (1 - beta_2) * g^2)
    w = w - m * alpha / (sqrt(v) + epsilon)
    This is the paper's Algorithm 1 with a step-dependent epsilon: epsilon_paper = epsilon / sqrt(1 - beta_2^t)
    (see docs/math.md, Adam). Slots `m` and `v` (one each per variable, zeros).
    """

    def __init__(self, learning_rate, beta_1=0.9, beta_2=0.999, epsilon=1e-7, name=None):
        super().__init__(learning_rate, name=name or "adam")
        for what, beta in (("beta_1", beta_1), ("beta_2", beta_2)):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Adam: {what} must be in [0, 1), got {beta!r}")
        if not epsilon > 0:
            raise ValueError(f"Adam: epsilon must be > 0, got {epsilon!r}")
        self.beta_1 = float(beta_1)
        self.beta_2 = float(beta_2)
        self.epsilon = float(epsilon)
        self.m = []
        self.v = []

    def _create_slots(self, variables):
        self.m = [tf.Variable(tf.zeros_like(w), trainable=False, name="m") for w in variables]
        self.v = [tf.Variable(tf.zeros_like(w), trainable=False, name="v") for w in variables]

    def _step_rate(self, learning_rate, dtype):
        """alpha = lr * sqrt(1 - beta_2^t) / (1 - beta_1^t), t = step + 1 (the same for every variable)."""
        t = tf.cast(self.step + 1, dtype)
        return learning_rate * tf.sqrt(1 - tf.pow(tf.constant(self.beta_2, dtype), t)) / (
            1 - tf.pow(tf.constant(self.beta_1, dtype), t))

    def _update(self, g, w, i, alpha):
        m, v = self.m[i], self.v[i]
        m.assign_add((g - m) * (1 - self.beta_1))
        v.assign_add((tf.square(g) - v) * (1 - self.beta_2))
        w.assign_sub(m * alpha / (tf.sqrt(v) + self.epsilon))
