"""The training step compiled with XLA (Runner(jit_compile=True), train.py --jit_compile): the same training as
the plain step up to float32 rounding (Dropout aside: XLA draws other random bits), bit-identical from run to
run and across a resume, refused under a strategy of several replicas."""
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.framework import config  # is_/disable_op_determinism are not in the public API

from core import data, distribute
from core.layers import BatchNorm, Dense, Dropout, Flatten, Sequential
from core.optimizers import SGD, Adam
from core.trainer import Callback, Runner, Trainer
from stop_at import StopAt

EXAMPLES, BATCH = 256, 32  # 8 batches per epoch


def examples():
    """uint8 pixels [N, 6, 6, 1] and labels [N]: the third of the image numbered by the label is brighter."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, EXAMPLES).astype(np.int32)
    pixels = rng.integers(0, 170, (EXAMPLES, 3, 12))
    pixels[np.arange(EXAMPLES), labels] += 85
    return tf.data.Dataset.from_tensor_slices((pixels.reshape(EXAMPLES, 6, 6, 1).astype(np.uint8), labels))


@pytest.fixture(autouse=True)
def deterministic():
    was_enabled = config.is_op_determinism_enabled()
    tf.config.experimental.enable_op_determinism()
    yield
    if not was_enabled:
        config.disable_op_determinism()


def compiled_by_xla(step):
    """Whether a Runner's step is a tf.function compiled by XLA (not the plain method it wraps); tf.function
    has no public attribute that tells."""
    return isinstance(step, tf.types.experimental.PolymorphicFunction) and step._jit_compile is True


def run(jit_compile, directory=None, epochs=2, callbacks=(), seed=1, dropout=True, optimizer=None,
        precision="float32"):
    """(every model variable, the epochs' figures, the trainer) after training on the examples."""
    tf.random.set_seed(seed)
    model = Sequential([Flatten(), Dense(16), BatchNorm(), Dense(16, activation="relu")]
                       + ([Dropout(0.25)] if dropout else []) + [Dense(3)])
    trainer = Trainer(Runner(model, optimizer or Adam(0.01), jit_compile=jit_compile, precision=precision),
                      callbacks=callbacks, log_every=2, steps_per_loop=3, progress=False,
                      checkpoint_dir=None if directory is None else str(directory))
    history = trainer.fit(data.GatheredBatches(examples(), BATCH, seed=3), epochs)
    figures = [{k: v for k, v in e.items() if k != "seconds"} for e in history.epochs]
    return [v.numpy() for v in model.variables], figures, trainer


def test_the_compiled_step_trains_as_the_plain_step_does_up_to_rounding():
    """Without Dropout, whose masks come from XLA's own random bits when compiled, and with SGD, which does not
    amplify rounding differences as Adam's division by sqrt(v) does for gradients near 0."""
    plain, plain_figures, _ = run(jit_compile=False, dropout=False, optimizer=SGD(0.1))
    compiled, compiled_figures, trainer = run(jit_compile=True, dropout=False, optimizer=SGD(0.1))
    assert compiled_by_xla(trainer.runner.step)
    assert int(trainer.optimizer.step.numpy()) == 16
    for a, b in zip(plain, compiled):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    for a, b in zip(plain_figures, compiled_figures):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["accuracy"] == a["accuracy"]


def test_the_compiled_evaluation_gives_the_plain_figures_up_to_rounding():
    """The same trained weights evaluated by the plain and the XLA-compiled eval step, batches of 50 and a last
    one of 6: the same accuracy, the loss to float32 rounding."""
    _, _, trained = run(jit_compile=False)
    batches = data.evaluation_batches(data.Examples(*next(iter(examples().batch(EXAMPLES)))), 50)
    figures = []
    for jit in (False, True):
        trainer = Trainer(Runner(trained.model, Adam(0.01), jit_compile=jit), progress=False)
        figures.append(trainer.evaluate(batches))
        assert compiled_by_xla(trainer.runner.evaluation_step) == jit
    assert figures[1]["accuracy"] == figures[0]["accuracy"] > 0.5
    assert figures[1]["loss"] == pytest.approx(figures[0]["loss"], rel=1e-6)


def test_the_compiled_step_is_bit_identical_run_to_run_and_across_a_resume(tmp_path):
    """A second run, stopped in epoch 2 and resumed by a third (its seed ignored: the checkpoint's), ends with the
    first run's weights and figures, bit for bit."""
    straight, figures, _ = run(jit_compile=True, directory=tmp_path / "a", epochs=3)
    run(jit_compile=True, directory=tmp_path / "b", epochs=3, callbacks=[StopAt(10)])  # in epoch 2
    resumed, resumed_figures, _ = run(jit_compile=True, directory=tmp_path / "b", epochs=3, seed=99)
    assert all(np.array_equal(a, b) for a, b in zip(straight, resumed))
    assert resumed_figures == figures


class HugeLossScale(Callback):
    """Starts float16 loss scaling at 2^20: the scaled loss overflows float16 (max 65504) until halvings bring
    the scale down, so the first steps are skipped."""

    def on_train_begin(self, trainer):
        trainer.runner.loss_scale.scale.assign(2.0 ** 20)


def test_float16_loss_scaling_compiles_and_skips_the_same_steps():
    """mixed_float16 under XLA: the loss-scale controller and the guard's lookup of a bad tensor (in a tf.cond,
    whose branches XLA may both evaluate) compile, and skip and halve on the same steps as the plain step."""
    trainers = [run(jit_compile=jit, dropout=False, optimizer=SGD(0.1), precision="mixed_float16",
                    callbacks=[HugeLossScale()])[2] for jit in (False, True)]
    scale, good_steps = ([int(getattr(trainer.runner.loss_scale, name).numpy()) for trainer in trainers]
                         for name in ("scale", "good_steps"))
    # Both: 3 overflowing steps skipped (2^20 -> 2^17), the 13 others applied, and nothing for the NaN guard.
    assert scale == [2 ** 17] * 2 and good_steps == [13] * 2
    assert [int(trainer.runner.guard.bad_step.numpy()) for trainer in trainers] == [-1, -1]


def test_a_strategy_with_several_replicas_is_refused():
    strategy = distribute.make_strategy("mirrored")
    with strategy.scope():
        model, optimizer = Sequential([Flatten(), Dense(3)]), Adam(0.01)
    with pytest.raises(ValueError, match="jit_compile compiles the step of one replica"):
        Trainer(Runner(model, optimizer, strategy=strategy, jit_compile=True))
