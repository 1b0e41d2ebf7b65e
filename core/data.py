"""The in-memory input pipeline: examples held as tensors -> shuffled batches per epoch, as tf.data.

    train = in_memory(pixels, labels)                     # uint8 [n, H, W, C] (any shape), int32 [n]
    for epoch in range(epochs):
        for images, labels in training_batches(train, 128, seed, epoch):   # [128, H, W, C] float32, [128]
            ...
    test = evaluation_batches(in_memory(test_pixels, test_labels))        # batches of 1000, in order

The stages (the codelab's, with a permutation instead of a shuffle buffer):
    cache:       a split stays in memory as its tensors, e.g. uint8 pixels [n, H, W, C] and int32 labels [n]
    shuffle:     a permutation of the example indices 0..n-1, a function of (seed, epoch) only
    batch:       the permutation cut into n // B rows of B indices (the remainder dropped)
    map:         gather the B images and labels of a row; uint8 pixels become x = pixel / 255 in [0, 1]
    prefetch:    the next batches are prepared while the training step runs
Where the tensors come from is the application's business: in_memory() takes them as they are.
"""
import weakref

import tensorflow as tf

__all__ = ["in_memory", "training_batches", "GatheredBatches", "evaluation_batches", "split_validation"]

READ_BATCH = 1000  # examples per batch when another Dataset is read into memory

# The cache: Dataset (from in_memory(), split_validation(), or read once by training_batches) -> its examples
# as tensors (images, labels); images are uint8 pixels or floats.
_examples = weakref.WeakKeyDictionary()


def in_memory(images, labels):
    """The per-example Dataset of (float image, label) over tensors held in memory (uint8: x = pixel / 255).

    images: uint8 pixels or floats [n, ...]; labels [n]. training_batches, evaluation_batches and
    split_validation then read these tensors directly; the cardinality is known.
    """
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).map(lambda x, y: (_as_float(x), y))
    _examples[dataset] = (images, labels)
    return dataset


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


def training_batches(dataset, batch_size, seed, epoch):
    """One epoch of shuffled batches (images [B, ...] float32, labels [B]).

        cache:    the examples of `dataset` as tensors in memory (uint8 pixels for in_memory() of pixels)
        shuffle:  order = a permutation of 0..n-1 drawn from the stateless seed (seed, epoch)
        batch:    order[:n // B * B] reshaped [n // B, B]: row i holds the indices of batch i
        map:      gather the B images (x = pixel / 255) and labels of a row, in parallel, in order
        prefetch: the next batches are prepared while the step runs

    A full permutation is the ideal shuffle, and it costs 4 bytes per example; the codelab's
    `shuffle(5000)` buffer, which holds whole decoded examples, was a memory compromise.
    The order depends only on (seed, epoch), not on TF's global seed: this call with the same arguments,
    in this process or a resumed one, gives the same batches, and `.skip(k)` continues an epoch.
    `dataset` comes from in_memory() or split_validation(); any other finite Dataset of (image, label)
    works too (read once into memory, on its first epoch). Every batch has exactly `batch_size`
    examples, so a tf.function step traces once.
    """
    images, labels = _checked_tensors(dataset, batch_size)
    batches = tf.data.Dataset.from_tensor_slices(_batch_indices(int(labels.shape[0]), batch_size, seed, epoch))
    return batches.map(lambda indices: _gather(images, labels, indices), num_parallel_calls=tf.data.AUTOTUNE,
                       deterministic=True).prefetch(tf.data.AUTOTUNE)


class GatheredBatches(tf.Module):
    """The batches of training_batches, gathered inside the compiled training loop instead of by tf.data.

        source = GatheredBatches(train, 128, seed)       # the examples stay tensors in memory
        source.start(epoch, skip=0)                      # eagerly: the epoch's order, from (seed, epoch)
        images, labels = next(source)                    # in a tf.function: the next batch

    For data that fits in memory. uint8 pixels are converted once, here, to x = pixel / 255 (4 bytes a value: 188 MB
    and ~0.5 s for MNIST's 60,000 images, against 47 MB as uint8): the exact conversion measured ~0.1 ms a batch of
    100 in the loop, a fifth of the softmax step, and a gather of float rows half of that. The epoch's order is the
    same permutation, cut into the same rows, as training_batches(dataset, batch_size, seed, epoch), and x is the
    same correctly rounded pixel / 255, so the batches are bit-identical and start(epoch, k) continues an epoch
    after k batches. A compiled loop that calls next() n times reads n rows of the order and gathers n batches
    without any element crossing from tf.data into the step (no iterator, no prefetch threads).
    """

    def __init__(self, dataset, batch_size, seed):
        super().__init__(name="gathered_batches")
        images, self.labels = _checked_tensors(dataset, batch_size)
        self.images = _as_float(images)
        self.size = int(self.labels.shape[0])
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


def _gather(images, labels, indices):
    """The batch of the example indices [B]: (x = images[indices] / 255 as float, labels[indices]); one function
    for both batch sources (uint8 or float images), so their batches are the same bits."""
    return _as_float(tf.gather(images, indices)), tf.gather(labels, indices)


def _checked_tensors(dataset, batch_size):
    """_tensors(dataset), after checking that they fill at least one batch of batch_size."""
    if batch_size < 1:
        raise ValueError(f"training_batches: batch_size must be >= 1, got {batch_size}")
    images, labels = _tensors(dataset)
    size = int(labels.shape[0])
    if size < batch_size:
        raise ValueError(f"training_batches: {size} examples do not fill one batch of {batch_size}")
    return images, labels


def _batch_indices(size, batch_size, seed, epoch):
    """int32 [size // B, B]: row i holds the example indices of batch i of epoch `epoch`.

    order = a permutation of 0..size-1 drawn from the stateless seed (seed, epoch); the remainder is dropped.
    """
    steps = size // batch_size
    order = tf.random.experimental.stateless_shuffle(tf.range(size), seed=tf.constant([seed, epoch], tf.int64))
    return tf.reshape(order[:steps * batch_size], [steps, batch_size])


def evaluation_batches(dataset, batch_size=1000):
    """All examples in order, in batches of `batch_size` (the last one may be smaller).

    For examples held as uint8 pixels, x = pixel / 255 is computed on the first pass and cached (4 bytes per
    pixel: 31 MB for MNIST's 10,000 test images), so evaluating every epoch repeats no conversion.
    """
    if batch_size < 1:
        raise ValueError(f"evaluation_batches: batch_size must be >= 1, got {batch_size}")
    if dataset not in _examples:
        return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)
    images, labels = _examples[dataset]
    batches = tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch_size)
    return batches.map(lambda x, y: (_as_float(x), y)).cache().prefetch(tf.data.AUTOTUNE)


def split_validation(dataset, count=5000):
    """(first N - count examples, last count examples) of a dataset of known size N (e.g. from in_memory()).

    For a dataset of in_memory(), both parts hold their slice of its tensors in memory.
    """
    size = int(dataset.cardinality())
    if size < 0:
        raise ValueError("split_validation: the dataset size is unknown; pass a dataset of in_memory()")
    if not 0 < count < size:
        raise ValueError(f"split_validation: count must be in 1..{size - 1}, got {count}")
    keep = size - count
    if dataset not in _examples:
        return dataset.take(keep), dataset.skip(keep)
    images, labels = _examples[dataset]
    return in_memory(images[:keep], labels[:keep]), in_memory(images[keep:], labels[keep:])


def _tensors(dataset):
    """(images, labels) of every example of `dataset`, as tensors; read once per Dataset object."""
    if dataset not in _examples:
        if int(dataset.cardinality()) == tf.data.INFINITE_CARDINALITY:
            raise ValueError("training_batches: the dataset is infinite; pass one epoch of examples")
        batches = list(dataset.batch(READ_BATCH))
        if not batches:
            raise ValueError("training_batches: the dataset is empty")
        _examples[dataset] = tuple(tf.concat(parts, axis=0) for parts in zip(*batches))
    return _examples[dataset]
