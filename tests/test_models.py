"""The model zoo: every model builds, has exactly the parameters of its Keras twin, and learns.

Keras appears only here, as the oracle for the parameter counts.
"""
import gzip
import os

import numpy as np
import pytest
import tensorflow as tf

from core import losses, optimizers
from models import REGISTRY, ModelSpec, get

keras = pytest.importorskip("keras")
L = keras.layers


def _keras_dense(hidden, activation, dropout, dropout_on_input=False):
    layers = [keras.Input((28, 28, 1)), L.Flatten()]
    if dropout and dropout_on_input:
        layers.append(L.Dropout(dropout))
    for units in hidden:
        layers.append(L.Dense(units, activation=activation))
        if dropout:
            layers.append(L.Dropout(dropout))
    return keras.Sequential(layers + [L.Dense(10)])


def _keras_conv(convs, dropout, batch_norm=False):
    layers = [keras.Input((28, 28, 1))]
    for filters, kernel, stride in convs:
        if batch_norm:
            layers += [L.Conv2D(filters, kernel, stride, padding="same", use_bias=False),
                       L.BatchNormalization(center=True, scale=False), L.Activation("relu")]
        else:
            layers.append(L.Conv2D(filters, kernel, stride, padding="same", activation="relu"))
    layers.append(L.Flatten())
    if batch_norm:
        layers += [L.Dense(200, use_bias=False), L.BatchNormalization(center=True, scale=False),
                   L.Activation("relu")]
    else:
        layers.append(L.Dense(200, activation="relu"))
    return keras.Sequential(layers + [L.Dropout(dropout), L.Dense(10)])


KERAS_TWINS = {
    "softmax": lambda: keras.Sequential([keras.Input((28, 28, 1)), L.Flatten(), L.Dense(10)]),
    "dense_sigmoid": lambda: _keras_dense((200, 60), "sigmoid", 0.0),
    "dense": lambda: _keras_dense((200, 60), "relu", 0.0),
    "dense_decay": lambda: _keras_dense((200, 100, 60), "relu", 0.25),
    "conv": lambda: _keras_conv([(12, 3, 1), (24, 6, 2), (32, 6, 2)], 0.5),
    "conv_bn": lambda: _keras_conv([(12, 3, 1), (24, 6, 2), (32, 6, 2)], 0.3, batch_norm=True),
    "conv_bn_big": lambda: _keras_conv([(24, 6, 1), (48, 5, 2), (64, 4, 2)], 0.25, batch_norm=True),
    "dense5": lambda: _keras_dense((200, 100, 60, 30), "relu", 0.0),
    "conv_small": lambda: _keras_conv([(6, 6, 1), (12, 5, 2), (24, 4, 2)], 0.35),
}


def _keras_counts(model):
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    non_trainable = sum(int(np.prod(w.shape)) for w in model.non_trainable_weights)
    return trainable + non_trainable, trainable, non_trainable


def _build(name, dropout=None):
    spec = REGISTRY[name]
    tf.random.set_seed(1)
    model = spec.build(spec.defaults["dropout"] if dropout is None else dropout)
    model.build((None, 28, 28, 1))
    return model


def test_registry_names_are_the_interface():
    assert list(REGISTRY) == ["softmax", "dense_sigmoid", "dense", "dense_decay", "conv", "conv_bn",
                              "conv_bn_big", "dense5", "conv_small"]
    for name, spec in REGISTRY.items():
        assert isinstance(spec, ModelSpec)
        assert spec.description and spec.target and spec.defaults["source"]
        assert spec.defaults["optimizer"] in ("adam", "sgd")
        assert spec.defaults["batch_size"] > 0 and spec.defaults["epochs"] > 0
        assert spec.defaults["learning_rate"] > 0 and 0.0 <= spec.defaults["dropout"] < 1.0
    with pytest.raises(ValueError, match="unknown model 'nope'.*conv_bn"):
        get("nope")


@pytest.mark.parametrize("name", list(REGISTRY))
def test_parameter_counts_equal_keras_twin(name):
    model = _build(name)
    assert model.count_params() == _keras_counts(KERAS_TWINS[name]())
    assert model(tf.zeros([3, 28, 28, 1])).shape == (3, 10)
    assert f"Total params: {model.count_params()[0]:,}" in model.summary(print_fn=lambda line: None)


def test_conv_bn_counts_match_the_codelab():
    assert _build("conv_bn").count_params() == (354_538, 354_002, 536)


def test_dropout_zero_leaves_dropout_layers_out():
    with_dropout = [type(layer).__name__ for layer in _build("dense_decay").layers]
    without = [type(layer).__name__ for layer in _build("dense_decay", dropout=0.0).layers]
    assert with_dropout.count("Dropout") == 3 and "Dropout" not in without
    assert [t for t in with_dropout if t != "Dropout"] == without


def _mnist_batch(mnist_dir, count=64):
    with gzip.open(os.path.join(mnist_dir, "train-images-idx3-ubyte.gz")) as f:
        images = np.frombuffer(f.read(16 + 28 * 28 * count)[16:], np.uint8)
    with gzip.open(os.path.join(mnist_dir, "train-labels-idx1-ubyte.gz")) as f:
        labels = np.frombuffer(f.read(8 + count)[8:], np.uint8)
    return (images.reshape(count, 28, 28, 1).astype(np.float32) / 255.0), labels.astype(np.int32)


@pytest.mark.parametrize("name", list(REGISTRY))
def test_loss_falls_with_the_default_optimizer(name, mnist_dir):
    images, labels = _mnist_batch(mnist_dir)
    defaults = REGISTRY[name].defaults
    model = _build(name)
    optimizer_class = {"adam": optimizers.Adam, "sgd": optimizers.SGD}[defaults["optimizer"]]
    optimizer = optimizer_class(defaults["learning_rate"])
    optimizer.build(model.trainable_variables)

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = losses.softmax_cross_entropy(model(x, training=True), y)
        optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return loss

    # Training-mode losses: batch norm's moving averages need many more steps than these to settle.
    trajectory = [float(step(images, labels)) for _ in range(10)]
    assert np.all(np.isfinite(trajectory)) and trajectory[-1] < trajectory[0], trajectory
