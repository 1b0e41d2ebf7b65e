"""A small model trained for a few seconds on real MNIST with the project's own trainer (for the export and
predict tests), and a plain numpy reader of the gzipped IDX files."""
import functools
import gzip
import os

import numpy as np
import tensorflow as tf

from core import data, layers, optimizers
from core.trainer import Runner, Trainer
from datasets import idx


def read_idx(path):
    """A (gzipped) IDX file -> numpy uint8 array: magic 0x0000 08 <ndim>, ndim big-endian int32 sizes, data."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def mnist_test_set(mnist_dir):
    """(images uint8 [10000, 28, 28], labels uint8 [10000]) read with numpy."""
    return (read_idx(os.path.join(mnist_dir, "t10k-images-idx3-ubyte.gz")),
            read_idx(os.path.join(mnist_dir, "t10k-labels-idx1-ubyte.gz")))


@functools.lru_cache(maxsize=None)
def train_quick_model(mnist_dir, steps=300, seed=1):
    """Flatten -> Dense(64) -> BatchNorm -> relu -> Dropout(0.2) -> Dense(10), Adam, `steps` batches of 100.

    BatchNorm and Dropout make the export prove it runs in inference mode (moving statistics, no dropout).
    Returns (model, the test accuracy the trainer reported after the epoch); trained once per process, the
    export and predict tests share it (they only read it).
    """
    tf.random.set_seed(seed)
    model = layers.Sequential([layers.Flatten(), layers.Dense(64), layers.BatchNorm(), layers.Activation("relu"),
                               layers.Dropout(0.2), layers.Dense(10)], name="quick")
    trainer = Trainer(Runner(model, optimizers.Adam(0.005)), progress=False)
    train = idx.load(mnist_dir, "train")
    test = data.evaluation_batches(idx.load(mnist_dir, "test"))
    history = trainer.fit(lambda epoch: data.training_batches(train, 100, seed, epoch),
                          epochs=1, steps_per_epoch=steps, validation_data=test)
    return model, history.epochs[-1]["val_accuracy"]
