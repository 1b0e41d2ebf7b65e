"""Batches gathered inside the compiled loop (data.GatheredBatches) are training_batches' batches bit for bit:
the same order for the same (seed, epoch), the same x = pixel / 255, the same continuation after k batches;
a run trained from them equals a run trained from training_batches, straight and resumed mid-epoch."""
import numpy as np
import pytest
import tensorflow as tf

from core import data
from core.layers import Dense, Dropout, Flatten, Sequential
from core.optimizers import Adam
from core.trainer import Runner, Trainer
from stop_at import StopAt

EXAMPLES, BATCH = 200, 32  # 6 batches per epoch, 8 examples left out


def examples(seed=0):
    """uint8 pixels [N, 8, 8, 1] (every value 0..255 occurs) and labels [N]: the quarter numbered by the label
    is brighter."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, EXAMPLES).astype(np.int32)
    pixels = rng.integers(0, 180, (EXAMPLES, 4, 16))
    pixels[np.arange(EXAMPLES), labels] += 75
    pixels.reshape(-1)[:256] = np.arange(256)
    return tf.data.Dataset.from_tensor_slices((pixels.reshape(EXAMPLES, 8, 8, 1).astype(np.uint8), labels))


@tf.function
def draw(source, count):
    """`count` batches of `source`, read by next() inside one tf.function as the compiled loop does."""
    images, labels = tf.TensorArray(tf.float32, size=count), tf.TensorArray(tf.int32, size=count)
    for i in tf.range(count):
        x, y = next(source)
        images, labels = images.write(i, x), labels.write(i, y)
    return images.stack(), labels.stack()


def stacked(dataset):
    batches = list(dataset)
    return np.stack([x.numpy() for x, _ in batches]), np.stack([y.numpy() for _, y in batches])


def test_the_same_batches_as_training_batches_for_every_seed_epoch_and_skip():
    train = examples()
    source = data.GatheredBatches(train, BATCH, seed=5)
    assert source.steps == EXAMPLES // BATCH
    for epoch, skip in ((0, 0), (1, 0), (1, 4), (7, 5)):
        expected = stacked(data.training_batches(train, BATCH, seed=5, epoch=epoch).skip(skip))
        got = draw(source.start(epoch, skip), tf.constant(source.steps - skip))
        assert got[0].dtype == tf.float32 and got[0].shape == (source.steps - skip, BATCH, 8, 8, 1)
        np.testing.assert_array_equal(got[0].numpy(), expected[0])  # bit for bit, pixel / 255 included
        np.testing.assert_array_equal(got[1].numpy(), expected[1])
    other_seed = draw(data.GatheredBatches(train, BATCH, seed=6).start(1), tf.constant(1))[1].numpy()
    assert not np.array_equal(other_seed[0], draw(source.start(1), tf.constant(1))[1].numpy()[0])


def test_bad_sizes_and_skips():
    with pytest.raises(ValueError, match="do not fill one batch"):
        data.GatheredBatches(examples(), EXAMPLES + 1, seed=1)
    with pytest.raises(ValueError, match=r"skip must be in 0\.\.6, got 7"):
        data.GatheredBatches(examples(), BATCH, seed=1).start(0, 7)



def test_under_a_strategy_with_several_replicas_the_trainer_asks_for_tf_data_batches():
    from core import distribute
    strategy = distribute.make_strategy("mirrored")
    assert strategy.num_replicas_in_sync == 2
    with strategy.scope():
        model, optimizer = Sequential([Flatten(), Dense(4)]), Adam(0.01)
    trainer = Trainer(Runner(model, optimizer, strategy=strategy), progress=False)
    with pytest.raises(ValueError, match="a batch source gathered inside the loop feeds one replica"):
        trainer.fit(data.GatheredBatches(examples(), BATCH, seed=1), epochs=1)


def run(train_data, directory, epochs=3, callbacks=(), seed=1):
    tf.random.set_seed(seed)
    model = Sequential([Flatten(), Dense(16, activation="relu"), Dropout(0.25), Dense(4)])
    trainer = Trainer(Runner(model, Adam(0.01)), callbacks=callbacks, log_every=2, steps_per_loop=4,
                      checkpoint_dir=str(directory), progress=False)
    history = trainer.fit(train_data, epochs)
    return [v.numpy() for v in model.variables], [{k: v for k, v in e.items() if k != "seconds"}
                                                  for e in history.epochs]


def test_training_from_gathered_batches_equals_training_batches_straight_and_resumed(tmp_path):
    from tensorflow.python.framework import config  # is_/disable_op_determinism are not in the public API

    train = examples()
    was_enabled = config.is_op_determinism_enabled()
    tf.config.experimental.enable_op_determinism()
    try:
        reference = run(lambda epoch: data.training_batches(train, BATCH, seed=3, epoch=epoch), tmp_path / "a")
        gathered = run(data.GatheredBatches(train, BATCH, seed=3), tmp_path / "b")
        # Stopped at step 10, the 4th batch of epoch 2, then resumed by a differently seeded new trainer.
        run(data.GatheredBatches(train, BATCH, seed=3), tmp_path / "c", callbacks=[StopAt(10)])
        resumed = run(data.GatheredBatches(train, BATCH, seed=3), tmp_path / "c", seed=99)
    finally:
        if not was_enabled:
            config.disable_op_determinism()
    for other in (gathered, resumed):
        assert all(np.array_equal(a, b) for a, b in zip(reference[0], other[0]))
        assert other[1] == reference[1]
