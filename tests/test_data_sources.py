"""core.data's values: Examples (the checks in one place, take, split, read) and the batch sources Trainer.fit reads
(GatheredBatches, TFDataBatches, batch_source): the same batches from each, the same continuation after k batches,
the errors, a strategy's split; no module state."""
import weakref

import numpy as np
import pytest
import tensorflow as tf

from core import data, distribute

EXAMPLES, BATCH = 100, 16  # 6 batches per epoch, 4 examples left out


def examples(count=EXAMPLES):
    """uint8 pixels [count, 4, 4, 1] whose pixel (0, 0) is the example's index, labels [count] = index % 7."""
    pixels = np.random.default_rng(0).integers(0, 256, (count, 4, 4, 1)).astype(np.uint8)
    pixels[:, 0, 0, 0] = np.arange(count)
    return data.Examples(pixels, (np.arange(count) % 7).astype(np.int32))


def numpy_batches(batches):
    """[(images, labels)] of an iterable of batches, as numpy arrays."""
    return [(x.numpy(), y.numpy()) for x, y in batches]


@tf.function
def draw(source, count):
    """`count` batches of a source read by next() inside one tf.function, as the compiled loop reads them."""
    images = tf.TensorArray(tf.float32, size=count)
    labels = tf.TensorArray(tf.int32, size=count)
    for i in tf.range(count):
        x, y = next(source)
        images, labels = images.write(i, x), labels.write(i, y)
    return images.stack(), labels.stack()


def assert_same(got, expected):
    assert len(got) == len(expected)
    for (x, y), (x_expected, y_expected) in zip(got, expected):
        np.testing.assert_array_equal(x, x_expected)
        np.testing.assert_array_equal(y, y_expected)


# ------------------------------------------------------------------------------------------------ Examples

def test_examples_hold_their_tensors_and_take_split_read_keep_them():
    train = examples()
    assert len(train) == EXAMPLES and train.images.dtype == tf.uint8 and train.labels.dtype == tf.int32
    first = train.take(30)
    assert len(first) == 30 and train.take(10 ** 6) is train
    np.testing.assert_array_equal(first.images.numpy(), train.images.numpy()[:30])
    kept, held_out = train.split(20)
    assert (len(kept), len(held_out)) == (80, 20)
    np.testing.assert_array_equal(held_out.labels.numpy(), np.arange(80, 100) % 7)
    assert [len(part) for part in data.split_validation(train, 20)] == [80, 20]
    # The per-example view, and a Dataset read back: x = pixel / 255, the labels as they were.
    read = data.Examples.read(train.dataset())
    np.testing.assert_array_equal(read.images.numpy(), train.images.numpy().astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(read.labels.numpy(), train.labels.numpy())


@pytest.mark.parametrize("images, labels, message", [
    (np.zeros([3, 4, 4, 1], np.uint8), np.zeros([3], np.float32), "labels must be integers [n], got float32"),
    (np.zeros([3, 4, 4, 1], np.uint8), np.zeros([3, 1], np.int32), "labels must be integers [n]"),
    (np.zeros([3], np.uint8), np.zeros([3], np.int32), "images must be [n, ...] with at least one value"),
    (np.zeros([3, 4], np.int32), np.zeros([3], np.int32), "images must be uint8 pixels or floats, got int32"),
    (np.zeros([3, 4], np.float32), np.zeros([2], np.int32), "3 images but 2 labels"),
    (np.zeros([0, 4], np.float32), np.zeros([0], np.int32), "no examples"),
])
def test_examples_are_checked_when_made(images, labels, message):
    with pytest.raises(ValueError, match=f"^Examples: {message}".replace("[", r"\[").replace("]", r"\]")):
        data.Examples(images, labels)


def test_subsets_and_reads_are_checked():
    train = examples()
    with pytest.raises(ValueError, match="at least one example, got 0"):
        train.take(0)
    with pytest.raises(ValueError, match=r"count must be in 1\.\.99, got 100"):
        train.split(100)
    with pytest.raises(ValueError, match="infinite"):
        data.Examples.read(train.dataset().repeat())
    with pytest.raises(ValueError, match="empty"):
        data.Examples.read(train.dataset().take(0))


def test_no_module_state_the_gathered_source_holds_its_tensors():
    """The tensors of a split are held by the values that use them: no table in core.data keyed by Dataset."""
    assert not [name for name, value in vars(data).items()
                if isinstance(value, (weakref.WeakKeyDictionary, weakref.WeakValueDictionary, dict))
                and not name.startswith("__")]
    source = data.GatheredBatches(examples(), BATCH, seed=1)
    np.testing.assert_array_equal(source.images.numpy(), examples().images.numpy() / np.float32(255))
    np.testing.assert_array_equal(source.labels.numpy(), examples().labels.numpy())


# -------------------------------------------------------------------------------------------- batch sources

def test_every_source_gives_training_batches_and_continues_after_skip():
    """GatheredBatches (read in a tf.function), TFDataBatches of the per-epoch callable and of one Dataset:
    bit for bit training_batches(train, B, seed, epoch).skip(k)."""
    train = examples()
    gathered = data.GatheredBatches(train, BATCH, seed=4)
    per_epoch = data.batch_source(lambda epoch: data.training_batches(train, BATCH, seed=4, epoch=epoch))
    one = data.batch_source(data.training_batches(train, BATCH, seed=4, epoch=2))
    assert isinstance(per_epoch, data.TFDataBatches) and data.batch_source(gathered) is gathered
    for source in (gathered, per_epoch, one):
        assert isinstance(source, data.BatchSource) and source.steps == EXAMPLES // BATCH
        assert source.element_spec == (tf.TensorSpec([BATCH, 4, 4, 1], tf.float32), tf.TensorSpec([BATCH], tf.int32))
    for epoch, skip in ((0, 0), (2, 0), (2, 4), (5, 6)):
        expected = numpy_batches(data.training_batches(train, BATCH, seed=4, epoch=epoch).skip(skip))
        images, labels = draw(gathered.start(epoch, skip), tf.constant(gathered.steps - skip))
        assert_same(list(zip(images.numpy(), labels.numpy())), expected)
        assert_same(numpy_batches(per_epoch.start(epoch, skip)), expected)
    assert_same(numpy_batches(one.start(7, 3)),
                numpy_batches(data.training_batches(train, BATCH, seed=4, epoch=2).skip(3)))


def test_steps_per_epoch_cuts_a_tf_data_source_and_its_length_errors():
    batches = examples().dataset().batch(10)
    cut = data.batch_source(batches, steps_per_epoch=4)
    assert cut.steps == 4 and len(list(cut.start(0, 1))) == 3
    assert data.batch_source(data.TFDataBatches(batches), steps_per_epoch=4).steps == 4  # re-cut for fit
    assert data.batch_source(batches.repeat(), steps_per_epoch=3).steps == 3
    unknown = batches.filter(lambda x, y: True)
    assert data.batch_source(unknown, steps_per_epoch=5).steps == 5
    with pytest.raises(ValueError, match="train_data is infinite: pass steps_per_epoch"):
        data.batch_source(batches.repeat())
    with pytest.raises(ValueError, match="train_data's number of batches is unknown: pass steps_per_epoch"):
        data.batch_source(unknown)
    with pytest.raises(ValueError, match=r"train_data\(0\) must return a tf.data.Dataset, got list"):
        data.batch_source([1, 2])


def test_a_strategy_splits_tf_data_batches_and_refuses_a_gathered_source():
    strategy = distribute.make_strategy("mirrored")
    assert strategy.num_replicas_in_sync == 2
    train = examples()
    source = data.batch_source(lambda epoch: data.training_batches(train, BATCH, seed=2, epoch=epoch), strategy)
    images, labels = next(source.start(1, 2))
    expected_images, expected_labels = numpy_batches(data.training_batches(train, BATCH, seed=2, epoch=1))[2]
    for replica, rows in enumerate((slice(0, BATCH // 2), slice(BATCH // 2, BATCH))):
        np.testing.assert_array_equal(images.values[replica].numpy(), expected_images[rows])
        np.testing.assert_array_equal(labels.values[replica].numpy(), expected_labels[rows])
    with pytest.raises(ValueError, match="a batch source gathered inside the loop feeds one replica"):
        data.batch_source(data.GatheredBatches(train, BATCH, seed=2), strategy)


# ------------------------------------------------------------------------------------------- Trainer.fit

class Listed:
    """A batch source of its own (neither gathered nor a TFDataBatches): epoch e's batches are those of
    training_batches(train, B, 9, e), read from a tf.data iterator that start() makes."""
    in_loop = False

    def __init__(self, train):
        self.train = train
        self.element_spec = data.training_batches(train, BATCH, 9, 0).element_spec
        self.steps = len(train) // BATCH

    def start(self, epoch, skip=0):
        return iter(data.training_batches(self.train, BATCH, 9, epoch).skip(skip))


def trained_weights(train_data, epochs=2):
    """The weights of a small model trained by Trainer.fit(train_data, epochs) from the same start."""
    from core.layers import Dense, Flatten, Sequential
    from core.optimizers import Adam
    from core.trainer import Runner, Trainer

    tf.random.set_seed(1)
    model = Sequential([Flatten(), Dense(7)])
    Trainer(Runner(model, Adam(0.01)), log_every=6, progress=False).fit(train_data, epochs)
    return [variable.numpy() for variable in model.variables]


def test_fit_trains_from_any_batch_source_as_from_its_tf_data_batches():
    train = examples()
    expected = trained_weights(lambda epoch: data.training_batches(train, BATCH, 9, epoch))
    for value, expected_value in zip(trained_weights(Listed(train)), expected):
        np.testing.assert_array_equal(value, expected_value)


def test_every_epoch_has_the_batches_of_the_first():
    """steps is the source's: an epoch that ends before it is an error, not a shorter epoch."""
    batches = examples().dataset().batch(BATCH, drop_remainder=True)
    with pytest.raises(ValueError, match=r"train_data\(1\) ended before 6 batches"):
        trained_weights(lambda epoch: batches if epoch == 0 else batches.take(4))
