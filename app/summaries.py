"""TensorBoard logs of a training run, as a Trainer callback, and the PNG pictures it leaves behind.

    tensorboard = TensorBoard(run_dir, sample_images, sample_labels, hparams=config.hparams(),
                              schedule=schedule, total_steps=epochs * steps_per_epoch)
    Trainer(Runner(model, optimizer), callbacks=[tensorboard]).fit(...)
    tensorboard --logdir runs          # then http://localhost:6006

The callback knows no data set and no model beyond the Trainer's callback protocol and Sequential's
`layers`, `layer_names`, `named_variables()`, `activations(x)` and `__call__(x)` -> logits. Layout under
`logdir` (TensorBoard lists three runs per training run: `<run>`, `<run>/train`, `<run>/validation`):

    train/        scalars  loss, accuracy          every log point: mean over the steps since the previous one
                           learning_rate           every log point (and at an epoch end between log points)
                           epoch_loss, epoch_accuracy   each epoch end: mean over the whole epoch
    validation/   scalars  loss, accuracy          each epoch end (same tags as train/: one chart, two curves)
    . (logdir)    histograms <layer>/<variable>    every summaries_every_epochs-th epoch end (default: each)
                                                   and the last (at total_steps):
                                                   conv1/w, conv1/b, conv1_bn/moving_mean, ...
                             activations/<layer>   same epoch ends: every layer's output on the sample images
                                                   (a fixed random subset of histogram_values if larger)
                             gradients/<layer>/<variable>   same epoch ends, with `gradients`: the gradient
                                                   the epoch's last update applied (Runner.named_gradients)
                  scalars  gradient_norm/<layer>   each epoch end, with `gradients`: sqrt of the sum of that
                                                   gradient's squares over the layer's trainable variables
                  images   predictions             same epoch ends: sample digits, misrecognised first in red
                           font_digits             same epoch ends: printed digits 0-9 and their predictions
                  graph                            once: the compiled train step
                  hparams  session (hparams dict)  once per fit; scalars hparams/final_val_accuracy,
                           hparams/best_val_accuracy, hparams/final_val_loss, hparams/final_train_accuracy,
                           hparams/final_train_loss each epoch end (the dashboard shows the latest)
    curves.png, learning_rate.png, predictions.png    at the end of training

The step axis is the global training step (updates done). Writers are flushed at every log point and
epoch end, so the logs of a run that crashes are complete up to its last log point. A resumed run
appends new event files to the same directories (log points replayed after a crash appear twice).
"""
import os

import numpy as np
import tensorflow as tf
# summary_v2 is what hparams.api re-exports, without api's Keras callback (which imports all of Keras, 1 s).
from tensorboard.plugins.hparams import summary_v2 as hp
from tensorboard.plugins.histogram import metadata as histogram_metadata

from app import pictures
from core.trainer import Callback

# (tag, display name) of the final figures shown in the HParams dashboard, written into logdir.
HPARAM_METRICS = (
    ("hparams/final_val_accuracy", "validation accuracy"),
    ("hparams/best_val_accuracy", "best validation accuracy"),
    ("hparams/final_val_loss", "validation loss"),
    ("hparams/final_train_accuracy", "training accuracy (last epoch)"),
    ("hparams/final_train_loss", "training loss (last epoch)"),
)


BUCKETS = 30  # TensorBoard's default bucket count


def histogram_buckets(x, buckets=BUCKETS):
    """TensorBoard's histogram of all values of x (any shape, not empty): [buckets, 3] float64 rows
    (left edge, right edge, count) of equal width from min(x) to max(x), a value v in bucket

        i = min(floor((v - min) / width), buckets - 1),   width = (max - min) / buckets

    and all values in the last bucket, both of whose edges are that value, when they are all equal. The
    counts are a bincount, where tf.summary.histogram sums a [size, buckets] one-hot: the same rows for a
    fraction of the work."""
    x = tf.cast(tf.reshape(x, [-1]), tf.float64)
    low, high = tf.reduce_min(x), tf.reduce_max(x)
    width = (high - low) / buckets
    spread = width > 0
    index = tf.minimum(tf.cast(tf.floor((x - low) / tf.where(spread, width, 1.0)), tf.int32), buckets - 1)
    counts = tf.math.bincount(tf.where(spread, index, buckets - 1), minlength=buckets, maxlength=buckets,
                              dtype=tf.float64)
    edges = tf.concat([tf.linspace(low, high, buckets + 1)[:-1], [high]], 0)  # the last edge is max exactly
    left = tf.where(spread, edges[:-1], high)
    right = tf.where(spread, edges[1:], high)
    return tf.stack([left, right, counts], axis=1)


# One trace for every tensor: its values flattened to float64.
_compiled_buckets = tf.function(histogram_buckets, autograph=False,
                                input_signature=[tf.TensorSpec([None], tf.float64)])


def write_histograms(named_tensors):
    """tf.summary.histogram(tag, x) for each (tag, x), into the default writer at its step."""
    metadata = histogram_metadata.create_summary_metadata(display_name=None, description=None)
    for tag, x in named_tensors:
        values = tf.cast(tf.reshape(x, [-1]), tf.float64)  # a variable is read here (ON_READ: aggregated)
        tf.summary.write(tag, _compiled_buckets(values), metadata=metadata)


SCHEDULE_POINTS = 2_000  # learning_rate.png is 700 pixels wide: more points would draw nothing more


def drawn_steps(total, points=SCHEDULE_POINTS):
    """The steps 1..total at which learning_rate.png evaluates the schedule: every one of them up to `points`,
    else `points` steps evenly spread from the first to the last, so that a run planned for any number of epochs
    draws its schedule in the same time and memory."""
    if total <= points:
        return np.arange(1, total + 1)
    return np.unique(np.linspace(1, total, points).round().astype(np.int64))


def _hparam_value(value):
    """HParams take bool, int, float or str; anything else (None, tuples) is shown as its str."""
    return value if isinstance(value, (bool, int, float, str)) else str(value)


def layer_norms(named_gradients):
    """[(layer, ||gradient||)] in layer order: sqrt(sum of squares over the layer's trainable variables), from
    [('<layer>/<variable>', gradient)] (Runner.named_gradients())."""
    squares = {}
    for tag, gradient in named_gradients:
        layer = tag.split("/")[0]
        squares[layer] = squares.get(layer, 0.0) + float(tf.reduce_sum(tf.square(gradient)))
    return [(layer, float(np.sqrt(total))) for layer, total in squares.items()]


class TensorBoard(Callback):
    """Trainer callback writing scalars, histograms, images, the graph and hparams (layout: module docstring).

    logdir: directory of the run (event files go into it and its train/ and validation/ subdirectories,
      the PNG pictures into it).
    sample_images [N, H, W, C] floats, sample_labels [N] ints: a fixed batch (e.g. the first 1,000 test
      images) for the activation histograms and the prediction mosaic; None (both): neither of those.
    hparams: {name: bool | int | float | str} for the HParams dashboard, or None for no hparams session.
    schedule: callable step -> learning rate (the optimizer's), drawn over total_steps in learning_rate.png.
    total_steps: the run's planned number of steps (default: the last step reached).
    font_digits: also predict printed digits 0-9 (app.pictures.font_digits, 28x28x1) every epoch; for a model
      of MNIST's digits only (its sample images must be 28x28x1).
    mosaic_size: digits in the prediction mosaic (the misrecognised ones first).
    summaries_every_epochs: histograms and images (the costly part of an epoch end, ~0.1 s) at every n-th
      epoch end and the last one (at total_steps) only, the scalars at each; 0: none.
    histogram_values: an activation with more values than this (conv1 of conv_bn_big on 1,000 images has
      18.8 million) is histogrammed from this many of them, drawn at fixed positions (a stateless draw
      that leaves TF's random state alone); variables are always histogrammed whole.
    gradients: histogram the gradients the last update applied (the trainer's Runner.named_gradients(), with
      the variables) and write their per-layer norms each epoch.
    """

    def __init__(self, logdir, sample_images=None, sample_labels=None, hparams=None, schedule=None,
                 total_steps=None, font_digits=True, mosaic_size=100, histogram_values=250_000,
                 summaries_every_epochs=1, gradients=False):
        if (sample_images is None) != (sample_labels is None):
            raise ValueError("TensorBoard: give both sample_images and sample_labels, or neither")
        if sample_images is not None:
            images = np.asarray(sample_images, np.float32)
            labels = np.asarray(sample_labels).astype(np.int64)
            if images.ndim != 4 or labels.shape != images.shape[:1]:
                raise ValueError(f"TensorBoard: expected sample_images [N,H,W,C] and sample_labels [N], got "
                                 f"images {list(images.shape)} and labels {list(labels.shape)}")
            if font_digits and images.shape[1:] != (pictures.MNIST_SIZE, pictures.MNIST_SIZE, 1):
                raise ValueError(f"TensorBoard: font_digits are 28x28x1 digits, the sample images are "
                                 f"{list(images.shape[1:])}; pass font_digits=False")
        if mosaic_size < 1 or histogram_values < 1 or summaries_every_epochs < 0:
            raise ValueError(f"TensorBoard: mosaic_size and histogram_values must be >= 1 and "
                             f"summaries_every_epochs >= 0, got {mosaic_size}, {histogram_values} and "
                             f"{summaries_every_epochs}")
        self.logdir = str(logdir)
        self.sample_images = None if sample_images is None else tf.constant(images)
        self.sample_labels = None if sample_labels is None else labels
        self.summaries_every_epochs = summaries_every_epochs
        self.hparams = None if hparams is None else {name: _hparam_value(v) for name, v in hparams.items()}
        self.schedule = schedule
        self.total_steps = total_steps
        self.font_images, self.font_labels = pictures.font_digits() if font_digits else (None, None)
        self.mosaic_size = mosaic_size
        self.histogram_values = histogram_values
        self.gradients = gradients
        self.named_gradients = []
        self.model = None
        self.writers = {}
        self.last_logged_step = None
        self.best_val_accuracy = None
        self.latest_pictures = None  # _pictures() of the last epoch end

    # ------------------------------------------------------------------------------------ callbacks

    def on_train_begin(self, trainer):
        """Opens the writers; writes the train step's graph and the hparams session."""
        self.model = trainer.model
        self.named_gradients = trainer.runner.named_gradients() if self.gradients else []
        restored = [e["val_accuracy"] for e in trainer.history.epochs if "val_accuracy" in e]  # a resumed run
        self.best_val_accuracy = max(restored, default=None)
        if not self.writers:
            self.writers = {name: tf.summary.create_file_writer(os.path.join(self.logdir, subdir))
                            for name, subdir in (("run", ""), ("train", "train"), ("validation", "validation"))}
        concrete_step = trainer.concrete_steps.get("train")
        with self.writers["run"].as_default(step=0):
            if concrete_step is not None:
                tf.summary.graph(concrete_step.graph)
            if self.hparams is not None:
                hp.hparams_config(hparams=[hp.HParam(name) for name in self.hparams],
                                  metrics=[hp.Metric(tag, display_name=name) for tag, name in HPARAM_METRICS])
                hp.hparams(self.hparams, trial_id=os.path.basename(os.path.abspath(self.logdir)))
        self._flush()

    def on_log(self, step, logs):
        """Training loss, accuracy (means since the previous log point) and learning rate at `step`."""
        with self.writers["train"].as_default(step=step):
            for name in ("loss", "accuracy", "learning_rate"):
                if name in logs:
                    tf.summary.scalar(name, logs[name])
        self.writers["train"].flush()
        self.last_logged_step = step

    def on_epoch_end(self, epoch, step, logs):
        """Epoch means, validation figures, histograms, pictures and the hparams metrics at `step`."""
        with self.writers["train"].as_default(step=step):
            tf.summary.scalar("epoch_loss", logs["loss"])
            tf.summary.scalar("epoch_accuracy", logs["accuracy"])
            if step != self.last_logged_step and "learning_rate" in logs:
                tf.summary.scalar("learning_rate", logs["learning_rate"])
        if "val_loss" in logs:
            with self.writers["validation"].as_default(step=step):
                tf.summary.scalar("loss", logs["val_loss"])
                tf.summary.scalar("accuracy", logs["val_accuracy"])
        every = self.summaries_every_epochs
        last = self.total_steps is not None and step >= self.total_steps
        self.write_model_summaries(step, histograms_and_images=every > 0 and (epoch % every == 0 or last))
        if self.hparams is not None:
            self._write_hparam_metrics(step, logs)
        self._flush()

    def on_train_end(self, trainer, history):
        """curves.png, learning_rate.png and predictions.png into logdir; closes the writers."""
        self.model = trainer.model
        try:
            self.save_pictures(history, step=int(trainer.optimizer.step.numpy()))
        finally:
            for writer in self.writers.values():
                writer.close()
            self.writers = {}

    # ------------------------------------------------------------------------------------- writing

    def write_model_summaries(self, step, histograms_and_images=True):
        """The gradient norms, and when `histograms_and_images` the histograms of every variable, gradient and
        layer's activations, the prediction mosaic and the font digits, all at `step`, into logdir (one forward
        pass over the sample images)."""
        with self.writers["run"].as_default(step=step):
            for layer_name, norm in layer_norms(self.named_gradients):
                    tf.summary.scalar(f"gradient_norm/{layer_name}", norm)
            if not histograms_and_images:
                return
            activations = logits = None
            if self.sample_images is not None:
                activations = self.model.activations(self.sample_images, training=False)
                logits = activations[-1][1]
            named = list(self.model.named_variables())
            named += [(f"gradients/{tag}", gradient) for tag, gradient in self.named_gradients]
            named += [(f"activations/{layer_name}", self._some_values(output))
                      for layer_name, output in activations or []]
            write_histograms(named)
            shown = self._pictures(step, logits)
            if shown["mosaic"] is not None:
                # A description is stored with a tag's first value only, so it says nothing about one epoch.
                tf.summary.image("predictions", shown["mosaic"][np.newaxis], description=(
                    f"{min(self.mosaic_size, len(self.sample_labels))} of the {len(self.sample_labels):,} "
                    f"sample digits: the misrecognised ones first (red, labelled true→predicted), then the "
                    f"others."))
            if shown["font_row"] is not None:
                tf.summary.image("font_digits", shown["font_row"][np.newaxis], description=(
                    "Printed digits 0-9 from local fonts in MNIST style (out of distribution); misrecognised: "
                    "red, labelled true→predicted."))
        self.latest_pictures = shown

    def _some_values(self, x):
        """x flattened, or histogram_values of its values at positions that depend only on its size."""
        values = tf.reshape(x, [-1])
        size = int(values.shape[0])
        if size <= self.histogram_values:
            return values
        positions = tf.random.stateless_uniform([self.histogram_values], seed=[size, 0], maxval=size,
                                                dtype=tf.int64)
        return tf.gather(values, positions)

    def _write_hparam_metrics(self, step, logs):
        """The HParams dashboard shows each metric's latest value: written every epoch, so a crash keeps them."""
        figures = {"hparams/final_train_accuracy": logs["accuracy"], "hparams/final_train_loss": logs["loss"]}
        if "val_accuracy" in logs:
            self.best_val_accuracy = max(self.best_val_accuracy or 0.0, logs["val_accuracy"])  # over the run
            figures.update({"hparams/final_val_accuracy": logs["val_accuracy"],
                            "hparams/best_val_accuracy": self.best_val_accuracy,
                            "hparams/final_val_loss": logs["val_loss"]})
        with self.writers["run"].as_default(step=step):
            for tag, value in figures.items():
                tf.summary.scalar(tag, value)

    def _flush(self):
        for writer in self.writers.values():
            writer.flush()

    # ------------------------------------------------------------------------------------ pictures

    def _predict(self, images):
        return tf.argmax(self.model(tf.convert_to_tensor(images), training=False), axis=-1).numpy()

    def _pictures(self, step, logits=None):
        """{step, mosaic, wrong, font_row, font_wrong}: the sample images' mosaic and how many of them are
        misrecognised (None without sample images), the font digits' row (None without font digits) and its
        misrecognised count."""
        shown = {"step": step, "mosaic": None, "wrong": None, "font_row": None}
        if self.sample_images is not None:
            if logits is None:
                logits = self.model(self.sample_images, training=False)
            predictions = tf.argmax(logits, axis=-1).numpy()
            shown["wrong"] = int((predictions != self.sample_labels).sum())
            shown["mosaic"] = pictures.prediction_mosaic(self.sample_images.numpy(), self.sample_labels,
                                                         predictions, max_images=self.mosaic_size)
        if self.font_images is not None:
            font_predictions = self._predict(self.font_images)
            shown["font_wrong"] = int((font_predictions != self.font_labels).sum())
            shown["font_row"] = pictures.prediction_mosaic(self.font_images, self.font_labels, font_predictions,
                                                           columns=10, wrong_first=False)
        return shown

    def save_pictures(self, history, step=None):
        """curves.png (loss and accuracy), learning_rate.png and predictions.png into logdir."""
        os.makedirs(self.logdir, exist_ok=True)
        pictures.save_curves_png(os.path.join(self.logdir, "curves.png"), history.steps, history.epochs)

        logged = [(s["step"], s["learning_rate"]) for s in history.steps]
        logged_steps, logged_values = (list(v) for v in zip(*logged)) if logged else ([], [])
        reached = max([s["step"] for s in history.steps] + [e["step"] for e in history.epochs] + [step or 0])
        total = self.total_steps or reached
        schedule_steps = schedule_values = None
        if self.schedule is not None and total > 0:
            # The rate used by step s (1-based, what the logs show at s) is schedule(s - 1).
            schedule_steps = drawn_steps(total)
            values = np.asarray(self.schedule(tf.constant(schedule_steps - 1, tf.int64)), np.float64)
            schedule_values = np.broadcast_to(values, schedule_steps.shape)
        pictures.save_learning_rate_png(os.path.join(self.logdir, "learning_rate.png"), schedule_steps,
                                        schedule_values, logged_steps, logged_values)

        final_step = step or reached
        drawn = self.latest_pictures is not None and self.latest_pictures["step"] == final_step
        if self.model is not None and not drawn:
            self.latest_pictures = self._pictures(final_step)  # the model as it ends
        shown = self.latest_pictures
        if shown is not None and (shown["mosaic"] is not None or shown["font_row"] is not None):
            lines, parts = [], []
            if shown["mosaic"] is not None:
                lines.append(f"step {shown['step']:,}: {shown['wrong']} of {len(self.sample_labels):,} sample "
                             f"digits misrecognised, shown first in red (true→predicted)")
                parts.append(shown["mosaic"])
            if shown["font_row"] is not None:
                parts.append(shown["font_row"])
                where = "last row" if shown["mosaic"] is not None else f"step {shown['step']:,}"
                lines.append(f"{where}: printed digits, {shown['font_wrong']} of 10 misrecognised (red)")
            title = "\n".join(lines)
            pictures.save_image_png(os.path.join(self.logdir, "predictions.png"),
                                    pictures.stack_pictures(parts), title=title)
