"""The compiled part of training: a tf.Module that owns every variable a step touches.

    runner = Runner(model, Adam(schedule))
    runner.prepare(dataset.element_spec)               # builds variables, traces train() once
    runner.train(iterator, tf.constant(50))            # 50 updates, one call from Python
    runner.evaluate(iter(test_batches))                # every batch, one call from Python
    runner.state()                                     # what a checkpoint saves and restores

`train(iterator, num_updates)` is one tf.function whose body is

    for _ in tf.range(num_updates):
        for _ in tf.range(K - 1):                      only with grad_accum_steps K > 1
            accumulate_step(next(iterator))            gradients -> sum
        train_step(next(iterator))

and the update is a short chain of stages, each a small method or module that can be swapped:

    L, logits, g = gradients(x, labels)                compute_gradients: tape, by hand, mixed precision
    L, g = accumulation.mean(L, g)                     over the update's K batches (K = 1: as is)
    L, g = all_reduce_gradients(L, g)                  the global batch's, on every replica
    guard(step, lr, [L] + g, update)                   only if all finite (core/guard.py; float16 loss scale)
        update: optimizer.apply(g, w); ema.update(); keep g for TensorBoard; metrics += (L, accuracy)

`num_updates` is a tensor, so any loop length reuses the same trace. Every state the step changes lives in
this module (model variables, BatchNorm moving statistics too, the optimizer's slots and step, the metrics,
the guard's record, the averaged weights), so the loop runs it per replica of a tf.distribute strategy
(`strategy.run`), each replica on its slice of the global batch. Every collective (the all-reduces, sync
batch norm's) sits outside the guard's tf.conds, and the conds branch on all-reduced values, so every
replica reaches each collective on every step and takes the same branch (docs/distributed.md).

The Python side (core/trainer.py) decides how many updates to run between its log points, checkpoints and
epoch ends and reads variables only there.
"""
import contextlib

import tensorflow as tf

from core import distribute
from core.accumulate import GradientSum
from core.ema import MovingAverage
from core.guard import Guard
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


def _unique(variables):
    seen, unique = set(), []
    for variable in variables:
        if variable.ref() not in seen:
            seen.add(variable.ref())
            unique.append(variable)
    return unique


class Runner(tf.Module):
    """Model, optimizer, loss, metrics, run position, NaN guard and the optional stages, with compiled `train`
    and `evaluate`.

    Args:
      model: a Sequential (or any tf.Module with build(input_shape), __call__(x, training) -> logits).
      optimizer: SGD/Adam from core.optimizers (build(variables), apply(gradients, variables), step,
        current_learning_rate()). Its step counts updates.
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
      grad_accum_steps: K, the batches whose mean gradient makes one update (core/accumulate.py).
      ema: decay d of an exponential moving average of the weights (core/ema.py), which evaluation and
        export use (`averaged_weights()`); None: none.
    """

    def __init__(self, model, optimizer, loss_fn=softmax_cross_entropy, compute_gradients=tape_gradients,
                 strategy=None, precision="float32", jit_compile=False, grad_accum_steps=1, ema=None):
        super().__init__(name="runner")
        if isinstance(grad_accum_steps, bool) or not isinstance(grad_accum_steps, int) or grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be a positive integer, got {grad_accum_steps!r}")
        if ema is not None and not 0.0 <= ema < 1.0:
            raise ValueError(f"ema decay must be in [0, 1), got {ema!r}")
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.grad_accum_steps = grad_accum_steps
        self.ema_decay = ema
        dtype = compute_dtype(precision)
        self.strategy = strategy or tf.distribute.get_strategy()
        with self.strategy.scope():
            self._create_variables()
            self.loss_scale = LossScale() if dtype == tf.float16 else None
            self.guard = Guard(optimizer.step, self.loss_scale)
        if dtype != tf.float32:
            if compute_gradients is not tape_gradients:
                raise ValueError(f"precision {precision} computes its own gradients: pass no compute_gradients")
            compute_gradients = mixed_gradients(dtype, self.loss_scale)
        self.compute_gradients = compute_gradients
        if jit_compile and self.strategy.num_replicas_in_sync > 1:
            raise ValueError("jit_compile compiles the step of one replica; a strategy with "
                             f"{self.strategy.num_replicas_in_sync} replicas runs it uncompiled")
        # The steps hold no Python control flow on tensors (tf.cond, tf.where), so AutoGraph need not rewrite them
        # and all they call: only the loops below are converted, which keeps tracing short.
        compiled = ((lambda step: tf.function(step, jit_compile=True, autograph=False)) if jit_compile
                    else tf.autograph.experimental.do_not_convert)
        self.step, self.evaluation_step = compiled(self.train_step), compiled(self.eval_step)
        self.accumulation_step = compiled(self.accumulate_step)
        self.train = tf.function(self._train)
        self.evaluate = tf.function(self._evaluate)
        self.accumulation = self.ema = None
        self.built = False

    def _create_variables(self):
        """The runner's own state; under a strategy, ON_WRITE (mirrored) except the metrics' totals (ON_READ)."""
        # Streaming metrics: the epoch so far, the steps since the last log point, the current evaluation.
        self.train_loss, self.train_accuracy = Mean(), Accuracy()
        self.window_loss, self.window_accuracy = Mean(), Accuracy()
        self.eval_loss, self.eval_accuracy = Mean(), Accuracy()
        # Where the run is: completed epochs, batches consumed in the current epoch, learning rate
        # used by the latest update. The loop writes the first two at checkpoints.
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        self.step_in_epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="step_in_epoch")
        self.learning_rate = tf.Variable(0.0, dtype=tf.float32, trainable=False, name="learning_rate")

    def build(self, input_shape):
        """Creates the model's variables, the optimizer's slots and the stages' variables, eagerly (before any
        tracing)."""
        if self.built:
            return
        with self.strategy.scope():
            self.model.build((None,) + tuple(input_shape)[1:])
            self.optimizer.build(self.model.trainable_variables)
        distribute.check_in_scope(self.strategy, list(self.model.variables) + list(self.optimizer.variables))
        self.trainable = list(self.model.trainable_variables)
        if not self.trainable:
            raise ValueError("the model has no trainable variables")
        with self.strategy.scope():
            # The latest applied gradients (the all-reduced ones, the same on every replica), for TensorBoard.
            self.last_gradients = [
                tf.Variable(tf.zeros_like(variable), trainable=False, name="last_gradient",
                            synchronization=tf.VariableSynchronization.ON_READ,
                            aggregation=tf.VariableAggregation.MEAN) for variable in self.trainable]
            if self.grad_accum_steps > 1:
                self.accumulation = GradientSum(self.grad_accum_steps, self.trainable)
            if self.ema_decay is not None:
                self.ema = MovingAverage(self.ema_decay, self.trainable)
        # Checked after each update: weights and moving statistics. Not the optimizer's slots: an
        # overflowing Adam v leaves the weights finite (a stall, not a NaN) and would double the cost.
        self.guard.watch(_unique([variable for variable in self.model.variables if variable.dtype.is_floating]))
        self.names = self._variable_names()
        self.built = True

    def state(self):
        """{name: trackable}: everything a checkpoint saves and restores for this run to continue bit for bit."""
        state = {"model": self.model, "optimizer": self.optimizer, "epoch": self.epoch,
                 "step_in_epoch": self.step_in_epoch, "learning_rate": self.learning_rate,
                 "metrics": tf.train.Checkpoint(train_loss=self.train_loss, train_accuracy=self.train_accuracy,
                                                window_loss=self.window_loss, window_accuracy=self.window_accuracy)}
        if self.loss_scale is not None:
            state["loss_scale"] = self.loss_scale
        if self.ema is not None:
            state["ema"] = self.ema
        return state

    def averaged_weights(self):
        """A context in which the model holds the weights evaluation and export use: the moving averages with
        `ema`, else its own (nothing changes)."""
        return self.ema.swapped_in(self.trainable) if self.ema is not None else contextlib.nullcontext()

    def named_gradients(self):
        """[(variable name, its latest applied gradient)] in the model's order, e.g. ('dense_1/w', g)."""
        return [(self.variable_name(variable), gradient)
                for variable, gradient in zip(self.trainable, self.last_gradients)]

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
        """Runs `num_steps` updates, each on the next K batches of `iterator`, every replica on its slice."""
        for _ in tf.range(num_steps):
            if self.grad_accum_steps > 1:
                for _ in tf.range(self.grad_accum_steps - 1):
                    self.strategy.run(self.accumulation_step, args=(next(iterator),))
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

    # ------------------------------------------------------------------------------------- stages

    def gradients(self, images, labels):
        """L, logits, [dL/dw_i] on this replica's slice, by `compute_gradients`."""
        loss, logits, gradients = self.compute_gradients(self.model, self.loss_fn, images, labels, self.trainable)
        for gradient, variable in zip(gradients, self.trainable):
            if gradient is None:
                raise ValueError(f"{self.variable_name(variable)} gets no gradient from the loss")
        return loss, logits, list(gradients)

    def record_metrics(self, loss, labels, logits):
        """The epoch's and the log window's loss (weighted by N) and accuracy += this batch's."""
        count = tf.cast(tf.shape(labels)[0], tf.float32)
        for mean_loss, accuracy in ((self.train_loss, self.train_accuracy), (self.window_loss, self.window_accuracy)):
            mean_loss.update(loss, weight=count)
            accuracy.update(labels, logits)

    def apply(self, gradients, first):
        """w <- optimizer.apply(g, w); then the moving average of w; keeps g for TensorBoard."""
        self.optimizer.apply(gradients, self.trainable)
        if self.ema is not None:
            self.ema.update(self.trainable, first)
        for kept, gradient in zip(self.last_gradients, gradients):
            kept.assign(gradient)

    # ----------------------------------------------------------------------------------- one step

    def accumulate_step(self, batch):
        """One of the first K - 1 batches of an update: its gradients into the sum, its figures into the metrics
        (unguarded: they count even when the update is then skipped, a float16 overflow)."""
        images, labels = batch
        loss, logits, gradients = self.gradients(images, labels)
        self.accumulation.add(loss, gradients)
        self.record_metrics(loss, labels, logits)

    def train_step(self, batch):
        """The last batch of an update, and the guarded update. Returns True if applied.

            step = optimizer.step + 1,  lr = schedule(step - 1)
            L, logits, g = gradients(x, labels)            this replica's slice
            L, g = accumulation.mean(L, g)                 with K > 1: the mean over the update's K batches
            L, g = all_reduce_gradients(L, g)              sum_r L_r / k, sum_r g_r / k: the global batch's
            guard: if L, every g and the record are finite:
                apply(g): w <- optimizer.apply(g, w), ema, kept g;   lr and metrics recorded
            record (step, lr, which tensor) if L, a g, or a variable after the update is not finite

        Once a non-finite value is recorded, later steps still compute (and BatchNorm's moving statistics still
        move) but change nothing else; the loop stops at its next read of the record (core/guard.py).
        """
        images, labels = batch
        step = self.optimizer.step + 1
        learning_rate = tf.cast(self.optimizer.current_learning_rate(), tf.float32)
        batch_loss, logits, gradients = self.gradients(images, labels)
        loss = batch_loss
        if self.accumulation is not None:
            loss, gradients = self.accumulation.mean(loss, gradients)
        loss, gradients = distribute.all_reduce_gradients(loss, gradients)

        def update():
            self.apply(gradients, first=tf.equal(step, 1))
            self.learning_rate.assign(learning_rate)
            self.record_metrics(batch_loss, labels, logits)

        return self.guard(step, learning_rate, [loss] + gradients, update)

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
        return f"{self.variable_name(self.guard.guarded[index - 1 - len(self.trainable)])} after the update"
