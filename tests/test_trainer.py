"""The training loop: trace-once steps, falling loss, history and callbacks, no per-step host reads,
the NaN guard, determinism. Small synthetic data (8x8 images, 4 classes) keeps each fit ~1 s."""
import io
import re
import sys

import numpy as np
import pytest
import tensorflow as tf

from core import metrics
from core.layers import Dense, Dropout, Flatten, Sequential
from core.losses import softmax_cross_entropy
from core.optimizers import SGD, Adam
from core.trainer import Callback, History, NonFiniteError, Runner, Trainer

EXAMPLES, BATCH = 256, 32  # 8 steps per epoch


def synthetic(examples=EXAMPLES, scale=1.0, seed=0):
    """Images [8,8,1] of noise in [0, scale]; the quarter (2 rows) numbered by the label is brighter."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, examples).astype(np.int32)
    images = rng.random((examples, 4, 16), dtype=np.float32) * 0.7
    images[np.arange(examples), labels] += 0.3
    return tf.data.Dataset.from_tensor_slices((images.reshape(examples, 8, 8, 1) * scale, labels))


def epochs_of(dataset, batch=BATCH):
    """train_data callable: a different but repeatable order per epoch."""
    return lambda epoch: dataset.shuffle(EXAMPLES, seed=epoch, reshuffle_each_iteration=False).batch(
        batch, drop_remainder=True)


def small_model(dropout=0.25, hidden=32):
    layers = [Flatten(), Dense(hidden, activation="relu")]
    layers += [Dropout(dropout)] if dropout else []
    return Sequential(layers + [Dense(4)])


def make_trainer(seed=1, learning_rate=0.01, optimizer=Adam, **kwargs):
    tf.random.set_seed(seed)
    kwargs.setdefault("progress", False)
    return Trainer(Runner(small_model(), optimizer(learning_rate)), **kwargs)


def weights(trainer):
    return [v.numpy() for v in trainer.model.variables]


class Recorder(Callback):
    def __init__(self):
        self.calls = []

    def on_train_begin(self, trainer):
        self.calls.append(("begin", int(trainer.optimizer.step.numpy())))

    def on_log(self, step, logs):
        self.calls.append(("log", step, dict(logs)))

    def on_epoch_end(self, epoch, step, logs):
        self.calls.append(("epoch", epoch, step, dict(logs)))

    def on_train_end(self, trainer, history):
        self.calls.append(("end", history))


def test_each_step_traces_once_per_mode():
    trainer = make_trainer(log_every=3)
    data = synthetic()
    # Training batches of 32; validation batches of 100 with a last one of 56: still one trace each.
    trainer.fit(epochs_of(data), epochs=2, validation_data=data.batch(100))
    trainer.evaluate(data.batch(7))
    assert trainer.runner.train.experimental_get_tracing_count() == 1
    assert trainer.runner.evaluate.experimental_get_tracing_count() == 1
    # The trace was made with a None batch dimension from the dataset's element_spec.
    (iterator, num_steps), _ = trainer.runner.prepare(data.batch(BATCH).element_spec).structured_input_signature
    images, labels = iterator._element_spec  # IteratorSpec has no public accessor
    assert images.shape.as_list() == [None, 8, 8, 1] and labels.shape.as_list() == [None]
    assert trainer.runner.train.experimental_get_tracing_count() == 1


def test_loss_falls_and_history_and_callbacks():
    recorder = Recorder()
    trainer = make_trainer(log_every=3, callbacks=[recorder])
    data = synthetic()
    history = trainer.fit(epochs_of(data), epochs=4, validation_data=data.batch(128))

    assert isinstance(history, History) and history is trainer.history
    assert [entry["step"] for entry in history.steps] == list(range(3, 33, 3))
    for entry in history.steps:
        assert set(entry) == {"step", "loss", "accuracy", "learning_rate"}
        assert all(isinstance(value, (int, float)) for value in entry.values())
        assert entry["learning_rate"] == pytest.approx(0.01)
    assert [entry["epoch"] for entry in history.epochs] == [1, 2, 3, 4]
    assert [entry["step"] for entry in history.epochs] == [8, 16, 24, 32]
    for entry in history.epochs:
        assert set(entry) == {"epoch", "step", "loss", "accuracy", "val_loss", "val_accuracy",
                              "learning_rate", "seconds"}
        assert entry["seconds"] > 0
    assert history.epochs[-1]["loss"] < 0.8 * history.epochs[0]["loss"]
    assert history.epochs[-1]["val_loss"] < history.epochs[0]["val_loss"]
    assert history.epochs[-1]["val_accuracy"] > 0.5  # chance is 0.25
    # The figures are the metric variables' values: re-evaluating gives the last val figures exactly.
    assert trainer.evaluate(data.batch(128)) == {"loss": history.epochs[-1]["val_loss"],
                                                 "accuracy": history.epochs[-1]["val_accuracy"]}
    # Window figures: the log at step 6 covers steps 4-6 only, not the epoch so far.
    assert history.steps[1]["loss"] != history.steps[0]["loss"]

    kinds = [call[0] for call in recorder.calls]
    assert kinds[0] == "begin" and kinds[-1] == "end" and kinds.count("epoch") == 4 and kinds.count("log") == 10
    assert recorder.calls[0] == ("begin", 0)
    assert [call[1] for call in recorder.calls if call[0] == "log"] == list(range(3, 33, 3))
    epoch_calls = [call for call in recorder.calls if call[0] == "epoch"]
    assert [(call[1], call[2]) for call in epoch_calls] == [(1, 8), (2, 16), (3, 24), (4, 32)]
    assert epoch_calls[-1][3] == history.epochs[-1]
    assert recorder.calls[-1][1] is history


def test_no_host_reads_per_step(monkeypatch):
    """Python reads metric values only at log points and epoch ends, not per step."""
    reads = []
    for cls in (metrics.Mean, metrics.Accuracy):
        original = cls.result
        monkeypatch.setattr(cls, "result", lambda self, original=original: reads.append(1) or original(self))
    checks = []
    original_check = Trainer.check_finite
    monkeypatch.setattr(Trainer, "check_finite", lambda self: checks.append(1) or original_check(self))
    trainer = make_trainer(log_every=1000)
    trainer.fit(lambda epoch: synthetic(EXAMPLES * 4).batch(BATCH), epochs=1)  # 32 steps
    assert int(trainer.optimizer.step.numpy()) == 32
    # Per epoch, not per step: the epoch's loss and accuracy, and the NaN guard read after the last
    # batch and again before the epoch-end save.
    assert len(reads) == 2 and len(checks) == 2


def test_schedule_drives_learning_rate_from_optimizer_step():
    tf.random.set_seed(1)
    schedule = lambda step: 0.01 * 0.5 ** tf.floor(tf.cast(step, tf.float32) / 8.0)  # halves every epoch
    trainer = Trainer(Runner(small_model(), Adam(schedule)), log_every=4, progress=False)
    history = trainer.fit(epochs_of(synthetic()), epochs=3)
    assert [entry["learning_rate"] for entry in history.epochs] == pytest.approx([0.01, 0.005, 0.0025])
    # The rate logged at step 8 is the one step 8 used (schedule(7)); at step 12 it is schedule(11).
    assert [entry["learning_rate"] for entry in history.steps[:3]] == pytest.approx([0.01, 0.01, 0.005])


def test_fit_accepts_a_single_dataset_and_steps_per_epoch():
    trainer = make_trainer(log_every=2)
    history = trainer.fit(synthetic().batch(BATCH).repeat(), epochs=2, steps_per_epoch=5)
    assert [entry["step"] for entry in history.epochs] == [5, 10]
    assert "val_loss" not in history.epochs[0]


def test_fit_again_continues_the_same_run():
    """Without checkpoints too, `epochs` counts the epochs already done and a stop resumes mid-epoch."""

    class StopAtStep(Callback):
        def on_log(self, step, logs):
            if step == 12:
                trainer.stop_training = True

    trainer = make_trainer(log_every=4, callbacks=[StopAtStep()])
    trainer.fit(epochs_of(synthetic()), epochs=1)
    trainer.fit(epochs_of(synthetic()), epochs=3)  # stops at step 12, in the middle of epoch 2
    assert int(trainer.optimizer.step.numpy()) == 12 and int(trainer.runner.step_in_epoch.numpy()) == 4
    trainer.callbacks = []
    history = trainer.fit(epochs_of(synthetic()), epochs=3)
    assert int(trainer.optimizer.step.numpy()) == 24
    assert [entry["step"] for entry in history.epochs] == [8, 16, 24]
    assert [entry["step"] for entry in history.steps] == [4, 8, 12, 16, 20, 24]


@pytest.mark.parametrize("bad, message", [
    (lambda: tf.data.Dataset.from_tensor_slices(tf.zeros([4, 8, 8, 1])).batch(2), "batches, got elements"),
    (lambda: tf.data.Dataset.from_tensor_slices((tf.zeros([4, 8, 8, 1]), tf.zeros([4]))).batch(2), "float32 labels"),
    (lambda: tf.data.Dataset.from_tensor_slices((tf.zeros([4, 8, 8, 1]), tf.zeros([4], tf.int32))), "is it batched?"),
    (lambda: synthetic().batch(BATCH).repeat(), "infinite"),
])
def test_bad_data_gives_a_clear_error(bad, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make_trainer().fit(bad(), epochs=1)


def test_bad_arguments():
    with pytest.raises(ValueError, match="checkpoint_every needs a checkpoint_dir"):
        make_trainer(checkpoint_every=10)
    with pytest.raises(ValueError, match="log_every"):
        make_trainer(log_every=0)
    with pytest.raises(ValueError, match="epochs"):
        make_trainer().fit(synthetic().batch(BATCH), epochs=0)
    with pytest.raises(ValueError, match=r"^Trainer takes a core.runner.Runner, got Sequential: Trainer\(Runner\("):
        Trainer(small_model(), Adam(0.01))


def _schedule(good, bad, after):
    """learning rate `good` for the first `after` steps, then `bad`."""
    return lambda step: tf.where(step < after, good, bad)


def test_huge_learning_rate_stops_at_once_naming_step_and_variable(tmp_path):
    """lr 1e38 from step 6 on overflows the first layer's weights in that very update."""
    tf.random.set_seed(1)
    trainer = Trainer(Runner(small_model(dropout=0), SGD(_schedule(0.001, 1e38, 5))), log_every=4,
                      checkpoint_dir=str(tmp_path), checkpoint_every=2, progress=False)
    with pytest.raises(NonFiniteError) as caught:
        trainer.fit(epochs_of(synthetic(scale=100.0)), epochs=3)
    error = caught.value
    assert error.step == 6 and error.learning_rate == pytest.approx(1e38, rel=1e-6)
    assert error.what == "dense/w after the update"
    assert str(error).startswith("non-finite dense/w after the update at step 6 (learning rate 1e+38)")
    # Detected at the log point of step 8; steps 7 and 8 did nothing, the step-6 state was never saved.
    assert int(trainer.optimizer.step.numpy()) == 6
    latest = trainer.checkpointer.latest
    assert error.checkpoint == latest and str(latest) in str(error)
    reader = tf.train.load_checkpoint(latest)
    assert reader.get_tensor("optimizer/step/.ATTRIBUTES/VARIABLE_VALUE") == 4
    assert all(np.isfinite(reader.get_tensor(key)).all() for key, dtype in
               reader.get_variable_to_dtype_map().items() if dtype.is_floating)


def test_non_finite_loss_is_reported_as_loss():
    """With plain inputs lr 1e30 makes finite but huge weights at step 6; step 7's loss overflows."""
    tf.random.set_seed(1)
    trainer = Trainer(Runner(small_model(dropout=0), SGD(_schedule(0.001, 1e30, 5))), log_every=8, progress=False)
    with pytest.raises(NonFiniteError, match=r"^non-finite loss at step 7 \(learning rate 1e\+30\)"):
        trainer.fit(epochs_of(synthetic()), epochs=2)
    assert int(trainer.optimizer.step.numpy()) == 6  # the bad step's update was not applied


def test_non_finite_gradient_names_the_variable_and_skips_the_update():
    """A loss whose value is finite but whose gradient for the last layer's w is NaN."""
    tf.random.set_seed(1)
    model = small_model(dropout=0)

    @tf.custom_gradient
    def nan_gradient(x):
        return tf.identity(x), lambda upstream: tf.fill(tf.shape(x), np.float32(np.nan))

    def loss_with_nan_gradient(logits, labels):
        return softmax_cross_entropy(logits, labels) + 0.0 * tf.reduce_sum(nan_gradient(model.layers[2].w))

    trainer = Trainer(Runner(model, Adam(0.01), loss_fn=loss_with_nan_gradient), log_every=5, progress=False)
    trainer.build((None, 8, 8, 1))
    before = weights(trainer)
    with pytest.raises(NonFiniteError, match=r"^non-finite gradient of dense_1/w at step 1 \(learning rate 0.01\)"):
        trainer.fit(epochs_of(synthetic()), epochs=1)
    assert int(trainer.optimizer.step.numpy()) == 0
    assert all(np.array_equal(a, b) for a, b in zip(before, weights(trainer)))


def test_same_seed_gives_bit_identical_weights():
    """What train.py does: enable_op_determinism + tf.random.set_seed(seed) before building the model."""
    from tensorflow.python.framework import config  # is_/disable_op_determinism are not in the public API

    was_enabled = config.is_op_determinism_enabled()
    tf.config.experimental.enable_op_determinism()
    try:
        runs = []
        for _ in range(2):
            trainer = make_trainer(seed=7, log_every=4)
            history = trainer.fit(epochs_of(synthetic()), epochs=2, validation_data=synthetic().batch(128))
            runs.append((weights(trainer), [{k: v for k, v in e.items() if k != "seconds"} for e in history.epochs]))
        other = make_trainer(seed=8, log_every=4)
        other.fit(epochs_of(synthetic()), epochs=2)
    finally:
        if not was_enabled:
            config.disable_op_determinism()
    (first, first_epochs), (second, second_epochs) = runs
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    assert first_epochs == second_epochs
    assert not all(np.array_equal(a, b) for a, b in zip(first, weights(other)))


def test_real_mnist_small_convnet_learns(mnist_dir):
    """A few hundred real MNIST digits through the data pipeline and a small conv net: one trace, loss falls."""
    from core import data
    from datasets import idx
    from core.layers import Conv2D

    train = idx.load(mnist_dir, "train").take(640)
    test = data.evaluation_batches(idx.load(mnist_dir, "test").take(500), 250)
    tf.random.set_seed(3)
    model = Sequential([Conv2D(8, 5, strides=2, activation="relu"), Conv2D(16, 5, strides=2, activation="relu"),
                        Flatten(), Dense(10)])
    trainer = Trainer(Runner(model, Adam(0.005)), log_every=10, progress=False)
    history = trainer.fit(lambda epoch: data.training_batches(train, 64, seed=3, epoch=epoch),
                          epochs=3, validation_data=test)
    assert trainer.runner.train.experimental_get_tracing_count() == 1
    assert trainer.runner.evaluate.experimental_get_tracing_count() == 1
    assert history.steps[-1]["loss"] < 0.5 * history.steps[0]["loss"]
    assert history.epochs[-1]["val_accuracy"] > 0.8


def _deterministic_run(**kwargs):
    """Two epochs of 8 steps, seed 7, op determinism on: (weights, epochs without seconds, log points)."""
    from tensorflow.python.framework import config  # is_/disable_op_determinism are not in the public API

    was_enabled = config.is_op_determinism_enabled()
    tf.config.experimental.enable_op_determinism()
    try:
        trainer = make_trainer(seed=7, **kwargs)
        history = trainer.fit(epochs_of(synthetic()), epochs=2, validation_data=synthetic().batch(128))
    finally:
        if not was_enabled:
            config.disable_op_determinism()
    return trainer, (weights(trainer), [{k: v for k, v in e.items() if k != "seconds"} for e in history.epochs],
                     history.steps)


def test_steps_per_loop_changes_no_numbers_and_cuts_loops_at_log_points(monkeypatch):
    """steps_per_loop 5 with log points every 6 steps: calls of 5, 1, 2 | 4, 4 steps (epochs of 8), one trace,
    and bit for bit the weights, epoch figures and log points of one call per step."""
    _, one_per_call = _deterministic_run(log_every=6, steps_per_loop=1)
    lengths = []
    loop_length = Trainer._loop_length
    monkeypatch.setattr(Trainer, "_loop_length", lambda self, *args: lengths.append(loop_length(self, *args))
                        or lengths[-1])
    trainer, five_per_call = _deterministic_run(log_every=6, steps_per_loop=5)
    assert lengths == [5, 1, 2, 4, 4]
    assert trainer.runner.train.experimental_get_tracing_count() == 1
    assert all(np.array_equal(a, b) for a, b in zip(one_per_call[0], five_per_call[0]))
    assert one_per_call[1:] == five_per_call[1:]
    assert [entry["step"] for entry in five_per_call[2]] == [6, 12]


@pytest.mark.parametrize("compiled", [False, True])
def test_finiteness_flags_are_exact_when_finite_values_overflow_the_sum(compiled):
    """The guard's first stage sums each tensor; a sum of finite values that overflows (3e38 + 3e38) or of
    opposite infinities (NaN) must come back as the elements' own answer."""
    from core.guard import finite_flags as _finite_flags

    tensors = [tf.constant([3e38, 3e38, -1.0]), tf.constant([1.0, np.nan]), tf.constant([np.inf, -np.inf]),
               tf.constant([[0.5, -2.0]]), tf.constant(-np.inf), tf.constant([-3e38, -3e38])]
    flags = (tf.function(_finite_flags) if compiled else _finite_flags)(tensors)
    assert flags.numpy().tolist() == [True, False, False, True, False, True]
    assert _finite_flags(tensors[3:4]).numpy().tolist() == [True]


def test_nan_guard_inside_one_long_loop():
    """All 8 steps of an epoch in one call: the step-6 overflow is recorded there, steps 7 and 8 do nothing,
    and the epoch end reports it."""
    tf.random.set_seed(1)
    trainer = Trainer(Runner(small_model(dropout=0), SGD(_schedule(0.001, 1e38, 5))), log_every=100,
                      steps_per_loop=100, progress=False)
    with pytest.raises(NonFiniteError, match=r"^non-finite dense/w after the update at step 6 "):
        trainer.fit(epochs_of(synthetic(scale=100.0)), epochs=2)
    assert int(trainer.optimizer.step.numpy()) == 6
    assert trainer.runner.train.experimental_get_tracing_count() == 1


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("stream, progress, shown", [(Terminal, True, True), (io.StringIO, True, False),
                                                     (Terminal, False, False)])
def test_progress_bar_per_epoch_on_a_terminal_only(monkeypatch, stream, progress, shown):
    """tqdm draws one bar per epoch on stderr with the epoch, the step count and the figures of the last log
    point; nothing when stderr is not a terminal or progress=False."""
    err = stream()
    monkeypatch.setattr(sys, "stderr", err)
    trainer = make_trainer(log_every=4, progress=progress)
    trainer.fit(epochs_of(synthetic()), epochs=2)
    text = err.getvalue()
    if not shown:
        assert text == ""
        return
    last_lines = [line.rsplit("\r", 1)[-1] for line in text.strip().split("\n")]
    assert len(last_lines) == 2, text
    for epoch, line in enumerate(last_lines, 1):
        assert line.startswith(f"epoch {epoch}/2: 100%") and "8/8" in line, line
        assert re.search(r"loss=[\d.]+, accuracy=[\d.]+, lr=0\.01\]$", line), line


def test_a_stop_another_worker_asks_for_stops_this_one_at_the_same_step(tmp_path):
    """Every worker votes on stopping before each compiled call (here of 2 steps) and after each epoch, and all
    get the same answer (distribute.WorkerVote; its collective on two processes: test_multi_worker.py). A vote
    naming another worker stops this one there too, with its checkpoint at that step."""
    trainer = make_trainer(checkpoint_dir=str(tmp_path), steps_per_loop=2)
    steps = []

    def vote(asks):
        steps.append(int(trainer.optimizer.step.numpy()))
        return [1] if len(steps) == 4 else ([0] if asks else [])

    trainer._vote = vote
    history = trainer.fit(epochs_of(synthetic()), epochs=2)
    assert steps == [0, 2, 4, 6]
    assert history.stopped == {"reason": "stopped", "epoch": 0} and trainer.stopped_by == [1]
    reader = tf.train.load_checkpoint(trainer.checkpointer.latest)
    assert [int(reader.get_tensor(f"{name}/.ATTRIBUTES/VARIABLE_VALUE"))
            for name in ("optimizer/step", "step_in_epoch", "epoch")] == [6, 6, 0]
