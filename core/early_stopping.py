"""Early stopping and the best epoch's weights, as state the checkpoint keeps.

    stopping = EarlyStopping(patience=3, metric="val_loss", restore_best=True)
    Trainer(Runner(model, optimizer), early_stopping=stopping).fit(...)

After each epoch the trainer calls `update(epoch, record)` before it saves the epoch's checkpoint:

    improved = value < best   (a loss)          or   value > best   (an accuracy)
    improved:  best <- value, best_epoch <- epoch, wait <- 0, best weights <- the model's variables
    otherwise: wait <- wait + 1;  wait = patience  ->  stop (stopped_epoch <- epoch)

`best`, `best_epoch`, `wait`, `stopped_epoch` and the copy of the best weights are variables of this
tf.Module, saved in every checkpoint, so a resumed run makes the same decisions at the same epochs as
one that was never interrupted.
"""
import math

import tensorflow as tf

__all__ = ["EarlyStopping", "METRICS"]

# The per-epoch figures early stopping can watch, and whether smaller is better.
METRICS = {"val_loss": "min", "val_accuracy": "max", "loss": "min", "accuracy": "max"}


class EarlyStopping(tf.Module):
    """Stops after `patience` epochs without an improvement of `metric` (None: never stops, only tracks
    the best epoch); with `restore_best`, keeps a copy of the best epoch's model variables."""

    def __init__(self, patience=None, metric="val_loss", restore_best=False):
        super().__init__(name="early_stopping")
        if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 1):
            raise ValueError(f"early stopping: patience must be a positive integer or None, got {patience!r}")
        if metric not in METRICS:
            raise ValueError(f"early stopping: metric must be one of {', '.join(METRICS)}, got {metric!r}")
        self.patience = patience
        self.metric = metric
        self.restore_best = bool(restore_best)
        self.smaller_is_better = METRICS[metric] == "min"
        self.best = tf.Variable(math.inf if self.smaller_is_better else -math.inf, dtype=tf.float64,
                                trainable=False, name="best")
        self.best_epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="best_epoch")
        self.wait = tf.Variable(0, dtype=tf.int64, trainable=False, name="wait")
        self.stopped_epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="stopped_epoch")
        self.best_weights = []
        self._watched = lambda: ()  # the model's variables, out of the checkpoint's reach (the model saves them)

    def watch(self, model, strategy=None):
        """Creates the copy of `model`'s variables (once, under `strategy`'s scope) for restore_best."""
        if not self.restore_best or self.best_weights:
            return
        variables = list(model.variables)
        self._watched = lambda: variables
        with (strategy or tf.distribute.get_strategy()).scope():
            self.best_weights = [tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False, name="best_weight")
                                 for v in variables]

    @property
    def stopped(self):
        """Whether a previous update decided to stop (also after a resume from that epoch's checkpoint)."""
        return int(self.stopped_epoch.numpy()) > 0

    def update(self, epoch, record):
        """Takes epoch `epoch`'s figures (a dict holding `metric`); returns True when training should stop."""
        if self.metric not in record:
            raise ValueError(f"early stopping watches {self.metric}, which the epoch's figures lack "
                             f"(validation data gives val_loss and val_accuracy)")
        value = float(record[self.metric])
        best = float(self.best.numpy())
        if value < best if self.smaller_is_better else value > best:
            self.best.assign(value)
            self.best_epoch.assign(epoch)
            self.wait.assign(0)
            for copy, variable in zip(self.best_weights, self._watched()):
                copy.assign(variable)
        else:
            self.wait.assign_add(1)
        if self.patience is not None and int(self.wait.numpy()) >= self.patience:
            self.stopped_epoch.assign(epoch)
            return True
        return False

    def restore(self):
        """Assigns the best epoch's weights to the model; False when no epoch was recorded."""
        if not self.restore_best or int(self.best_epoch.numpy()) == 0:
            return False
        for copy, variable in zip(self.best_weights, self._watched()):
            variable.assign(copy)
        return True

    def summary(self):
        """{"metric", "best", "best_epoch", "patience", "stopped_epoch" (None when it did not stop)}."""
        best_epoch = int(self.best_epoch.numpy())
        return {"metric": self.metric, "best": float(self.best.numpy()) if best_epoch else None,
                "best_epoch": best_epoch or None, "patience": self.patience,
                "stopped_epoch": int(self.stopped_epoch.numpy()) or None, "restore_best": self.restore_best}
