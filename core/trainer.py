"""The training loop in plain Python: epochs, log points, checkpoints, callbacks, the progress bar.

    runner = Runner(model, Adam(schedule))                      the model, the optimizer and the step
    trainer = Trainer(runner, checkpoint_dir="runs/conv/ckpt", checkpoint_every=500, steps_per_loop=50)
    history = trainer.fit(lambda epoch: training_batches(train, 128, seed, epoch), epochs=10,
                          validation_data=evaluation_batches(test))

The trainer knows no data set and no model: any Sequential (logits out) and any dataset of
(images, labels) batches. The math lives in core/runner.py's Runner (a tf.Module): its compiled
`train(iterator, num_steps)` runs `num_steps` updates of

    logits = model(x, training=True)                  x [N, ...], labels [N] int
    L      = loss_fn(logits, labels)                  scalar, stable cross-entropy on logits
    g      = dL/dw                                    GradientTape over model.trainable_variables
    w      <- optimizer.apply(g, w)                   step += 1, learning rate = schedule(step)

in one call, traced once, adding L and the batch's accuracy to metric variables (with grad_accum_steps K,
g is the mean over K batches and an update consumes K batches). Steps count updates. This loop picks each
call's length: `steps_per_loop`, cut short so that log points (every `log_every` updates), checkpoints
(every `checkpoint_every` updates) and epoch ends fall on call boundaries; whatever steps_per_loop is, the
same steps run in the same order, so it changes speed, never results. Python reads variables only at
those boundaries, never per step. What a checkpoint holds is the runner's `state()` plus this loop's
history (and early stopping's record). Stopping (`stop_training`, set by a callback, a signal or early
stopping) is decided at those boundaries too, and under a multi-worker strategy by every worker together,
so that all of them stop at the same step (`_stop_agreed`).

Guarding the math: in the same compiled step, L, every gradient and (after the update) every model variable
are checked with is_finite. The first non-finite value records its step, learning rate and which tensor
in variables and the update is not applied; every later step is a no-op. The loop reads that record at
its next log point, checkpoint or epoch end and raises NonFiniteError before anything is saved, so the
last checkpoint on disk is the last good state.
"""
import json
import time

import tensorflow as tf
from tqdm import tqdm

from core import data, distribute
from core.checkpoint import Checkpointer, CheckpointMismatchError, CheckpointUnreadableError
from core.config import TrainingConfig
from core.early_stopping import EarlyStopping
from core.runner import Runner

__all__ = ["Trainer", "Runner", "History", "Callback", "EarlyStopping", "NonFiniteError", "CheckpointMismatchError",
           "CheckpointUnreadableError"]


class NonFiniteError(RuntimeError):
    """A NaN or infinity appeared in the loss, a gradient or a variable; training stopped at that step."""

    def __init__(self, step, learning_rate, what, checkpoint=None):
        self.step = step
        self.learning_rate = learning_rate
        self.what = what
        self.checkpoint = checkpoint
        kept = f"last good checkpoint kept: {checkpoint}" if checkpoint else "no checkpoint was saved"
        super().__init__(f"non-finite {what} at step {step} (learning rate {learning_rate:.6g}); "
                         f"training stopped, {kept}")


class Callback:
    """Hooks the trainer calls; subclass and override what you need (all are optional).

    `step` is the global step (number of updates applied so far, it continues across resumes);
    `epoch` counts completed epochs (1 after the first). `logs` hold Python floats.
    """

    def on_train_begin(self, trainer):
        pass

    def on_log(self, step, logs):
        pass

    def on_epoch_end(self, epoch, step, logs):
        pass

    def on_train_end(self, trainer, history):
        pass


class History:
    """Figures of a run.

    steps:  [{"step", "loss", "accuracy", "learning_rate"}] at each log point, loss and accuracy being
            the means over the steps since the previous log point;
    epochs: [{"epoch", "step", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "seconds"}]
            with the epoch's mean training loss and accuracy (val_* only when there is validation data);
    stopped: why and when fit() ended: {"reason": "epochs" | "early_stopping" | "stopped", "epoch"} (the last
            completed epoch), with early stopping also its "metric", "best", "best_epoch", "patience",
            "stopped_epoch", "restore_best" and "restored" (whether the model now holds the best epoch's weights).
    """

    def __init__(self, steps=None, epochs=None):
        self.steps = list(steps or [])
        self.epochs = list(epochs or [])
        self.stopped = None

    def to_json(self):
        return json.dumps({"steps": self.steps, "epochs": self.epochs})

    @classmethod
    def from_json(cls, text):
        data = json.loads(text) if text else {}
        return cls(data.get("steps"), data.get("epochs"))

    def __repr__(self):
        return f"History({len(self.steps)} log points, {len(self.epochs)} epochs)"


def _check_positive(name, value, none_ok=False):
    """Raises ValueError unless `value` is a positive int (or None, if `none_ok`)."""
    if none_ok and value is None:
        return
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer{' or None' if none_ok else ''}, got {value!r}")


class Trainer:
    """Runs a Runner's compiled updates in epochs, with log points, checkpoints and callbacks; see the module
    docstring. The runner holds the model, the optimizer and the step (core/runner.py).

    Args:
      runner: a core.runner.Runner (model, optimizer, loss, gradients, strategy, precision, stages).
      callbacks: Callback-like objects (any subset of the four hooks).
      log_every: updates between log points (history, callbacks' on_log, progress postfix, NaN check).
      checkpoint_dir: where checkpoints live; fit() resumes from it when it holds one.
      checkpoint_every: also save every that many updates (None: only at the end of each epoch).
      keep_checkpoints: how many checkpoints to keep.
      progress: show a progress bar per epoch (tqdm, on a terminal only).
      steps_per_loop: most updates per compiled call (fewer up to the next log point, checkpoint or epoch end).
      checkpoint_write_dir: where this process writes checkpoints (default: checkpoint_dir). On a worker other
        than the chief of a distributed run, checkpoints are written there (they must still be written: the
        save reads every replica) while restores read `checkpoint_dir`, the chief's.
      early_stopping: an EarlyStopping (patience, metric, restore_best); its state goes into the checkpoints,
        so a run started with one must be resumed with one of the same kind.
    Defaults come from core.config.TrainingConfig.
    """

    def __init__(self, runner, callbacks=(), log_every=TrainingConfig.log_every, checkpoint_dir=None,
                 checkpoint_every=None, keep_checkpoints=TrainingConfig.keep_checkpoints,
                 progress=TrainingConfig.progress, steps_per_loop=TrainingConfig.steps_per_loop,
                 checkpoint_write_dir=None, early_stopping=None):
        if not isinstance(runner, Runner):
            raise ValueError(f"Trainer takes a core.runner.Runner, got {type(runner).__name__}: "
                             f"Trainer(Runner(model, optimizer), ...)")
        _check_positive("log_every", log_every)
        _check_positive("checkpoint_every", checkpoint_every, none_ok=True)
        if checkpoint_every is not None and checkpoint_dir is None:
            raise ValueError("checkpoint_every needs a checkpoint_dir")
        _check_positive("keep_checkpoints", keep_checkpoints)
        _check_positive("steps_per_loop", steps_per_loop)
        if early_stopping is not None and not isinstance(early_stopping, EarlyStopping):
            raise ValueError(f"early_stopping must be an EarlyStopping, got {type(early_stopping).__name__}")
        self.runner = runner
        self.callbacks = list(callbacks)
        self.log_every = log_every
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_write_dir = checkpoint_write_dir
        self.checkpoint_every = checkpoint_every
        self.keep_checkpoints = keep_checkpoints
        self.progress = progress
        self.steps_per_loop = steps_per_loop
        self.early_stopping = early_stopping
        self._history_text = tf.Variable("", dtype=tf.string, trainable=False, name="history")
        self.history = History()
        self.concrete_steps = {}  # "train"/"eval" -> the traced ConcreteFunction (its .graph is the loop's graph)
        self.stop_training = False
        self.stopped_by = []  # the workers whose stop_training stopped the run (distribute.WorkerVote)
        self._vote = distribute.WorkerVote(runner.strategy)
        self.restored_from = None
        self.checkpointer = None

    @property
    def model(self):
        return self.runner.model

    @property
    def optimizer(self):
        return self.runner.optimizer

    def build(self, input_shape):
        """Creates the model's variables and the optimizer's slots, eagerly (before any tracing)."""
        self.runner.build(input_shape)

    # ------------------------------------------------------------------------------ NaN guard

    def check_finite(self):
        """Raises NonFiniteError if a step recorded a non-finite value (one host read)."""
        runner, guard = self.runner, self.runner.guard
        bad_step = int(guard.bad_step.numpy())
        if bad_step < 0:
            return
        raise NonFiniteError(bad_step, float(guard.bad_learning_rate.numpy()),
                             runner.describe_bad(int(guard.bad_index.numpy())),
                             self.checkpointer.latest if self.checkpointer else None)

    # ---------------------------------------------------------------------------- checkpoints

    def _open_checkpoints(self):
        """Creates the Checkpointer once and restores the newest checkpoint in checkpoint_dir, if any."""
        if self.checkpoint_dir is None or self.checkpointer is not None:
            return
        extra = {"history": self._history_text}
        if self.early_stopping is not None:
            extra["early_stopping"] = self.early_stopping
        self.checkpointer = Checkpointer(self.checkpoint_dir, keep=self.keep_checkpoints,
                                         write_directory=self.checkpoint_write_dir, **self.runner.state(), **extra)
        self.restored_from = self.checkpointer.restore()
        if self.restored_from:
            self.history = History.from_json(self._history_text.numpy().decode("utf-8"))

    def save(self, epoch, step_in_epoch):
        """Checks the NaN guard, records where the run is (completed epochs, batches into the next one)
        and, with a checkpoint_dir, saves a checkpoint of it. Returns the checkpoint's prefix or None."""
        self.check_finite()
        self.runner.epoch.assign(epoch)
        self.runner.step_in_epoch.assign(step_in_epoch)
        if self.checkpointer is None:
            return None
        self._history_text.assign(self.history.to_json())
        return self.checkpointer.save()

    # ---------------------------------------------------------------------------------- loops

    def _call(self, hook, *args):
        for callback in self.callbacks:
            method = getattr(callback, hook, None)
            if method is not None:
                method(*args)

    def _log_point(self, step, bar):
        self.check_finite()
        runner = self.runner
        logs = {"loss": float(runner.window_loss.result()), "accuracy": float(runner.window_accuracy.result()),
                "learning_rate": float(runner.learning_rate.numpy())}
        runner.window_loss.reset()
        runner.window_accuracy.reset()
        self.history.steps.append({"step": step, **logs})
        self._call("on_log", step, logs)
        bar.set_postfix({"loss": f"{float(runner.train_loss.result()):.4g}",
                         "accuracy": f"{float(runner.train_accuracy.result()):.4g}",
                         "lr": f"{logs['learning_rate']:.4g}"})

    def _loop_length(self, step, update_in_epoch, updates):
        """Updates in the next compiled call: steps_per_loop, cut at the next log point, checkpoint or epoch end."""
        length = min(self.steps_per_loop, updates - update_in_epoch, self.log_every - step % self.log_every)
        if self.checkpoint_every:
            length = min(length, self.checkpoint_every - step % self.checkpoint_every)
        return length

    def fit(self, train_data, epochs, validation_data=None, steps_per_epoch=None):
        """Trains until `epochs` epochs are complete (counting epochs of a restored run) and returns the History.

        train_data: a data.BatchSource (data.GatheredBatches: gathered inside the compiled loop), a callable
          epoch (int, from 0) -> tf.data.Dataset of that epoch's (images, labels) batches (exact resume needs the
          same batches for the same epoch), or one Dataset for every epoch (data.batch_source wraps them).
        validation_data: a Dataset of batches evaluated after each epoch, or None.
        steps_per_epoch: stop each epoch after that many batches (None: the whole dataset).

        An epoch makes floor(batches / K) updates of K = runner.grad_accum_steps batches each (a remainder of
        fewer than K batches is left out). The loop stops only between updates, so every log point, checkpoint
        and resume falls on an update boundary (runner.step_in_epoch: batches, a multiple of K).
        """
        _check_positive("epochs", epochs)
        _check_positive("steps_per_epoch", steps_per_epoch, none_ok=True)
        stopping = self.early_stopping
        if stopping is not None and stopping.metric.startswith("val_") and validation_data is None:
            raise ValueError(f"early stopping on {stopping.metric} needs validation_data")
        runner = self.runner
        source = data.batch_source(train_data, runner.strategy, steps_per_epoch)
        total = min(source.steps, steps_per_epoch or source.steps)
        self.concrete_steps["train"] = runner.prepare(source.element_spec, "train",
                                                      source=source if source.in_loop else None)
        if stopping is not None:
            stopping.watch(self.model, runner.strategy)
        self._open_checkpoints()
        if validation_data is not None:
            self.concrete_steps["eval"] = runner.prepare(validation_data.element_spec, "eval")
        self.stop_training = False
        self.stopped_by = []
        self._call("on_train_begin", self)

        accumulate = runner.grad_accum_steps
        updates = total // accumulate
        step = int(self.optimizer.step.numpy())
        skip = int(runner.step_in_epoch.numpy())
        if updates < 1:
            raise ValueError(f"grad_accum_steps={accumulate} needs at least {accumulate} batches per epoch, "
                             f"got {total}")
        if skip % accumulate:
            raise ValueError(f"the checkpoint stopped {skip} batches into an epoch, not after a whole update of "
                             f"grad_accum_steps={accumulate} batches")
        first = epochs if stopping is not None and stopping.stopped else int(runner.epoch.numpy())
        for epoch in range(first, epochs):
            iterator = source.start(epoch, skip)
            if not skip:
                runner.train_loss.reset()
                runner.train_accuracy.reset()
            started = time.monotonic()
            done = skip // accumulate
            # A resumed epoch's bar counts the updates still to do, so its rate and ETA stay honest.
            bar = tqdm(total=updates - done, unit="step", disable=None if self.progress else True, leave=True,
                       desc=f"epoch {epoch + 1}/{epochs}" + (f" (resumed after step {done})" if skip else ""))
            skip = 0
            stop = False
            try:
                while done < updates and not (stop := self._stop_agreed()):
                    length = self._loop_length(step, done, updates)
                    try:
                        runner.train(iterator, tf.constant(length, tf.int32))
                    except tf.errors.OutOfRangeError:
                        raise ValueError(f"train_data({epoch}) ended before {total} batches") from None
                    step += length
                    done += length
                    bar.update(length)
                    if step % self.log_every == 0:
                        self._log_point(step, bar)
                    if (self.checkpoint_every and step % self.checkpoint_every == 0
                            and done != updates and not self._stop_agreed()):
                        self.save(epoch, done * accumulate)
                self.check_finite()
                if stop:
                    self.save(epoch, done * accumulate)
                    break
                record = self._end_epoch(epoch, step, validation_data, started)
                if stopping is not None and stopping.update(epoch + 1, record):
                    self.stop_training = True
            finally:
                bar.close()
            self.save(epoch + 1, 0)
            with runner.averaged_weights():  # callbacks see the model evaluated (TensorBoard's pictures, histograms)
                self._call("on_epoch_end", epoch + 1, step, record)
            if self._stop_agreed():
                break
        self.history.stopped = self._why_stopped(epochs)
        with runner.averaged_weights():
            self._call("on_train_end", self, self.history)
        return self.history

    def _stop_agreed(self):
        """Whether the run stops here: `stop_training` (set by a callback, a signal's handler, early stopping)
        on any worker. Every worker votes at the same points (before each compiled call, at each periodic
        checkpoint, after each epoch) and gets the same answer, so all of them stop at the same step and save
        the same checkpoint; a worker stopping alone would leave the others waiting in a collective.
        `stopped_by`: who asked."""
        asked = self._vote(bool(self.stop_training))
        if asked:
            self.stopped_by = asked
        return bool(asked)

    def _why_stopped(self, epochs):
        """History.stopped; restores the best epoch's weights when early stopping was asked to and the run
        ended (a run stopped from outside keeps its last weights, which its checkpoint holds)."""
        stopping = self.early_stopping
        done = int(self.runner.epoch.numpy())
        reason = ("early_stopping" if stopping is not None and stopping.stopped else
                  "epochs" if done >= epochs and not self.stopped_by else "stopped")
        record = {"reason": reason, "epoch": done}
        if stopping is not None:
            record.update(stopping.summary(), restored=reason != "stopped" and stopping.restore())
        return record

    def _end_epoch(self, epoch, step, validation_data, started):
        runner = self.runner
        record = {"epoch": epoch + 1, "step": step,
                  "loss": float(runner.train_loss.result()), "accuracy": float(runner.train_accuracy.result()),
                  "learning_rate": float(runner.learning_rate.numpy())}
        if validation_data is not None:
            results = self.evaluate(validation_data)
            record.update(val_loss=results["loss"], val_accuracy=results["accuracy"])
        record["seconds"] = time.monotonic() - started
        self.history.epochs.append(record)
        return record

    def evaluate(self, dataset):
        """Mean loss and accuracy of the model (training=False) over every batch of `dataset`, with the weights
        evaluation uses (the moving averages with the runner's ema)."""
        runner = self.runner
        self.concrete_steps["eval"] = runner.prepare(dataset.element_spec, "eval")
        runner.eval_loss.reset()
        runner.eval_accuracy.reset()
        runner.settle_moving_statistics()
        with runner.averaged_weights():
            runner.evaluate(iter(runner.distribute(dataset, "eval")))
        return {"loss": float(runner.eval_loss.result()), "accuracy": float(runner.eval_accuracy.result())}
