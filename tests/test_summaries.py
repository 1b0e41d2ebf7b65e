"""TensorBoard logs and pictures (app/summaries.py, app/pictures.py): a tiny real Trainer on a few hundred
MNIST digits drives the callback for 2 short epochs; the event files are read back tag by tag. Then the
pictures on their own, a crash that leaves flushed logs, and train.py's run(config) end to end, in this process."""
import glob
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from tensorboard.plugins.hparams import metadata as hparams_metadata
from tensorboard.plugins.histogram import summary_v2 as tensorboard_histogram

from app import pictures
from core import data
from datasets import idx
from core.layers import Activation, BatchNorm, Conv2D, Dense, Dropout, Flatten, Sequential
from core.optimizers import SGD, Adam
from core.schedules import ExponentialDecay
from app.summaries import TensorBoard, drawn_steps, histogram_buckets, write_histograms
from core import backprop
from core.trainer import Callback, Runner, Trainer

BATCH, STEPS_PER_EPOCH, EPOCHS, LOG_EVERY, SAMPLES = 32, 8, 2, 3, 200
HPARAMS = {"model": "tiny", "batch_size": BATCH, "learning_rate": 0.01, "dropout": 0.2, "decay_steps": None}


def tiny_model():
    return Sequential([Conv2D(4, 3, strides=2, use_bias=False, name="conv1"), BatchNorm(name="conv1_bn"),
                       Activation("relu", name="conv1_relu"), Flatten(name="flatten"),
                       Dropout(0.2, name="dropout"), Dense(10, name="logits")], name="tiny")


def _written_order(path):
    """events.out.tfevents.<seconds>.<host>.<pid>.<counter>.v2 -> (seconds, counter), compared as numbers: two
    files opened within one second differ only by the counter, and "10" sorts before "2" as text."""
    parts = os.path.basename(path).split(".")
    return int(parts[3]), int(parts[-2])


def events(directory):
    """The Event protos of the event files directly in `directory`, file by file in the order they were opened."""
    for path in sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*")), key=_written_order):
        for record in tf.data.TFRecordDataset(path):
            yield tf.compat.v1.Event.FromString(record.numpy())


def read_events(directory):
    """(values, plugins, graph) of the event files directly in `directory`: values = {tag: [(step, ndarray)]}
    in file order, plugins = {tag: plugin name}, graph = the GraphDef written, or None."""
    values, plugins, graph = {}, {}, None
    for event in events(directory):
        if event.graph_def:
            graph = tf.compat.v1.GraphDef.FromString(event.graph_def)
        for value in event.summary.value:
            if value.metadata.plugin_data.plugin_name:  # TF 2 writes the metadata with a tag's first value
                plugins[value.tag] = value.metadata.plugin_data.plugin_name
            values.setdefault(value.tag, []).append((event.step, tf.make_ndarray(value.tensor)))
    return values, plugins, graph


def read_raw(directory):
    """[(step, Summary.Value)] of the event files directly in `directory`, with their metadata."""
    return [(event.step, value) for event in events(directory) for value in event.summary.value]


def graph_ops(graph):
    """Op types in a GraphDef, including those inside its functions (tf.cond branches)."""
    return {node.op for node in graph.node} | {node.op for f in graph.library.function for node in f.node_def}


def values_counted(values, tag):
    """How many values the latest histogram of `tag` counts (its bins are [left edge, right edge, count])."""
    return int(values[tag][-1][1][:, 2].sum())


def steps_of(values, tag):
    return [step for step, _ in values[tag]]


def scalars(values, tag):
    return [float(value) for _, value in values[tag]]


@pytest.fixture(scope="module")
def run(mnist_dir, tmp_path_factory):
    """2 epochs x 8 steps of batch 32 (log every 3 steps), validation and sample on 200 test digits."""
    logdir = tmp_path_factory.mktemp("summaries") / "tiny-run"
    train = idx.load(mnist_dir, "train").take(BATCH * STEPS_PER_EPOCH)
    test = idx.load(mnist_dir, "test").take(SAMPLES)
    (images, labels), = data.evaluation_batches(test, SAMPLES)
    schedule = ExponentialDecay(0.01, 0.5, STEPS_PER_EPOCH, staircase=True)
    tf.random.set_seed(1)
    model = tiny_model()
    tensorboard = TensorBoard(logdir, images, labels, hparams=HPARAMS, schedule=schedule,
                              total_steps=EPOCHS * STEPS_PER_EPOCH, mosaic_size=50)
    trainer = Trainer(Runner(model, Adam(schedule)), callbacks=[tensorboard], log_every=LOG_EVERY, progress=False)
    history = trainer.fit(lambda epoch: data.training_batches(train, BATCH, seed=1, epoch=epoch), EPOCHS,
                          validation_data=data.evaluation_batches(test, 100))
    return {"logdir": logdir, "model": model, "history": history, "schedule": schedule, "labels": labels,
            "trainer": trainer}


def test_training_scalars_every_log_point_and_learning_rate_is_the_schedule(run):
    values, plugins, _ = read_events(run["logdir"] / "train")
    logged = run["history"].steps
    assert [s["step"] for s in logged] == [3, 6, 9, 12, 15]
    for tag in ("loss", "accuracy"):
        assert plugins[tag] == "scalars"
        assert steps_of(values, tag) == [3, 6, 9, 12, 15]
        assert scalars(values, tag) == pytest.approx([s[tag] for s in logged], rel=1e-6)
    # learning_rate at each log point and at epoch ends that are not log points (8, 16); step s used schedule(s - 1)
    assert steps_of(values, "learning_rate") == [3, 6, 8, 9, 12, 15, 16]
    expected = [float(run["schedule"](step - 1)) for step in (3, 6, 8, 9, 12, 15, 16)]
    assert scalars(values, "learning_rate") == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx([0.01] * 3 + [0.005] * 4)
    epochs = run["history"].epochs
    assert steps_of(values, "epoch_loss") == steps_of(values, "epoch_accuracy") == [8, 16]
    assert scalars(values, "epoch_loss") == pytest.approx([e["loss"] for e in epochs], rel=1e-6)
    assert scalars(values, "epoch_accuracy") == pytest.approx([e["accuracy"] for e in epochs], rel=1e-6)


def test_validation_scalars_per_epoch_share_the_training_tags(run):
    values, plugins, _ = read_events(run["logdir"] / "validation")
    epochs = run["history"].epochs
    assert set(values) == {"loss", "accuracy"} and set(plugins.values()) == {"scalars"}
    assert steps_of(values, "loss") == steps_of(values, "accuracy") == [8, 16]
    assert scalars(values, "loss") == pytest.approx([e["val_loss"] for e in epochs], rel=1e-6)
    assert scalars(values, "accuracy") == pytest.approx([e["val_accuracy"] for e in epochs], rel=1e-6)


def test_histograms_of_every_variable_and_activation_per_epoch(run):
    values, plugins, _ = read_events(run["logdir"])
    model = run["model"]
    variables = {"conv1/w", "conv1_bn/gamma", "conv1_bn/beta", "conv1_bn/moving_mean",
                 "conv1_bn/moving_variance", "logits/w", "logits/b"}
    activations = {f"activations/{name}" for name in model.layer_names}
    assert {tag for tag, _ in model.named_variables()} == variables
    assert {tag for tag, plugin in plugins.items() if plugin == "histograms"} == variables | activations
    named = dict(model.named_variables())
    sizes = {tag: int(np.prod(variable.shape)) for tag, variable in named.items()}
    for tag in variables | activations:
        assert steps_of(values, tag) == [8, 16], tag
        bins = values[tag][-1][1]  # [k, 3]: left edge, right edge, count
        assert bins.ndim == 2 and bins.shape[1] == 3
        expected = sizes[tag] if tag in sizes else SAMPLES * (10 if tag == "activations/logits" else 4 * 14 * 14)
        assert values_counted(values, tag) == expected, tag
    bins, w = values["logits/w"][-1][1], named["logits/w"].numpy()  # the final weights' range
    assert bins[0, 0] == pytest.approx(w.min(), abs=1e-6) and bins[-1, 1] == pytest.approx(w.max(), abs=1e-6)


def test_prediction_and_font_digit_images_per_epoch(run):
    values, plugins, _ = read_events(run["logdir"])
    assert plugins["predictions"] == plugins["font_digits"] == "images"
    for tag, rows in (("predictions", 5), ("font_digits", 1)):
        assert steps_of(values, tag) == [8, 16]
        width, height, png = values[tag][-1][1]  # the image plugin's [width, height, PNG] strings
        picture = tf.io.decode_png(png).numpy()
        assert picture.shape == (int(height), int(width), 3)
        assert picture.shape[1] == 10 * (2 * 28 + 2) and picture.shape[0] == rows * (2 * 28 + 16 + 2), tag


def test_graph_of_the_train_step_once(run):
    _, _, graph = read_events(run["logdir"])
    assert {"Conv2D", "MatMul", "Conv2DBackpropFilter"} <= graph_ops(graph), sorted(graph_ops(graph))
    assert sum(bool(event.graph_def) for event in events(run["logdir"])) == 1
    for directory in ("train", "validation"):
        assert read_events(run["logdir"] / directory)[2] is None


def test_hparams_session_and_final_metrics(run):
    values, plugins, _ = read_events(run["logdir"])
    [(_, experiment_value)] = [v for v in read_raw(run["logdir"]) if v[1].tag == hparams_metadata.EXPERIMENT_TAG]
    experiment = hparams_metadata.parse_experiment_plugin_data(experiment_value.metadata.plugin_data.content)
    assert {h.name for h in experiment.hparam_infos} == set(HPARAMS)
    declared = {m.name.tag for m in experiment.metric_infos}
    assert declared == {"hparams/final_val_accuracy", "hparams/best_val_accuracy", "hparams/final_val_loss",
                        "hparams/final_train_accuracy", "hparams/final_train_loss"}
    [(_, start_value)] = [v for v in read_raw(run["logdir"]) if v[1].tag == hparams_metadata.SESSION_START_INFO_TAG]
    start = hparams_metadata.parse_session_start_info_plugin_data(start_value.metadata.plugin_data.content)
    assert start.hparams["model"].string_value == "tiny" and start.hparams["batch_size"].number_value == BATCH
    assert start.hparams["decay_steps"].string_value == "None"
    assert start.group_name == "tiny-run"
    epochs = run["history"].epochs
    for tag in declared:
        assert steps_of(values, tag) == [8, 16] and plugins[tag] == "scalars", tag
    assert scalars(values, "hparams/final_val_accuracy")[-1] == pytest.approx(epochs[-1]["val_accuracy"])
    assert scalars(values, "hparams/best_val_accuracy")[-1] == pytest.approx(max(e["val_accuracy"] for e in epochs))


def test_pictures_left_in_the_run_directory(run):
    for name, at_least in (("curves.png", (800, 300)), ("learning_rate.png", (500, 250)),
                           ("predictions.png", (580, 5 * 74 + 74))):
        with Image.open(run["logdir"] / name) as picture:
            picture.verify()
        with Image.open(run["logdir"] / name) as picture:
            assert picture.format == "PNG" and picture.size[0] >= at_least[0] and picture.size[1] >= at_least[1]
    assert not run["trainer"].callbacks[0].writers, "the writers are closed at the end"


# ------------------------------------------------------------------------------------------- pictures

def test_mosaic_puts_the_misrecognised_first_and_tints_them_red():
    images = np.zeros((12, 28, 28, 1), np.float32)
    images[:, 10:18, 10:18] = 1.0
    labels = np.arange(12) % 10
    predictions = labels.copy()
    predictions[[4, 9]] = [7, 0]  # examples 4 and 9 are wrong
    assert list(pictures.mosaic_order(labels, predictions)) == [4, 9, 0, 1, 2, 3, 5, 6, 7, 8, 10, 11]
    mosaic = pictures.prediction_mosaic(images, labels, predictions, columns=4, scale=2)
    cell_h, cell_w = 2 * 28 + 16 + 2, 2 * 28 + 2
    assert mosaic.dtype == np.uint8 and mosaic.shape == (3 * cell_h, 4 * cell_w, 3)

    def cell(slot):
        top, left = (slot // 4) * cell_h + 1, (slot % 4) * cell_w + 1
        return mosaic[top:top + 56, left:left + 56].astype(int)

    for slot in (0, 1):  # wrong: red ink on a dark red background
        ink, background = cell(slot)[28, 28], cell(slot)[2, 2]
        assert ink[0] == 255 and ink[1] < 80 and ink[2] < 80, ink
        assert background[0] == pictures.WRONG_BACKGROUND and background[1] == background[2] == 0
    for slot in range(2, 12):  # right: white on black
        assert list(cell(slot)[28, 28]) == [255] * 3 and list(cell(slot)[2, 2]) == [0] * 3
    with pytest.raises(ValueError, match="prediction_mosaic: expected images"):
        pictures.prediction_mosaic(images, labels[:5], predictions)


def test_font_digits_are_ten_mnist_style_images():
    images, labels = pictures.font_digits()
    assert images.shape == (10, 28, 28, 1) and images.dtype == np.float32
    assert list(labels) == list(range(10))
    assert images.min() >= 0.0 and images.max() <= 1.0
    rows, cols = np.indices((28, 28))
    for image in images[..., 0]:
        assert image.max() == pytest.approx(1.0)
        mass = image.sum()
        assert abs((rows * image).sum() / mass - 13.5) < 1.0 and abs((cols * image).sum() / mass - 13.5) < 1.0
        ink_rows, ink_cols = np.nonzero(image > 0.05)
        assert ink_rows.max() - ink_rows.min() <= 21 and ink_cols.max() - ink_cols.min() <= 21
        assert image[:2].max() < 0.05 and image[-2:].max() < 0.05  # a black border, like MNIST
    assert len({image.tobytes() for image in images}) == 10


def test_curves_and_learning_rate_pngs_without_log_points(tmp_path):
    epochs = [{"step": 30, "loss": 1.0, "accuracy": 0.7, "val_loss": 0.9, "val_accuracy": 0.75}]
    pictures.save_curves_png(tmp_path / "curves.png", [], epochs)
    pictures.save_learning_rate_png(tmp_path / "lr.png", np.arange(1, 31), np.full(30, 0.01), [], [])
    for name in ("curves.png", "lr.png"):
        with Image.open(tmp_path / name) as picture:
            picture.verify()


def test_a_run_planned_for_a_billion_epochs_draws_its_schedule_in_bounded_time(tmp_path, monkeypatch):
    """learning_rate.png evaluates the schedule at every step of a short run and at 2,000 steps spread over a long
    one: a run stopped early of 10^9 planned epochs of 937 steps draws it at once (every step would be 7 TB)."""
    assert list(drawn_steps(5)) == [1, 2, 3, 4, 5]
    assert len(drawn_steps(2_000)) == 2_000
    total = 10 ** 9 * 937
    steps = drawn_steps(total)
    assert len(steps) == 2_000 and steps[0] == 1 and steps[-1] == total and (np.diff(steps) > 0).all()
    drawn = {}
    save = pictures.save_learning_rate_png
    monkeypatch.setattr(pictures, "save_learning_rate_png",
                        lambda path, steps, values, *logged: drawn.update(steps=steps, values=values)
                        or save(path, steps, values, *logged))
    schedule = ExponentialDecay(0.01, 0.666, decay_steps=937, staircase=True)
    tensorboard = TensorBoard(tmp_path, schedule=schedule, total_steps=total, font_digits=False)
    history = Trainer(Runner(Sequential([Dense(2)]), Adam(0.01)), progress=False).history
    history.epochs.append({"epoch": 1, "step": 937, "loss": 1.0, "accuracy": 0.5})
    tensorboard.save_pictures(history, step=937)
    np.testing.assert_array_equal(drawn["steps"], steps)
    assert drawn["values"][0] == pytest.approx(0.01) and drawn["values"][-1] == 0.0
    with Image.open(tmp_path / "learning_rate.png") as picture:
        picture.verify()


# ---------------------------------------------------------------------------------------------- crash

class Crash(Callback):
    def on_epoch_end(self, epoch, step, logs):
        raise RuntimeError("crash after the first epoch")


def test_logs_are_flushed_before_a_crash(mnist_dir, tmp_path):
    """on_train_end is not called when an exception escapes fit(): the first epoch's logs are on disk anyway."""
    train = idx.load(mnist_dir, "train").take(128)
    test = idx.load(mnist_dir, "test").take(64)
    (images, labels), = data.evaluation_batches(test, 64)
    tensorboard = TensorBoard(tmp_path, images, labels, font_digits=False, histogram_values=5000)
    trainer = Trainer(Runner(tiny_model(), Adam(0.01)), callbacks=[tensorboard, Crash()], log_every=2, progress=False)
    with pytest.raises(RuntimeError, match="crash after the first epoch"):
        trainer.fit(lambda epoch: data.training_batches(train, 32, seed=1, epoch=epoch), 2,
                    validation_data=data.evaluation_batches(test, 64))
    assert tensorboard.writers, "still open: nothing closed them"
    train_values = read_events(tmp_path / "train")[0]
    assert steps_of(train_values, "loss") == [2, 4] and steps_of(train_values, "epoch_loss") == [4]
    assert steps_of(read_events(tmp_path / "validation")[0], "accuracy") == [4]
    run_values, plugins, graph = read_events(tmp_path)
    assert steps_of(run_values, "activations/logits") == [4] and steps_of(run_values, "predictions") == [4]
    # more than histogram_values values (64 x 14 x 14 x 4): a sample of 5000; fewer: all of them
    assert values_counted(run_values, "activations/conv1") == 5000
    assert values_counted(run_values, "activations/logits") == 64 * 10
    assert values_counted(run_values, "logits/w") == 784 * 10
    assert "font_digits" not in run_values and not any(p == "hparams" for p in plugins.values())
    assert graph is not None


def test_a_resumed_run_appends_event_files_and_keeps_the_best_accuracy(mnist_dir, tmp_path):
    """A second process (here: a second Trainer and callback) resumes from the checkpoint: new event files
    in the same directories, the step axis continues, best_val_accuracy covers the epochs before the resume."""
    train = idx.load(mnist_dir, "train").take(128)
    test = idx.load(mnist_dir, "test").take(64)
    (images, labels), = data.evaluation_batches(test, 64)

    def fit(epochs):
        tf.random.set_seed(1)
        tensorboard = TensorBoard(tmp_path, images, labels, hparams={"model": "tiny"}, font_digits=False)
        trainer = Trainer(Runner(tiny_model(), Adam(0.01)), callbacks=[tensorboard], log_every=2, progress=False,
                          checkpoint_dir=str(tmp_path / "checkpoints"))
        return trainer.fit(lambda epoch: data.training_batches(train, 32, seed=1, epoch=epoch), epochs,
                           validation_data=data.evaluation_batches(test, 64))

    fit(1)
    history = fit(2)
    assert len(glob.glob(str(tmp_path / "train" / "events.out.tfevents.*"))) == 2
    values = read_events(tmp_path)[0]
    assert steps_of(values, "hparams/best_val_accuracy") == [4, 8]
    best = max(e["val_accuracy"] for e in history.epochs)
    assert scalars(values, "hparams/best_val_accuracy")[-1] == pytest.approx(best)
    assert steps_of(read_events(tmp_path / "train")[0], "loss") == [2, 4, 6, 8]
    assert (tmp_path / "predictions.png").exists()


def test_the_callback_leaves_training_bit_identical(mnist_dir, tmp_path):
    """Its forward passes (training=False) and the stateless histogram sample draw nothing from TF's random
    state and update no moving statistics: the same seed gives the same weights with and without it."""
    train = idx.load(mnist_dir, "train").take(128)
    test = idx.load(mnist_dir, "test").take(64)
    (images, labels), = data.evaluation_batches(test, 64)

    def final_weights(callbacks):
        tf.random.set_seed(7)
        trainer = Trainer(Runner(tiny_model(), Adam(0.01)), callbacks=callbacks, log_every=2, progress=False)
        trainer.fit(lambda epoch: data.training_batches(train, 32, seed=1, epoch=epoch), 2)
        return [v.numpy() for v in trainer.model.variables]

    with_callback = final_weights([TensorBoard(tmp_path, images, labels, histogram_values=1000)])
    without = final_weights([])
    assert all(np.array_equal(a, b) for a, b in zip(with_callback, without))


@pytest.mark.parametrize("values", [
    np.random.default_rng(0).normal(size=(784, 200)).astype(np.float32),      # a weight matrix
    np.random.default_rng(1).exponential(size=(1000, 7, 7, 24)).astype(np.float32) * (np.arange(24) % 2),
    np.full([60], 0.25, np.float32),                                          # all equal: one bucket
    np.array([3.0], np.float32),
    np.array([-1.0, 2.0], np.float32),                                        # the max in the last bucket
    np.random.default_rng(2).integers(0, 5, size=1000).astype(np.int32),     # values on bucket edges
])
def test_histogram_buckets_are_tensorboards(values):
    """Our bincount histogram gives TensorBoard's own rows (its one-hot sum) bit for bit."""
    ours = histogram_buckets(tf.constant(values)).numpy()
    theirs = tensorboard_histogram._buckets(tf.constant(values), bucket_count=30).numpy()
    np.testing.assert_array_equal(ours, theirs)
    assert ours[:, 2].sum() == values.size


def test_written_histograms_read_back_as_tf_summary_histograms(tmp_path):
    """write_histograms writes what tf.summary.histogram writes: same tag, plugin, step, counts and edges."""
    x = tf.random.stateless_normal([300, 20], seed=[4, 2])
    with tf.summary.create_file_writer(str(tmp_path / "ours")).as_default(step=7):
        write_histograms([("layer/w", x), ("layer/b", tf.Variable(tf.range(5.0)))])
    with tf.summary.create_file_writer(str(tmp_path / "theirs")).as_default(step=7):
        tf.summary.histogram("layer/w", x)
        tf.summary.histogram("layer/b", tf.range(5.0))
    (ours, ours_plugins, _), (theirs, theirs_plugins, _) = (read_events(tmp_path / d) for d in ("ours", "theirs"))
    assert ours_plugins == theirs_plugins == {"layer/w": "histograms", "layer/b": "histograms"}
    for tag in ("layer/w", "layer/b"):
        assert steps_of(ours, tag) == steps_of(theirs, tag) == [7]
        (_, our_rows), (_, their_rows) = ours[tag][0], theirs[tag][0]
        np.testing.assert_array_equal(our_rows[:, 2], their_rows[:, 2])  # compiled, the edges may differ by an ulp
        np.testing.assert_allclose(our_rows[:, :2], their_rows[:, :2], rtol=1e-13)


@pytest.mark.parametrize("total_steps, written", [(None, [2]), (9, [2, 3])])
def test_histograms_and_images_every_second_epoch_and_no_sample_images(mnist_dir, tmp_path, total_steps,
                                                                        written):
    """summaries_every_epochs=2 over 3 epochs of 3 steps: variable histograms and the font digits at epoch 2,
    and at epoch 3 too when it is the last of total_steps; without sample images no activations and no
    mosaic; predictions.png shows the font digits as training ended (epoch 3) either way."""
    train = idx.load(mnist_dir, "train").take(96)
    tensorboard = TensorBoard(tmp_path, hparams=None, summaries_every_epochs=2, total_steps=total_steps)
    trainer = Trainer(Runner(tiny_model(), Adam(0.01)), callbacks=[tensorboard], log_every=2, progress=False)
    history = trainer.fit(lambda epoch: data.training_batches(train, 32, seed=1, epoch=epoch), 3)
    values, _, _ = read_events(tmp_path)
    epoch_steps = [e["step"] for e in history.epochs]
    assert epoch_steps == [3, 6, 9]
    written_steps = [epoch_steps[epoch - 1] for epoch in written]
    assert steps_of(values, "conv1/w") == written_steps
    assert steps_of(values, "logits/b") == written_steps
    assert not [tag for tag in values if tag.startswith("activations/")]
    assert "predictions" not in values
    assert steps_of(values, "font_digits") == written_steps
    assert steps_of(read_events(tmp_path / "train")[0], "epoch_loss") == epoch_steps  # the scalars: each epoch
    assert tensorboard.latest_pictures["step"] == epoch_steps[2]
    with Image.open(tmp_path / "predictions.png") as picture:
        picture.verify()


def test_gradient_norms_and_histograms_are_the_gradients_the_last_step_applied(mnist_dir, tmp_path):
    """SGD: w_after = w_before - lr * g, so the gradient the second (last) step applied is (w_before - w_after) / lr;
    the epoch-end summaries at step 2 show exactly that gradient, here computed by the hand-written backward passes."""
    learning_rate = 0.1
    train = idx.load(mnist_dir, "train").take(2 * BATCH)
    tf.random.set_seed(1)
    model = tiny_model()
    model.build((None, 28, 28, 1))
    weights = {}

    class Weights(Callback):
        def on_epoch_end(self, epoch, step, logs):
            weights[step] = {tag: v.numpy() for tag, v in model.named_variables() if v.trainable}

    runner = Runner(model, SGD(learning_rate), compute_gradients=backprop.gradients)
    trainer = Trainer(runner, progress=False, callbacks=[Weights(), TensorBoard(tmp_path, font_digits=False,
                                                                                gradients=True)])
    trainer.fit(lambda epoch: data.training_batches(train, BATCH, seed=1, epoch=epoch), epochs=2, steps_per_epoch=1)
    applied = {tag: (weights[1][tag] - weights[2][tag]) / learning_rate for tag in weights[1]}
    kept = dict(runner.named_gradients())
    assert sorted(applied) == sorted(kept) == ["conv1/w", "conv1_bn/beta", "conv1_bn/gamma", "logits/b", "logits/w"]
    values, plugins, _ = read_events(tmp_path)
    for tag, gradient in applied.items():
        np.testing.assert_allclose(kept[tag].numpy(), gradient, rtol=1e-3, atol=1e-6)
        assert plugins[f"gradients/{tag}"] == "histograms"
        assert steps_of(values, f"gradients/{tag}") == [1, 2]
        assert values_counted(values, f"gradients/{tag}") == gradient.size
    for layer in ("conv1", "conv1_bn", "logits"):
        norm = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for t, g in applied.items() if t.startswith(layer + "/")))
        assert plugins[f"gradient_norm/{layer}"] == "scalars" and steps_of(values, f"gradient_norm/{layer}") == [1, 2]
        assert scalars(values, f"gradient_norm/{layer}")[-1] == pytest.approx(norm, rel=1e-3)
        assert norm > 0


def test_bad_sample_arguments():
    with pytest.raises(ValueError, match=r"sample_images \[N,H,W,C\] and sample_labels \[N\]"):
        TensorBoard("unused", np.zeros((5, 28, 28, 1)), np.zeros(4), font_digits=False)
    with pytest.raises(ValueError, match="both sample_images and sample_labels, or neither"):
        TensorBoard("unused", np.zeros((5, 28, 28, 1)), font_digits=False)
    with pytest.raises(ValueError, match="summaries_every_epochs >= 0"):
        TensorBoard("unused", summaries_every_epochs=-1, font_digits=False)
    with pytest.raises(ValueError, match="histogram_values must be >= 1"):
        TensorBoard("unused", np.zeros((5, 28, 28, 1)), np.zeros(5), font_digits=False, histogram_values=0)


# ----------------------------------------------------------------------------------------------- train.py

def train_softmax(mnist_dir, logdir, run_name, steps, **settings):
    """train.py's run(config) of --model=softmax for one epoch of `steps` steps into logdir/run_name, in this
    process, on 512 training images (batch 16); returns its metrics (a failed run raises)."""
    import train
    config = train.make_config({"model": "softmax", "epochs": 1, "steps_per_epoch": steps, "batch_size": 16,
                                "data_dir": mnist_dir,
                                "logdir": str(logdir), "run_name": run_name, "progress": False, **settings})
    return train.run(config, out=lambda line: None)


def test_mixed_precision_writes_the_applied_float32_gradients(small_mnist, tmp_path):
    """The step keeps the gradients it applies whatever computes them: mixed precision's unscaled float32 ones."""
    train_softmax(small_mnist, tmp_path, "mixed", 10, precision="mixed_bfloat16")
    values, plugins, _ = read_events(tmp_path / "mixed")
    assert "logits/w" in plugins and "activations/logits" in plugins
    assert plugins["gradients/logits/w"] == "histograms" and scalars(values, "gradient_norm/logits")[-1] > 0


def test_train_py_writes_the_tensorboard_layout(small_mnist, tmp_path):
    """--steps_per_epoch=30 with the default --log_every=100: no log point, so the epoch end carries the
    training figures; everything else is there. Trained with --gradients=by_hand."""
    train_softmax(small_mnist, tmp_path, "quick", 30, gradients="by_hand")
    run_dir = tmp_path / "quick"
    train_values, _, _ = read_events(run_dir / "train")
    assert set(train_values) == {"epoch_loss", "epoch_accuracy", "learning_rate"}
    assert steps_of(train_values, "learning_rate") == [30]
    assert scalars(train_values, "learning_rate") == pytest.approx([0.01])
    validation_values, _, _ = read_events(run_dir / "validation")
    assert set(validation_values) == {"loss", "accuracy"} and steps_of(validation_values, "accuracy") == [30]
    values, plugins, graph = read_events(run_dir)
    histograms = {tag for tag, plugin in plugins.items() if plugin == "histograms"}
    assert histograms == {"logits/w", "logits/b", "activations/flatten", "activations/logits", "gradients/logits/w",
                          "gradients/logits/b"}
    assert steps_of(values, "gradient_norm/logits") == [30] and scalars(values, "gradient_norm/logits")[0] > 0
    assert {tag for tag, plugin in plugins.items() if plugin == "images"} == {"predictions", "font_digits"}
    assert "MatMul" in graph_ops(graph)
    hparams = [v for v in read_raw(run_dir) if v[1].tag == hparams_metadata.SESSION_START_INFO_TAG]
    start = hparams_metadata.parse_session_start_info_plugin_data(hparams[0][1].metadata.plugin_data.content)
    assert start.hparams["model"].string_value == "softmax" and start.hparams["steps_per_epoch"].number_value == 30
    assert start.hparams["gradients"].string_value == "by_hand"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert scalars(values, "hparams/final_val_accuracy") == pytest.approx([metrics["test_accuracy"]])
    assert sorted(p.name for p in run_dir.glob("*.png")) == ["curves.png", "learning_rate.png", "predictions.png"]
