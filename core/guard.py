"""The NaN guard: a training update is applied only while every value it depends on is finite.

    applied = guard(step, learning_rate, [L] + g, update)

    finite  = is_finite(L), is_finite(g_i)               one sum per tensor in the usual case (_finite_flags)
    applied = finite and no earlier step recorded a non-finite value
    update() runs only if applied; then every guarded variable (weights, moving statistics) is checked
    record (step, learning rate, index of the first bad tensor) if anything was not finite

The index counts through [L, g_1 .. g_n, guarded_1 .. guarded_m]. With float16 loss scaling (`loss_scale`),
non-finite gradients are an overflow instead: the update is skipped, the step still counts (`step_counter`
+= 1) and the scale halves; only a non-finite variable after an update is recorded.

Every value it branches on is all-reduced (the caller's gradients, `on_every_replica` for the variables'
flags) and that all-reduce sits outside the tf.cond, so every replica takes the same branch.
"""
import tensorflow as tf

from core import distribute

__all__ = ["Guard", "finite_flags"]


def finite_flags(tensors):
    """[k] bool: is every element of tensors[i] finite.

    Two stages. An inf or a NaN anywhere in t makes sum(t) inf or NaN, so a finite sum(t) clears t in one
    read: the usual step costs one sum per tensor. A sum that is not finite may also be finite values
    overflowing it, so only then are the elements checked one by one, which gives the exact flags.
    """
    sums = tf.stack([tf.cast(tf.reduce_sum(tensor), tf.float32) for tensor in tensors])
    cleared = tf.math.is_finite(sums)
    return tf.cond(tf.reduce_all(cleared), lambda: cleared,
                   lambda: tf.stack([tf.reduce_all(tf.math.is_finite(tensor)) for tensor in tensors]))


def _first_false(flags):
    """Index of the first False in a bool vector [k], k if there is none: min over i of (flags[i] ? k : i).

    Deterministic, unlike argmin on ties, and defined for any flags: XLA may evaluate both branches of a
    tf.cond, so it must not fail on the branch that is not taken.
    """
    size = tf.size(flags)
    return tf.reduce_min(tf.where(flags, size, tf.range(size)))


class Guard(tf.Module):
    """The guard's record (first bad step, -1: none; which tensor; its learning rate) and its check.

    Args:
      step_counter: the optimizer's step, which a skipped float16 update still advances.
      loss_scale: a core.precision.LossScale (float16), or None.
    `guarded`, the variables checked after each update, is set by `watch` once they exist.
    """

    def __init__(self, step_counter, loss_scale=None):
        super().__init__(name="guard")
        self.guarded = []
        self.step_counter = step_counter
        self.loss_scale = loss_scale
        self.bad_step = tf.Variable(-1, dtype=tf.int64, trainable=False, name="bad_step")
        self.bad_index = tf.Variable(-1, dtype=tf.int32, trainable=False, name="bad_index")
        self.bad_learning_rate = tf.Variable(0.0, dtype=tf.float32, trainable=False, name="bad_learning_rate")

    def watch(self, variables):
        self.guarded = list(variables)

    def healthy(self):
        return self.bad_step < 0

    def __call__(self, step, learning_rate, checked, update):
        """Runs update() if every tensor of `checked` is finite and the record is clean; returns whether it did."""
        finite = finite_flags(checked)
        healthy = self.healthy()
        applied = tf.logical_and(healthy, tf.reduce_all(finite))

        def update_and_check():
            update()
            return finite_flags(self.guarded)

        state = distribute.on_every_replica(
            tf.cond(applied, update_and_check, lambda: tf.ones([len(self.guarded)], tf.bool)))
        if self.loss_scale is not None:
            overflow = tf.logical_and(healthy, tf.logical_not(tf.reduce_all(finite)))
            self.loss_scale.update(tf.reduce_all(finite))
            self.step_counter.assign_add(tf.cast(overflow, self.step_counter.dtype))
            finite = tf.ones_like(finite)

        def record_bad():
            index = tf.cond(tf.reduce_all(finite), lambda: len(checked) + _first_false(state),
                            lambda: _first_false(finite))
            self.bad_step.assign(step)
            self.bad_index.assign(index)
            self.bad_learning_rate.assign(learning_rate)
            return tf.constant(False)

        failed = tf.logical_and(healthy, tf.logical_not(tf.reduce_all(finite) & tf.reduce_all(state)))
        return tf.cond(failed, record_bad, lambda: applied)
