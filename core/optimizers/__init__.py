"""Optimizers written by hand, each exactly the Keras 3 update, one module each: sgd.py (SGD, with momentum or
Nesterov) and adam.py (Adam). This package holds what they share, the Optimizer base class.

Each is a tf.Module owning an int64 step counter `step` (a tf.Variable, so it advances inside tf.function
and is checkpointed) and its slot variables, created by `build(variables)` (eagerly, before any tf.function
traces `apply`). `apply(gradients, variables)` evaluates the learning rate at the current step, updates every
variable, then increments `step`. Every update is computed in its variable's dtype (slots have the variable's
dtype, the learning rate is cast to it), as Keras does, so float64 variables are trained in float64.

A module of this package is an --optimizer choice named by its file (adam.py is --optimizer=adam): core.names
lists the files without importing them, and takes the one Optimizer subclass the module defines.
"""
import tensorflow as tf


class Optimizer(tf.Module):
    """Shared machinery: learning rate (a positive float or a schedule step -> lr), step counter, slot lookup."""

    def __init__(self, learning_rate, name):
        super().__init__(name=name)
        if callable(learning_rate):
            self.learning_rate = learning_rate
        elif isinstance(learning_rate, (int, float)) and not isinstance(learning_rate, bool) and learning_rate > 0:
            self.learning_rate = float(learning_rate)
        else:
            raise ValueError(f"{type(self).__name__}: learning_rate must be a positive number or a schedule, "
                             f"got {learning_rate!r}")
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        self.built = False
        self._variable_refs = []

    def current_learning_rate(self):
        """The learning rate for the next update: schedule(step), or the constant; float32 scalar."""
        if callable(self.learning_rate):
            return tf.cast(self.learning_rate(self.step), tf.float32)
        return tf.constant(self.learning_rate, tf.float32)

    def build(self, variables):
        """Creates the slot variables for `variables` (in this order); idempotent."""
        if self.built:
            return
        variables = list(variables)
        with self.name_scope:
            self._create_slots(variables)
        self._variable_refs = [v.ref() for v in variables]
        self.built = True

    def _create_slots(self, variables):
        raise NotImplementedError

    def apply(self, gradients, variables):
        """One update of every variable from its gradient, then step += 1."""
        gradients, variables = list(gradients), list(variables)
        if len(gradients) != len(variables):
            raise ValueError(f"{type(self).__name__}.apply: {len(gradients)} gradients for {len(variables)} variables")
        if not self.built:
            self.build(variables)
        index = {ref: i for i, ref in enumerate(self._variable_refs)}
        learning_rate = self.current_learning_rate()
        rates, updates = {}, []
        for g, w in zip(gradients, variables):
            if w.ref() not in index:
                raise ValueError(f"{type(self).__name__}.apply: variable {w.name} {w.shape.as_list()} was not "
                                 f"passed to build(); the optimizer was built for {len(index)} other variables")
            if g is None:
                raise ValueError(f"{type(self).__name__}.apply: no gradient for variable {w.name} "
                                 f"{w.shape.as_list()} (is it used by the loss?)")
            if not g.shape.is_compatible_with(w.shape):
                raise ValueError(f"{type(self).__name__}.apply: gradient {g.shape.as_list()} does not match "
                                 f"variable {w.name} {w.shape.as_list()}")
            if w.dtype not in rates:
                rates[w.dtype] = self._step_rate(tf.cast(learning_rate, w.dtype), w.dtype)
            updates.append((tf.cast(tf.convert_to_tensor(g), w.dtype), w, index[w.ref()]))
        self._apply_updates(updates, rates)
        self.step.assign_add(1)

    def _apply_updates(self, updates, rates):
        """Every (g, w, i) of this step by `_update`, the formula; rates: {dtype: the step's rate}. A subclass may
        compute some of them otherwise (a fast path), equal to the formula."""
        for g, w, i in updates:
            self._update(g, w, i, rates[w.dtype])

    def _step_rate(self, learning_rate, dtype):
        """The step size every `_update` of this step receives for variables of `dtype`, computed once per step
        and dtype: the learning rate."""
        return learning_rate

    def _update(self, g, w, i, rate):
        raise NotImplementedError


from core.optimizers.adam import Adam  # noqa: E402 (each subclasses Optimizer, defined above)
from core.optimizers.sgd import SGD  # noqa: E402

__all__ = ["Optimizer", "Adam", "SGD"]
