"""--grad_accum_steps=K: one update from the mean gradient of K batches. K batches of B examples make the update
one batch of K * B makes (no BatchNorm, no dropout), steps count updates, and a run resumes bit for bit because
the loop stops, saves and resumes only between updates."""
import numpy as np
import pytest
import tensorflow as tf

from app.settings import FlagError, make_config
from core.config import SettingError, TrainingConfig
from core.layers import Dense, Dropout, Flatten, Sequential
from core.optimizers import SGD, Adam
from core.trainer import Callback, Runner, Trainer
from stop_at import StopAt
from test_checkpoint import synthetic

EXAMPLES = 256


IMAGES, LABELS = synthetic(EXAMPLES)


def batches(size):
    """The same examples in the same order every epoch, in batches of `size`."""
    return tf.data.Dataset.from_tensor_slices((IMAGES, LABELS)).batch(size, drop_remainder=True)


def model(dropout=0.0, seed=3):
    tf.random.set_seed(seed)
    layers = [Flatten(), Dense(16, activation="relu")] + ([Dropout(dropout)] if dropout else []) + [Dense(4)]
    network = Sequential(layers)
    network.build((None, 8, 8, 1))
    return network


class Logged(Callback):
    def __init__(self):
        self.steps = []

    def on_log(self, step, logs):
        self.steps.append((step, logs["loss"]))


@pytest.mark.parametrize("optimizer", [lambda: SGD(0.5, momentum=0.9), lambda: Adam(0.01)], ids=["sgd", "adam"])
def test_k_batches_of_b_make_the_update_of_one_batch_of_k_times_b(optimizer):
    """8 updates of 4 x 8 examples against 8 updates of 32: the same weights, log points and Adam step count.

    The two runs differ only in float32 rounding: the batch mean sum_i l_i / 32 against the mean of four means
    of 8, and the same for the gradients, each rounding at ~6e-8 relative per sum. Measured: the weights (|w| up
    to 1.5) differ by at most 1.2e-7 (SGD) and 7.5e-8 (Adam), one ulp. atol=5e-7 with rtol=1e-6 leaves a few ulps
    of room and fails for any real difference: one update of 0.01 (Adam) or 0.5 * g (SGD), or a different step in
    Adam's bias correction, moves weights by ~1e-3.
    """
    weights, logs, runners = {}, {}, {}
    for name, size, accumulate in (("accumulated", 8, 4), ("one batch", 32, 1)):
        network = model()
        runners[name] = Runner(network, optimizer(), grad_accum_steps=accumulate)
        logged = Logged()
        Trainer(runners[name], callbacks=[logged], log_every=2, steps_per_loop=3, progress=False).fit(
            batches(size), epochs=1)
        weights[name] = [variable.numpy() for variable in network.variables]
        logs[name] = logged.steps
    for accumulated, whole in zip(weights["accumulated"], weights["one batch"]):
        np.testing.assert_allclose(accumulated, whole, rtol=1e-6, atol=5e-7)
    assert [int(runner.optimizer.step.numpy()) for runner in runners.values()] == [8, 8]
    assert [step for step, _ in logs["accumulated"]] == [step for step, _ in logs["one batch"]] == [2, 4, 6, 8]
    np.testing.assert_allclose([loss for _, loss in logs["accumulated"]], [loss for _, loss in logs["one batch"]],
                               rtol=1e-5)
    assert runners["accumulated"].train.experimental_get_tracing_count() == 1


def test_an_epoch_leaves_out_the_batches_short_of_an_update():
    """32 batches with K = 3: 10 updates of 3 batches (30 examples x 8), the last 2 batches left out."""
    runner = Runner(model(), Adam(0.01), grad_accum_steps=3)
    history = Trainer(runner, progress=False).fit(batches(8), epochs=2)
    assert [record["step"] for record in history.epochs] == [10, 20]
    assert int(runner.train_accuracy.count.numpy()) == 30 * 8


def test_resume_with_accumulation_is_bit_identical(tmp_path):
    """K = 2 with dropout: stopped 3 updates (6 batches) into epoch 2, resumed by a differently seeded model: the
    same weights and Adam slots as the run that never stopped, bit for bit. The checkpoint is taken
    between updates (step_in_epoch 6, a multiple of K), where the gradient sums are zero."""
    def run(directory, seed, callbacks=()):
        runner = Runner(model(dropout=0.25, seed=seed), Adam(0.01), grad_accum_steps=2)
        trainer = Trainer(runner, callbacks=list(callbacks), log_every=1, checkpoint_dir=str(directory),
                          checkpoint_every=5, steps_per_loop=4, progress=False)
        trainer.fit(batches(16), epochs=2)
        return trainer

    straight = run(tmp_path / "straight", seed=3)
    stopped = run(tmp_path / "resumed", seed=3, callbacks=[StopAt(11)])
    assert int(stopped.runner.epoch.numpy()) == 1 and int(stopped.runner.step_in_epoch.numpy()) == 6
    assert all(not total.numpy().any() for total in stopped.runner.accumulation.gradients)
    resumed = run(tmp_path / "resumed", seed=99)
    assert resumed.restored_from.endswith("ckpt-4")  # steps 5, 8 (end of epoch 1) and 10, then the stop at 11
    assert int(resumed.optimizer.step.numpy()) == 16
    for mine, theirs in zip(resumed.model.variables + resumed.optimizer.variables,
                            straight.model.variables + straight.optimizer.variables):
        assert np.array_equal(mine.numpy(), theirs.numpy()), mine.name


def test_bad_accumulation_settings_are_one_line_errors():
    with pytest.raises(ValueError, match=r"^grad_accum_steps must be a positive integer, got 0$"):
        Runner(model(), Adam(0.01), grad_accum_steps=0)
    with pytest.raises(SettingError, match=r"^grad_accum_steps must be a positive integer, got 0$"):
        TrainingConfig(grad_accum_steps=0)
    with pytest.raises(FlagError, match=r"^--grad_accum_steps must be a positive integer, got -2$"):
        make_config({"model": "dense", "grad_accum_steps": -2})
    with pytest.raises(ValueError, match=r"^grad_accum_steps=5 needs at least 5 batches per epoch, got 4$"):
        Trainer(Runner(model(), Adam(0.01), grad_accum_steps=5), progress=False).fit(batches(64), epochs=1)
    assert "grad_accum_steps" in __import__("app.settings").settings.RESUME_KEYS


def test_two_replicas_accumulate_and_average_as_one():
    """Mirrored on two logical CPUs, K = 2 and --ema: each replica sums its slices' gradients (no collective), the
    update all-reduces their mean once; the weights and averages match one replica's to float32 rounding, and
    both replicas hold the same values."""
    from core import distribute
    strategy = distribute.make_strategy("mirrored")
    assert strategy.num_replicas_in_sync == 2
    results = []
    for using in (strategy, tf.distribute.get_strategy()):
        with using.scope():
            runner = Runner(model(), Adam(0.01), strategy=using, grad_accum_steps=2, ema=0.9)
        Trainer(runner, progress=False, steps_per_loop=3).fit(lambda epoch: batches(16), epochs=1)
        assert int(runner.optimizer.step.numpy()) == 8
        results.append([v.numpy() for v in list(runner.model.trainable_variables) + list(runner.ema.averages)])
        if using is strategy:
            for variable in runner.ema.averages:
                first, second = (value.numpy() for value in using.experimental_local_results(variable))
                assert np.array_equal(first, second)
    for mirrored, single in zip(*results):
        np.testing.assert_allclose(mirrored, single, rtol=1e-6, atol=5e-7)
