"""The in-memory input pipeline: examples held as tensors -> shuffled batches per epoch, and the batch sources
Trainer.fit reads.

    train = Examples(pixels, labels)                       # uint8 [n, H, W, C] (any shape), int32 [n]
    for epoch in range(epochs):
        for images, labels in training_batches(train, 128, seed, epoch):   # [128, H, W, C] float32, [128]
            ...
    test = evaluation_batches(Examples(test_pixels, test_labels))        # batches of 1000, in order

The stages (the codelab's, with a permutation instead of a shuffle buffer):
    cache:       a split stays in memory as an Examples value, e.g. uint8 pixels [n, H, W, C] and int32 labels [n]
    shuffle:     a permutation of the example indices 0..n-1, a function of (seed, epoch) only
    batch:       the permutation cut into n // B rows of B indices (the remainder dropped)
    map:         gather the B images and labels of a row; uint8 pixels become x = pixel / 255 in [0, 1]
    prefetch:    the next batches are prepared while the training step runs
Where the tensors come from is the application's business: Examples takes them as they are.

A batch source is what Trainer.fit reads (BatchSource): GatheredBatches gathers the batches inside the compiled
loop, TFDataBatches reads them from tf.data (one Dataset, or one per epoch); batch_source() makes one of
whatever fit is given.
"""
import dataclasses
from typing import Protocol, runtime_checkable

import tensorflow as tf

from core import distribute

__all__ = ["Examples", "training_batches", "evaluation_batches", "split_validation", "BatchSource",
           "GatheredBatches", "TFDataBatches", "batch_source"]

READ_BATCH = 1000  # examples per batch when a Dataset is read into memory


@dataclasses.dataclass(frozen=True, eq=False)
class Examples:
    """n examples held in memory: images [n, ...] (uint8 pixels, x = pixel / 255 when batched, or floats) and
    integer labels [n]; n >= 1.

        train = Examples(pixels, labels)         # checked: shapes, dtypes, the counts agree
        len(train), train.take(1000)             # n; the first 1000 examples
        kept, held_out = train.split(5000)       # the first n - 5000, the last 5000
        train = Examples.read(dataset)           # a finite Dataset of (image, label), read once
    """
    images: tf.Tensor
    labels: tf.Tensor

    def __post_init__(self):
        images, labels = tf.convert_to_tensor(self.images), tf.convert_to_tensor(self.labels)
        if images.shape.rank is None or images.shape.rank < 2:
            raise ValueError(f"Examples: images must be [n, ...] with at least one value per example, got shape "
                             f"{images.shape}")
        if images.dtype != tf.uint8 and not images.dtype.is_floating:
            raise ValueError(f"Examples: images must be uint8 pixels or floats, got {images.dtype.name}")
        if labels.shape.rank != 1 or not labels.dtype.is_integer:
            raise ValueError(f"Examples: labels must be integers [n], got {labels.dtype.name} of shape "
                             f"{labels.shape}")
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"Examples: {images.shape[0]} images but {labels.shape[0]} labels")
        if labels.shape[0] == 0:
            raise ValueError("Examples: no examples")
        object.__setattr__(self, "images", images)
        object.__setattr__(self, "labels", labels)

    def __len__(self):
        return int(self.labels.shape[0])

    def __repr__(self):
        return f"Examples({len(self)} images {self.images.dtype.name} {self.images.shape[1:]})"

    def take(self, count):
        """The first `count` examples (all of them when count >= n)."""
        if count < 1:
            raise ValueError(f"take: a subset needs at least one example, got {count}")
        return self if count >= len(self) else Examples(self.images[:count], self.labels[:count])

    def split(self, count):
        """(the first n - count examples, the last count)."""
        if not 0 < count < len(self):
            raise ValueError(f"split_validation: count must be in 1..{len(self) - 1}, got {count}")
        keep = len(self) - count
        return (Examples(self.images[:keep], self.labels[:keep]),
                Examples(self.images[keep:], self.labels[keep:]))

    def dataset(self):
        """The per-example Dataset of (float image, label)."""
        return tf.data.Dataset.from_tensor_slices((self.images, self.labels)).map(lambda x, y: (_as_float(x), y))

    @classmethod
    def read(cls, dataset):
        """Every example of a finite per-example Dataset of (image, label), read now into memory."""
        if int(dataset.cardinality()) == tf.data.INFINITE_CARDINALITY:
            raise ValueError("Examples.read: the dataset is infinite; pass one epoch of examples")
        batches = list(dataset.batch(READ_BATCH))
        if not batches:
            raise ValueError("Examples.read: the dataset is empty")
        return cls(*(tf.concat(parts, axis=0) for parts in zip(*batches)))


def as_examples(examples):
    """An Examples value as it is; a per-example Dataset read into one (Examples.read)."""
    return Examples.read(examples) if isinstance(examples, tf.data.Dataset) else examples


def _scale(pixels):
    """x = pixel / 255: uint8 [...] -> float32 [...] in [0, 1].

    Computed in float64 and rounded once to float32, which gives the correctly rounded pixel / 255
    for every pixel 0..255 (float64's error is far below the distance from any p/255 to a float32
    rounding boundary), so no compiler rewrite of `/ 255` into `* (1/255)` can change a value:
    in float32 that rewrite is 1 ulp off for 126 of the 256 pixel values.
    """
    return tf.cast(tf.cast(pixels, tf.float64) / 255.0, tf.float32)


def _as_float(images):
    """uint8 pixels -> x = pixel / 255; float images as they are."""
    return _scale(images) if images.dtype == tf.uint8 else images


def training_batches(examples, batch_size, seed, epoch):
    """One epoch of shuffled batches (images [B, ...] float32, labels [B]) of an Examples value.

        shuffle:  order = a permutation of 0..n-1 drawn from the stateless seed (seed, epoch)
        batch:    order[:n // B * B] reshaped [n // B, B]: row i holds the indices of batch i
        map:      gather the B images (x = pixel / 255) and labels of a row, in parallel, in order
        prefetch: the next batches are prepared while the step runs

    A full permutation is the ideal shuffle, and it costs 4 bytes per example; the codelab's
    `shuffle(5000)` buffer, which holds whole decoded examples, was a memory compromise.
    The order depends only on (seed, epoch), not on TF's global seed: this call with the same arguments,
    in this process or a resumed one, gives the same batches, and `.skip(k)` continues an epoch.
    A finite per-example Dataset works too; it is read into memory by this call (Examples.read), so read it
    once into an Examples value to train on it for several epochs. Every batch has exactly `batch_size`
    examples, so a tf.function step traces once.
    """
    examples = _filling(examples, batch_size)
    batches = tf.data.Dataset.from_tensor_slices(_batch_indices(len(examples), batch_size, seed, epoch))
    return batches.map(lambda indices: _gather(examples.images, examples.labels, indices),
                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(tf.data.AUTOTUNE)


def _filling(examples, batch_size):
    """as_examples(examples), after checking that they fill at least one batch of batch_size."""
    if batch_size < 1:
        raise ValueError(f"training_batches: batch_size must be >= 1, got {batch_size}")
    examples = as_examples(examples)
    if len(examples) < batch_size:
        raise ValueError(f"training_batches: {len(examples)} examples do not fill one batch of {batch_size}")
    return examples


def _batch_indices(size, batch_size, seed, epoch):
    """int32 [size // B, B]: row i holds the example indices of batch i of epoch `epoch`.

    order = a permutation of 0..size-1 drawn from the stateless seed (seed, epoch); the remainder is dropped.
    """
    steps = size // batch_size
    order = tf.random.experimental.stateless_shuffle(tf.range(size), seed=tf.constant([seed, epoch], tf.int64))
    return tf.reshape(order[:steps * batch_size], [steps, batch_size])


def _gather(images, labels, indices):
    """The batch of the example indices [B]: (x = images[indices] / 255 as float, labels[indices]); one function
    for both batch sources (uint8 or float images), so their batches are the same bits."""
    return _as_float(tf.gather(images, indices)), tf.gather(labels, indices)


def evaluation_batches(examples, batch_size=1000):
    """All examples in order, in batches of `batch_size` (the last one may be smaller).

    For examples held as uint8 pixels, x = pixel / 255 is computed on the first pass and cached (4 bytes per
    pixel: 31 MB for MNIST's 10,000 test images), so evaluating every epoch repeats no conversion.
    """
    if batch_size < 1:
        raise ValueError(f"evaluation_batches: batch_size must be >= 1, got {batch_size}")
    examples = as_examples(examples)
    batches = tf.data.Dataset.from_tensor_slices((examples.images, examples.labels)).batch(batch_size)
    return batches.map(lambda x, y: (_as_float(x), y)).cache().prefetch(tf.data.AUTOTUNE)


def split_validation(examples, count=5000):
    """(first n - count examples, last count examples) of an Examples value (Examples.split)."""
    return as_examples(examples).split(count)


@runtime_checkable
class BatchSource(Protocol):
    """What Trainer.fit reads: the same batches for the same epoch, in the same order, so a run resumes exactly.

    element_spec: (images [B, ...], labels [B]) TensorSpecs of one global batch.
    steps: batches in every epoch.
    in_loop: True when start() returns the source itself, read by next() inside the compiled loop (the loop
      is traced once for the source; it feeds one replica); False for a new iterator each epoch.
    start(epoch, skip=0): an iterator over epoch `epoch`'s batches from batch `skip` on.
    """
    element_spec: tuple
    steps: int
    in_loop: bool

    def start(self, epoch, skip=0):
        ...


class GatheredBatches(tf.Module):
    """The batches of training_batches, gathered inside the compiled training loop instead of by tf.data.

        source = GatheredBatches(train, 128, seed)       # train: Examples; the tensors stay in memory, here
        source.start(epoch, skip=0)                      # eagerly: the epoch's order, from (seed, epoch)
        images, labels = next(source)                    # in a tf.function: the next batch

    For data that fits in memory. uint8 pixels are converted once, here, to x = pixel / 255 (4 bytes a value: 188 MB
    and ~0.5 s for MNIST's 60,000 images, against 47 MB as uint8): the exact conversion measured ~0.1 ms a batch of
    100 in the loop, a fifth of the softmax step, and a gather of float rows half of that. The epoch's order is the
    same permutation, cut into the same rows, as training_batches(train, batch_size, seed, epoch), and x is the
    same correctly rounded pixel / 255, so the batches are bit-identical and start(epoch, k) continues an epoch
    after k batches. A compiled loop that calls next() n times reads n rows of the order and gathers n batches
    without any element crossing from tf.data into the step (no iterator, no prefetch threads).
    """
    in_loop = True

    def __init__(self, examples, batch_size, seed):
        super().__init__(name="gathered_batches")
        examples = _filling(examples, batch_size)
        self.images = _as_float(examples.images)
        self.labels = examples.labels
        self.size = len(examples)
        self.batch_size = batch_size
        self.seed = seed
        self.steps = self.size // batch_size
        self.element_spec = (tf.TensorSpec([batch_size] + self.images.shape[1:].as_list(), self.images.dtype),
                             tf.TensorSpec([batch_size], self.labels.dtype))
        self.order = tf.Variable(tf.zeros([self.steps, batch_size], tf.int32), trainable=False, name="order")
        self.position = tf.Variable(0, dtype=tf.int64, trainable=False, name="position")

    def start(self, epoch, skip=0):
        """Epoch `epoch`'s order (from the seed and the epoch only); the next batch is its batch `skip`."""
        if not 0 <= skip <= self.steps:
            raise ValueError(f"GatheredBatches: skip must be in 0..{self.steps}, got {skip}")
        self.order.assign(_batch_indices(self.size, self.batch_size, self.seed, epoch))
        self.position.assign(skip)
        return self

    def __iter__(self):
        return self

    def __next__(self):
        """(images [B, ...] float, labels [B]) of the next row of the order; position += 1."""
        indices = tf.gather(self.order, self.position)
        self.position.assign_add(1)
        return _gather(self.images, self.labels, indices)


class TFDataBatches:
    """tf.data batches as a BatchSource: `batches` is a callable epoch (int, from 0) -> Dataset of that epoch's
    (images, labels) batches, or one Dataset for every epoch.

        source = TFDataBatches(lambda epoch: training_batches(train, 128, seed, epoch), strategy)
        iterator = source.start(epoch, skip)             # the epoch's batches after `skip`, split among replicas

    steps: the batches of epoch 0 (its Dataset's count, cut at steps_per_epoch); an infinite Dataset, or one
    of unknown length, needs steps_per_epoch. Under a strategy with several replicas each global batch is split
    among them (core.distribute.distribute_batches).
    """
    in_loop = False

    def __init__(self, batches, strategy=None, steps_per_epoch=None):
        self.batches = batches
        self.strategy = strategy or tf.distribute.get_strategy()
        self.steps_per_epoch = steps_per_epoch
        first = self.dataset(0)
        self.element_spec = first.element_spec
        self.steps = _length(first, steps_per_epoch)

    def dataset(self, epoch):
        """Epoch `epoch`'s Dataset of batches, its first steps_per_epoch batches when that is set."""
        dataset = self.batches(epoch) if callable(self.batches) else self.batches
        if not isinstance(dataset, tf.data.Dataset):
            raise ValueError(f"train_data({epoch}) must return a tf.data.Dataset, got {type(dataset).__name__}")
        return dataset if self.steps_per_epoch is None else dataset.take(self.steps_per_epoch)

    def start(self, epoch, skip=0):
        dataset = self.dataset(epoch)
        return iter(distribute.distribute_batches(self.strategy, dataset.skip(skip) if skip else dataset))


def _length(dataset, steps_per_epoch):
    """Number of batches of an epoch: tf.data's count, else steps_per_epoch; infinite or unknown is an error."""
    cardinality = int(dataset.cardinality())
    if cardinality == tf.data.INFINITE_CARDINALITY:
        raise ValueError("train_data is infinite: pass steps_per_epoch")
    if cardinality >= 0:
        return cardinality
    if steps_per_epoch is None:
        raise ValueError("train_data's number of batches is unknown: pass steps_per_epoch")
    return steps_per_epoch


def batch_source(batches, strategy=None, steps_per_epoch=None):
    """What Trainer.fit is given -> the BatchSource feeding `strategy`'s replicas.

    batches: a BatchSource (GatheredBatches: one replica only), a Dataset of batches for every epoch, or a
    callable epoch -> Dataset (TFDataBatches, cut at steps_per_epoch).
    """
    strategy = strategy or tf.distribute.get_strategy()
    if isinstance(batches, TFDataBatches):
        batches = batches.batches
    elif isinstance(batches, BatchSource):
        if batches.in_loop and strategy.num_replicas_in_sync > 1:
            raise ValueError("a batch source gathered inside the loop feeds one replica; under a strategy with "
                             "several, pass the epoch's tf.data batches (the strategy splits them)")
        return batches
    return TFDataBatches(batches, strategy, steps_per_epoch)
