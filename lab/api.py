"""Train the codelab's networks from Python: the data, the settings, the model, fit and evaluate.

    from lab import mnist, settings, build, fit, evaluate
    data = mnist()                                   # found as train.py finds it (see mnist())
    config = settings("dense", epochs=5)             # the model's codelab settings, with changes
    model = build("dense", config, data)             # seeded, built for the data's image shape
    history = fit(model, data, config)               # History: history.epochs, history.stopped
    evaluate(model, data.test)                       # {"loss": ..., "accuracy": ...}

fit() runs the same pieces train.py runs (core.trainer.Trainer over data.GatheredBatches, the learning-rate
rule lr(step) = lr_min + learning_rate * lr_decay ^ (step / k), Adam or SGD), with no run directory; given a
checkpoint_dir it saves there and resumes from it exactly, as train.py does in <run dir>/checkpoints.
"""
import dataclasses
import difflib

import numpy as np
import tensorflow as tf

import datasets
from core import data as batches, names
from core.data import Examples
from core.config import TrainingConfig
from core.early_stopping import EarlyStopping
from core.layers import Sequential
from core.losses import softmax_cross_entropy
from core.trainer import Runner, Trainer
from models import REGISTRY

__all__ = ["Data", "DataNotFound", "mnist", "settings", "build", "fit", "evaluate", "predictions",
           "learning_rate_schedule", "make_optimizer"]

HOLDOUT_EXAMPLES = 5000


class DataNotFound(RuntimeError):
    """The data set is not on this machine and cannot be downloaded; the message says, in one line, what to do.
    Jupyter shows it as that line, without a traceback."""

    def _render_traceback_(self):
        return [f"{type(self).__name__}: {self}"]


@dataclasses.dataclass(frozen=True)
class Data:
    """A data set's splits as core.data.Examples: images [n, H, W, C] (uint8 pixels, x = pixel / 255 in [0, 1]
    when batched) and int32 labels [n]; split.dataset() is the per-example tf.data Dataset of (x, label)."""
    train: Examples
    validation: Examples
    test: Examples
    image_shape: tuple
    num_classes: int
    directory: str

    def subset(self, train=None, test=None):
        """These data with only the first `train` training and the first `test` test examples (None: all);
        a validation split that is the test set is cut with it. The notebooks' small setting uses it."""
        cut_test = self.test if test is None else self.test.take(test)
        validation = cut_test if self.validation is self.test else self.validation
        return dataclasses.replace(self, train=self.train if train is None else self.train.take(train),
                                   validation=validation, test=cut_test)


def mnist(data_dir=None, dataset="mnist", validation="test", download=True):
    """The data set's four IDX files, found as train.py finds them: `data_dir` (its --data_dir), else
    $TF_BY_HAND_DATA_DIR, else the download cache ~/.cache/tf-by-hand/<dataset>, downloaded there when missing.

    validation: "test" (the 10,000 test images, as the codelab) or "holdout" (the last 5,000 training images).
    Raises DataNotFound with one line saying how to get the files.
    """
    if validation not in ("test", "holdout"):
        raise ValueError(f"validation must be 'test' or 'holdout', got {validation!r}")
    try:
        loaded = datasets.load(dataset, data_dir, download=download, progress=False)
    except datasets.DataError as error:
        raise DataNotFound(str(error)) from None
    train, held_out = loaded.train, loaded.test
    if validation == "holdout":
        train, held_out = loaded.train.split(HOLDOUT_EXAMPLES)
    return Data(train, held_out, loaded.test, loaded.image_shape, loaded.num_classes, loaded.directory)


def settings(model="dense", **changes):
    """The TrainingConfig of `model`'s codelab step (models.REGISTRY), with `changes` (any TrainingConfig field);
    SettingError (a ValueError) names a bad value."""
    spec = REGISTRY[model] if model in REGISTRY else _unknown(model)
    fields = [field.name for field in dataclasses.fields(TrainingConfig)]
    for name in changes:
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"unknown setting {name!r}; {hint}the settings are: {', '.join(fields)}")
    return TrainingConfig(**{**spec.settings, **changes})


def _unknown(model):
    raise ValueError(f"unknown model {model!r}; choose one of: {', '.join(REGISTRY)}")


def build(model="dense", config=None, data=None):
    """A fresh `model` (a name of models.REGISTRY) with its initial weights drawn from config.seed, as train.py
    draws them, built for the data's images (MNIST's 28x28x1 in 10 classes without `data`)."""
    config = config or settings(model)
    _expect(config, TrainingConfig, "config must be a TrainingConfig, such as lab.settings('dense')")
    if data is not None:
        _expect(data, Data, "data must be a lab.Data, such as lab.mnist()")
    spec = REGISTRY[model] if model in REGISTRY else _unknown(model)
    image_shape, num_classes = (data.image_shape, data.num_classes) if data else ((28, 28, 1), 10)
    tf.config.experimental.enable_op_determinism()
    tf.random.set_seed(config.seed)
    network = spec.build(config.dropout, num_classes=num_classes)
    network.build((None, *image_shape))
    return network


learning_rate_schedule = names.learning_rate_schedule
make_optimizer = names.optimizer


def steps_per_epoch(config, train):
    """config.steps_per_epoch, at most one pass over `train` (ValueError if the batch is larger than `train`)."""
    count = len(train)
    full = count // config.batch_size
    if full < 1:
        raise ValueError(f"batch_size={config.batch_size} is larger than the {count:,} training images")
    return min(config.steps_per_epoch or full, full)


def fit(model, data, config, callbacks=(), checkpoint_dir=None, early_stopping=None,
        early_stopping_metric="val_loss", restore_best=False, gradients="tape", progress=False):
    """Trains `model` in place on data.train, evaluating data.validation after each epoch; returns the History
    (history.epochs: per-epoch loss, accuracy, val_loss, val_accuracy; history.stopped: why and when it ended).

    callbacks: core.trainer.Callback-like objects (LiveCurves draws the curves in Jupyter).
    checkpoint_dir: save there each epoch (and every config.checkpoint_every steps) and resume from it, exactly,
      as train.py does; None: nothing is written.
    early_stopping: stop after that many epochs without an improvement of `early_stopping_metric`
      (val_loss, val_accuracy, loss, accuracy); restore_best: the model ends with the best epoch's weights.
    gradients: "tape" (tf.GradientTape) or "by_hand" (each layer's backward pass, docs/backprop.md).
    With config.ema the model ends with the moving averages of its weights, which each epoch was evaluated with.
    """
    _expect(model, Sequential, "model must be a network, such as lab.build('dense', config, data)")
    _expect(data, Data, "data must be a lab.Data, such as lab.mnist()")
    _expect(config, TrainingConfig, "config must be a TrainingConfig, such as lab.settings('dense')")
    if gradients not in ("tape", "by_hand"):
        raise ValueError(f"gradients must be 'tape' or 'by_hand', got {gradients!r}")
    steps = steps_per_epoch(config, data.train)
    schedule = learning_rate_schedule(config, steps // config.grad_accum_steps)  # in updates
    stopping = (EarlyStopping(early_stopping, early_stopping_metric, restore_best)
                if early_stopping or restore_best else None)
    runner = Runner(model, make_optimizer(config, schedule), compute_gradients=names.gradient_function(gradients),
                    precision=config.precision, jit_compile=config.jit_compile,
                    grad_accum_steps=config.grad_accum_steps, ema=config.ema)
    trainer = Trainer(runner, callbacks=list(callbacks), log_every=config.log_every,
                      checkpoint_dir=checkpoint_dir and str(checkpoint_dir),
                      checkpoint_every=config.checkpoint_every if checkpoint_dir else None,
                      keep_checkpoints=config.keep_checkpoints, progress=progress,
                      steps_per_loop=config.steps_per_loop, early_stopping=stopping)
    tf.config.experimental.enable_op_determinism()
    history = trainer.fit(batches.GatheredBatches(data.train, config.batch_size, config.seed), config.epochs,
                          validation_data=batches.evaluation_batches(data.validation), steps_per_epoch=steps)
    if runner.ema is not None:  # what the epochs were evaluated with, as Keras's fit ends with use_ema
        runner.ema.assign_to(runner.trainable)
    return history


def _arrays(dataset):
    """(images float32 [N, ...], labels int [N]) of Examples, of a per-example Dataset, or of an (images, labels)
    pair."""
    if isinstance(dataset, Examples):
        (images, labels), = batches.evaluation_batches(dataset, len(dataset))
        return images.numpy(), labels.numpy()
    if isinstance(dataset, tf.data.Dataset):
        images, labels = zip(*[(x.numpy(), y.numpy()) for x, y in dataset.batch(1000)])
        return np.concatenate(images), np.concatenate(labels)
    if not (isinstance(dataset, (tuple, list)) and len(dataset) == 2):
        raise TypeError(f"expected Examples (such as data.test), a tf.data.Dataset of (x, label), or a pair (images "
                        f"[N, ...], labels [N]), got {_kind(dataset)}")
    images, labels = np.asarray(dataset[0], np.float32), np.asarray(dataset[1])
    if images.ndim < 2 or labels.shape != images.shape[:1]:
        raise ValueError(f"expected images [N, ...] and labels [N], got images {list(images.shape)} and labels "
                         f"{list(labels.shape)}")
    return images, labels


def _expect(value, kind, wanted):
    """TypeError '<wanted>, got <what value is>' unless value is a `kind`."""
    if not isinstance(value, kind):
        raise TypeError(f"{wanted}, got {_kind(value)}")


def _kind(value):
    """What was passed instead, in a few words: 'str', 'NoneType', 'list of 3'."""
    size = f" of {len(value)}" if isinstance(value, (tuple, list)) else ""
    return type(value).__name__ + size


def predictions(model, dataset):
    """(images, labels, predicted classes, logits) of every example of `dataset`, in inference mode."""
    images, labels = _arrays(dataset)
    if not len(images):
        raise ValueError("no examples to predict")
    logits = np.concatenate([model(images[i:i + 1000], training=False).numpy()
                             for i in range(0, len(images), 1000)])
    classes = logits.shape[1]
    if labels.min() < 0 or labels.max() >= classes:
        raise ValueError(f"labels must be in [0, {classes}) for this model's {classes} classes, got "
                         f"{labels.min()} to {labels.max()}")
    return images, labels, logits.argmax(axis=1), logits


def evaluate(model, dataset):
    """{"loss": mean cross-entropy, "accuracy"} of `model` (inference mode) over `dataset`."""
    _, labels, predicted, logits = predictions(model, dataset)
    loss = float(softmax_cross_entropy(tf.constant(logits), tf.constant(labels)).numpy())
    return {"loss": loss, "accuracy": float(np.mean(predicted == labels))}
