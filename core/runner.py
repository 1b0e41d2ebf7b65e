"""The compiled part of training: a tf.Module that owns every variable a step touches.

    runner = Runner(model, Adam(schedule))
    runner.prepare(dataset.element_spec)               # builds variables, traces train() once
    runner.train(iterator, tf.constant(50))            # 50 steps, one call from Python
    runner.evaluate(iter(test_batches))                # every batch, one call from Python

`train(iterator, num_steps)` is one tf.function whose body is

    for _ in tf.range(num_steps):
        train_step(next(iterator))

`num_steps` is a tensor, so any loop length reuses the same trace. `train_step(batch)` is the whole
step, and every state it changes lives in this module: model variables (BatchNorm moving statistics
too), the optimizer's slots and step, the metrics and the NaN guard's record. Nothing the step needs
comes from outside it, so the loop runs it per replica of a tf.distribute strategy:

    for _ in tf.range(num_steps):
        strategy.run(train_step, (next(iterator),))      each replica: its slice of the global batch

and inside the step `core.distribute.all_reduce_gradients` turns every replica's loss and gradients into
the global batch's (one all-reduce; the identity with one replica), before the NaN guard and the update,
so every replica makes the same decision and the same update (core/distribute.py, docs/distributed.md).

The Python side (core/trainer.py) decides how many steps to run between its log points, checkpoints and
epoch ends and reads variables only there.
"""
import tensorflow as tf

from core import distribute
from core.losses import softmax_cross_entropy
from core.metrics import Accuracy, Mean
from core.precision import LossScale, compute_dtype, mixed_gradients

__all__ = ["Runner", "tape_gradients", "batch_specs"]


def tape_gradients(model, loss_fn, images, labels, variables):
    """The default gradient computation, by reverse-mode autodiff:

        logits = model(x, training=True)             x [N, ...], labels [N] int
        L      = loss_fn(logits, labels)             scalar
        g_i    = dL/dw_i                             for each w_i in `variables`

    Returns (L, logits, [g_i]). Any function with this signature can replace it (Runner's
    `compute_gradients`), e.g. hand-written backward passes.
    """
    with tf.GradientTape() as tape:
        logits = model(images, training=True)
        loss = loss_fn(logits, labels)
    return loss, logits, tape.gradient(loss, variables)


def batch_specs(element_spec):
    """(images, labels) element_spec -> the same TensorSpecs with a None batch dimension."""
    expected = "Trainer expects a dataset of (images [N, ...], labels [N] int) batches"
    if not (isinstance(element_spec, tuple) and len(element_spec) == 2
            and all(isinstance(spec, tf.TensorSpec) for spec in element_spec)):
        raise ValueError(f"{expected}, got elements {element_spec}")
    images, labels = element_spec
    if images.shape.rank is None or images.shape.rank < 2 or labels.shape.rank != 1:
        raise ValueError(f"{expected}, got images {images.shape} and labels {labels.shape} (is it batched?)")
    if not labels.dtype.is_integer:
        raise ValueError(f"{expected}, got {labels.dtype.name} labels")
    return tuple(tf.TensorSpec(tf.TensorShape([None]).concatenate(spec.shape[1:]), spec.dtype, name=name)
                 for spec, name in ((images, "images"), (labels, "labels")))


def _finite_flags(tensors):
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


def _unique(variables):
    seen, unique = set(), []
    for variable in variables:
        if variable.ref() not in seen:
            seen.add(variable.ref())
            unique.append(variable)
    return unique


class Runner(tf.Module):
    """Model, optimizer, loss, metrics, run position and NaN guard, with compiled `train` and `evaluate`.

    Args:
      model: a Sequential (or any tf.Module with build(input_shape), __call__(x, training) -> logits).
      optimizer: SGD/Adam from core.optimizers (build(variables), apply(gradients, variables), step,
        current_learning_rate()).
      loss_fn: (logits [N, C], labels [N]) -> scalar mean loss.
      compute_gradients: (model, loss_fn, images, labels, variables) -> (loss, logits, gradients);
        default `tape_gradients`.
      strategy: a tf.distribute strategy (default: none, one replica). The model and the optimizer must
        have been constructed under its scope; the runner creates its own variables there.
      precision: "float32", or "mixed_bfloat16" / "mixed_float16": float32 weights and optimizer slots, the
        training step computed in 16 bits (core/precision.py); float16 also scales the loss (`loss_scale`).
      jit_compile: compile `train_step` and `eval_step` with XLA, which fuses their element-wise ops into fewer
        kernels (one replica only). The same math, rounded otherwise; Dropout's generator draws XLA's random
        bits, so the masks differ from an uncompiled run's (still a function of the seed and the step).
    """

    def __init__(self, model, optimizer, loss_fn=softmax_cross_entropy, compute_gradients=tape_gradients,
                 strategy=None, precision="float32", jit_compile=False):
        super().__init__(name="runner")
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        dtype = compute_dtype(precision)
        self.strategy = strategy or tf.distribute.get_strategy()
        with self.strategy.scope():
            self._create_variables()
            self.loss_scale = LossScale() if dtype == tf.float16 else None
        if dtype != tf.float32:
            if compute_gradients is not tape_gradients:
                raise ValueError(f"precision {precision} computes its own gradients: pass no compute_gradients")
            compute_gradients = mixed_gradients(dtype, self.loss_scale)
        self.compute_gradients = compute_gradients
        if jit_compile and self.strategy.num_replicas_in_sync > 1:
            raise ValueError("jit_compile compiles the step of one replica; a strategy with "
                             f"{self.strategy.num_replicas_in_sync} replicas runs it uncompiled")
        compiled = (lambda step: tf.function(step, jit_compile=True)) if jit_compile else (lambda step: step)
        self.step, self.evaluation_step = compiled(self.train_step), compiled(self.eval_step)
        self.train = tf.function(self._train)
        self.evaluate = tf.function(self._evaluate)
        self.built = False

    def _create_variables(self):
        """The runner's own state; under a strategy, ON_WRITE (mirrored) except the metrics' totals (ON_READ)."""
        # Streaming metrics: the epoch so far, the steps since the last log point, the current evaluation.
        self.train_loss, self.train_accuracy = Mean(), Accuracy()
        self.window_loss, self.window_accuracy = Mean(), Accuracy()
        self.eval_loss, self.eval_accuracy = Mean(), Accuracy()
        # Where the run is: completed epochs, batches consumed in the current epoch, learning rate
        # used by the latest step. The loop writes the first two at checkpoints.
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        self.step_in_epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="step_in_epoch")
        self.learning_rate = tf.Variable(0.0, dtype=tf.float32, trainable=False, name="learning_rate")
        # The NaN guard's record: first bad step (-1: none), which tensor, its learning rate. Written only
        # from all-reduced values, so every replica records the same thing.
        self.bad_step = tf.Variable(-1, dtype=tf.int64, trainable=False, name="bad_step")
        self.bad_index = tf.Variable(-1, dtype=tf.int32, trainable=False, name="bad_index")
        self.bad_learning_rate = tf.Variable(0.0, dtype=tf.float32, trainable=False, name="bad_learning_rate")

    def build(self, input_shape):
        """Creates the model's variables and the optimizer's slots, eagerly (before any tracing)."""
        if self.built:
            return
        with self.strategy.scope():
            self.model.build((None,) + tuple(input_shape)[1:])
            self.optimizer.build(self.model.trainable_variables)
        distribute.check_in_scope(self.strategy, list(self.model.variables) + list(self.optimizer.variables))
        self.trainable = list(self.model.trainable_variables)
        if not self.trainable:
            raise ValueError("the model has no trainable variables")
        # Checked after each update: weights and moving statistics. Not the optimizer's slots: an
        # overflowing Adam v leaves the weights finite (a stall, not a NaN) and would double the cost.
        self.guarded = _unique([variable for variable in self.model.variables if variable.dtype.is_floating])
        self.names = self._variable_names()
        self.built = True

    def prepare(self, element_spec, mode="train", source=None):
        """Builds from a dataset's element_spec, then traces `mode`'s function once for any batch size
        (with `source`, a batch source such as data.GatheredBatches, once for that source; with several
        replicas the trace waits for the first call, which knows the distributed iterator)."""
        specs = batch_specs(element_spec)
        self.build(specs[0].shape)
        if self.strategy.num_replicas_in_sync > 1:
            return None
        iterator = tf.data.IteratorSpec(specs) if source is None else source
        if mode == "train":
            return self.train.get_concrete_function(iterator, tf.TensorSpec([], tf.int32, name="num_steps"))
        return self.evaluate.get_concrete_function(iterator)

    def _variable_names(self):
        """{variable ref: readable name}, e.g. 'dense_1/w' (Sequential.named_variables)."""
        return {variable.ref(): name for name, variable in self.model.named_variables()}

    def variable_name(self, variable):
        return self.names.get(variable.ref(), variable.name)

    # ------------------------------------------------------------------------------ compiled loops

    def distribute(self, dataset, mode="train"):
        """A dataset of global batches -> what `train` / `evaluate` iterate: itself with one replica, else
        each batch split into the replicas' slices (core.distribute.distribute_batches)."""
        return distribute.distribute_batches(self.strategy, dataset, exact=mode == "train")

    def _train(self, iterator, num_steps):
        """Runs `num_steps` steps on the next `num_steps` batches of `iterator`, every replica on its slice."""
        for _ in tf.range(num_steps):
            self.strategy.run(self.step, args=(next(iterator),))

    def _evaluate(self, iterator):
        """Adds every remaining batch of `iterator` to the eval metrics (reset by the caller)."""
        for batch in iterator:
            self.strategy.run(self.evaluation_step, args=(batch,))

    def settle_moving_statistics(self):
        """Gives every replica's copy of each ON_READ variable (BatchNorm's moving statistics) their mean, so that
        evaluation on any replica uses the model that is saved and exported. A no-op with one replica."""
        if self.strategy.num_replicas_in_sync > 1:
            distribute.settle(self.model.variables)

    # ----------------------------------------------------------------------------------- one step

    def train_step(self, batch):
        """One guarded update. Returns True if applied.

            step   = optimizer.step + 1,  lr = schedule(step - 1)
            L, logits, g = compute_gradients(model, loss_fn, x, labels, w)    on this replica's slice
            L, g   <- all_reduce_gradients(L, g)          sum_r L_r / k, sum_r g_r / k: the global batch's
            w      <- optimizer.apply(g, w)               only if L and every g are finite and no earlier
                                                          step recorded a non-finite value (float16 loss
                                                          scaling: else skip the update, halve the scale)
            metrics += (L, accuracy(labels, logits))      weighted by N
            record (step, lr, which tensor) if L, a g, or a variable after the update is not finite

        Every collective (these all-reduces, sync batch norm's) sits outside the tf.conds: every replica
        reaches each one on every step, and the conds branch on all-reduced values, so all replicas take
        the same branch. Once a non-finite value is recorded, later steps still compute (and BatchNorm's
        moving statistics still move) but change nothing else; the loop stops at its next read of the record.
        """
        images, labels = batch
        step = self.optimizer.step + 1
        learning_rate = tf.cast(self.optimizer.current_learning_rate(), tf.float32)
        loss, logits, gradients = self.compute_gradients(self.model, self.loss_fn, images, labels, self.trainable)
        for gradient, variable in zip(gradients, self.trainable):
            if gradient is None:
                raise ValueError(f"{self.variable_name(variable)} gets no gradient from the loss")
        loss, gradients = distribute.all_reduce_gradients(loss, list(gradients))
        checked = [loss] + gradients
        finite = _finite_flags(checked)
        healthy = self.bad_step < 0
        applied = tf.logical_and(healthy, tf.reduce_all(finite))

        def update():
            self.optimizer.apply(gradients, self.trainable)
            self.learning_rate.assign(learning_rate)
            count = tf.cast(tf.shape(labels)[0], tf.float32)
            for mean_loss, accuracy in ((self.train_loss, self.train_accuracy),
                                        (self.window_loss, self.window_accuracy)):
                mean_loss.update(loss, weight=count)
                accuracy.update(labels, logits)
            return _finite_flags(self.guarded)

        state = distribute.on_every_replica(
            tf.cond(applied, update, lambda: tf.ones([len(self.guarded)], tf.bool)))
        if self.loss_scale is not None:
            # float16: overflowing gradients skip the update (the step still counts) and halve the loss scale.
            overflow = tf.logical_and(healthy, tf.logical_not(tf.reduce_all(finite)))
            self.loss_scale.update(tf.reduce_all(finite))
            self.optimizer.step.assign_add(tf.cast(overflow, self.optimizer.step.dtype))
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

    def eval_step(self, batch):
        """logits = model(x, training=False); adds the batch's loss and accuracy to the eval metrics."""
        images, labels = batch
        logits = self.model(images, training=False)
        loss = self.loss_fn(logits, labels)
        self.eval_loss.update(loss, weight=tf.cast(tf.shape(labels)[0], tf.float32))
        self.eval_accuracy.update(labels, logits)

    # ---------------------------------------------------------------------------------- NaN guard

    def describe_bad(self, index):
        """The guard's tensor index -> 'loss' / 'gradient of dense/w' / 'dense/w after the update'."""
        if index == 0:
            return "loss"
        if index <= len(self.trainable):
            return f"gradient of {self.variable_name(self.trainable[index - 1])}"
        return f"{self.variable_name(self.guarded[index - 1 - len(self.trainable)])} after the update"
