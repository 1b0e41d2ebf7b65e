"""--ema=DECAY: ema_w = d * ema_w + (1 - d) * w after each update, as Keras's optimizer use_ema computes it;
evaluation uses the averages while the raw weights keep training; the averages are checkpointed, so a resumed
run is the uninterrupted one, bit for bit."""
import numpy as np
import pytest
import tensorflow as tf

from app.settings import FlagError, make_config
from core.config import SettingError, TrainingConfig
from core.ema import MovingAverage
from core.losses import softmax_cross_entropy
from core.optimizers import Adam
from core.trainer import Callback, Runner, Trainer
from stop_at import StopAt
from test_checkpoint import synthetic
from test_grad_accum import model

EXAMPLES = 128
DECAY = 0.8


IMAGES, LABELS = synthetic(EXAMPLES)
VALIDATION_IMAGES, VALIDATION_LABELS = synthetic(EXAMPLES, seed=1)


def batches(epoch):
    order = np.random.default_rng(epoch).permutation(EXAMPLES)
    return tf.data.Dataset.from_tensor_slices((IMAGES[order], LABELS[order])).batch(16, drop_remainder=True)


def validation():
    return tf.data.Dataset.from_tensor_slices((VALIDATION_IMAGES, VALIDATION_LABELS)).batch(64)


def test_the_averages_are_keras_use_ema_numbers():
    """Adam with use_ema=True, ema_momentum=0.8 in Keras against our Adam and MovingAverage, the same gradients."""
    import keras
    rng = np.random.default_rng(0)
    start = rng.normal(size=(3, 5)).astype(np.float32)
    gradients = rng.normal(size=(6, 3, 5)).astype(np.float32)
    theirs = keras.Variable(start)
    optimizer = keras.optimizers.Adam(0.1, use_ema=True, ema_momentum=DECAY)
    optimizer.build([theirs])
    ours = tf.Variable(start)
    adam = Adam(0.1)
    adam.build([ours])
    average = MovingAverage(DECAY, [ours])
    for gradient in gradients:
        optimizer.apply_gradients([(tf.constant(gradient), theirs)])
        first = tf.equal(adam.step, 0)
        adam.apply([tf.constant(gradient)], [ours])
        average.update([ours], first)
        np.testing.assert_allclose(ours.numpy(), np.asarray(theirs), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(average.averages[0].numpy(),
                                   np.asarray(optimizer._model_variables_moving_average[0]), rtol=1e-6, atol=1e-7)


class Weights(Callback):
    """The trainable weights after every update (log_every=1, steps_per_loop=1), and those callbacks see at the
    last epoch end."""

    def __init__(self, network):
        self.network, self.after, self.at_epoch_end = network, [], None

    def on_log(self, step, logs):
        self.after.append([variable.numpy() for variable in self.network.trainable_variables])

    def on_epoch_end(self, epoch, step, logs):
        self.at_epoch_end = [variable.numpy() for variable in self.network.trainable_variables]


def forward(weights, images):
    """Flatten -> Dense(16, relu) -> Dense(4), in numpy float64; weights in trainable_variables' order."""
    b1, w1, b2, w2 = (np.float64(w) for w in weights)
    hidden = np.maximum(images.reshape(len(images), -1) @ w1 + b1, 0.0)
    return hidden @ w2 + b2


def test_evaluation_uses_the_averaged_weights_and_training_the_raw_ones():
    """The averages by hand from the weights after each update; the validation figures are theirs, by hand; the
    epoch-end callbacks (TensorBoard's pictures) see them too; the model trains and ends on its raw weights."""
    network = model()
    runner = Runner(network, Adam(0.01), ema=DECAY)
    recorded = Weights(network)
    history = Trainer(runner, callbacks=[recorded], log_every=1, steps_per_loop=1, progress=False).fit(
        batches, epochs=2, validation_data=validation())
    # ema_1 = w_1; ema_t = d ema_{t-1} + (1 - d) w_t, by hand from the recorded weights (16 updates)
    by_hand = recorded.after[0]
    for weights in recorded.after[1:]:
        by_hand = [DECAY * average + (1 - DECAY) * w for average, w in zip(by_hand, weights)]
    averages = [average.numpy() for average in runner.ema.averages]
    for mine, expected in zip(averages, by_hand):
        np.testing.assert_allclose(mine, expected, rtol=1e-5, atol=1e-6)
    assert all(np.array_equal(seen, average) for seen, average in zip(recorded.at_epoch_end, averages))
    raw = [variable.numpy() for variable in network.trainable_variables]
    assert all(np.array_equal(now, last) for now, last in zip(raw, recorded.after[-1]))  # evaluation put w back
    assert max(np.max(np.abs(a - w)) for a, w in zip(averages, raw)) > 1e-3  # the two differ
    logits = forward(averages, VALIDATION_IMAGES)
    loss = float(softmax_cross_entropy(tf.constant(logits), tf.constant(VALIDATION_LABELS)).numpy())
    accuracy = float(np.mean(logits.argmax(axis=1) == VALIDATION_LABELS))
    raw_logits = forward(raw, VALIDATION_IMAGES)
    raw_loss = float(softmax_cross_entropy(tf.constant(raw_logits), tf.constant(VALIDATION_LABELS)).numpy())
    assert abs(loss - raw_loss) > 1e-4  # the figures tell the two apart
    assert history.epochs[-1]["val_loss"] == pytest.approx(loss, rel=1e-5)
    assert history.epochs[-1]["val_accuracy"] == pytest.approx(accuracy)


def test_resume_with_ema_is_bit_identical(tmp_path):
    """Stopped 3 updates into epoch 2 and resumed by a differently seeded model: the weights, Adam's slots and the
    averages of the run that never stopped, bit for bit (with dropout)."""
    def run(directory, seed, callbacks=()):
        runner = Runner(model(dropout=0.25, seed=seed), Adam(0.01), ema=DECAY)
        trainer = Trainer(runner, callbacks=list(callbacks), log_every=1, checkpoint_dir=str(directory),
                          steps_per_loop=4, progress=False)
        trainer.fit(batches, epochs=2)
        return trainer

    straight = run(tmp_path / "straight", seed=3)
    run(tmp_path / "resumed", seed=3, callbacks=[StopAt(11)])
    resumed = run(tmp_path / "resumed", seed=99)
    assert resumed.restored_from is not None and int(resumed.optimizer.step.numpy()) == 16
    def state(trainer):
        return list(trainer.model.variables) + list(trainer.optimizer.variables) + list(trainer.runner.ema.averages)

    assert len(state(resumed)) == 4 + 9 + 4  # weights, Adam (step, m, v), averages
    for mine, theirs in zip(state(resumed), state(straight)):
        assert np.array_equal(mine.numpy(), theirs.numpy()), mine.name


def test_bad_decays_are_one_line_errors():
    with pytest.raises(ValueError, match=r"^ema decay must be in \[0, 1\), got 1.0$"):
        Runner(model(), Adam(0.01), ema=1.0)
    with pytest.raises(SettingError, match=r"^ema must be in \[0, 1\), got -0.1$"):
        TrainingConfig(ema=-0.1)
    with pytest.raises(FlagError, match=r"^--ema must be in \[0, 1\), got 1$"):
        make_config({"model": "dense", "ema": 1.0})
    with pytest.raises(FlagError, match=r"^--restore_best keeps the best epoch's raw weights, --ema evaluates"):
        make_config({"model": "dense", "ema": 0.9, "restore_best": True})
    assert "ema" in __import__("app.settings").settings.RESUME_KEYS


def test_train_py_evaluates_and_exports_the_averaged_weights(small_mnist, tmp_path):
    """train.py --model=softmax --ema=0.5: the SavedModel's probabilities and the reported test accuracy are those
    of the averages in the checkpoint, by hand, not of the raw weights saved beside them."""
    import train
    from app import export
    from quick_mnist_model import mnist_test_set
    config = train.make_config({"model": "softmax", "epochs": 1, "steps_per_epoch": 12, "batch_size": 16,
                                "learning_rate": 0.5, "ema": 0.5, "data_dir": small_mnist,
                                "logdir": str(tmp_path), "run_name": "ema", "progress": False})
    metrics = train.run(config, out=lambda line: None)
    reader = tf.train.load_checkpoint(str(tmp_path / "ema" / "checkpoints"))
    stored = {key: reader.get_tensor(key) for key in reader.get_variable_to_shape_map()}
    averages = {value.ndim: value for key, value in stored.items() if key.startswith("ema/averages/")}
    weights = ("/w/.ATTRIBUTES/VARIABLE_VALUE", "/b/.ATTRIBUTES/VARIABLE_VALUE")
    raw = {value.ndim: value for key, value in stored.items() if key.startswith("model/") and key.endswith(weights)}
    images, labels = mnist_test_set(small_mnist)
    x = images.reshape(len(images), -1).astype(np.float64) / 255.0

    def probabilities(by_rank):
        logits = x @ by_rank[2] + by_rank[1]
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        return exp / exp.sum(axis=1, keepdims=True)

    expected = probabilities(averages)
    assert np.max(np.abs(expected - probabilities(raw))) > 0.01  # the averages are another model
    served, classes = export.Classifier(metrics["saved_model"][0])(images)
    np.testing.assert_allclose(served, expected, atol=1e-5)
    assert metrics["test_accuracy"] == pytest.approx(float(np.mean(expected.argmax(axis=1) == labels)))
