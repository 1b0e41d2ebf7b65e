"""Whole models against their Keras twins: parameter counts as Keras's model.summary() reports them, and a small
conv -> batch-norm -> dense stack computing the same logits, loss gradients and training trajectory."""
import re

import numpy as np
import pytest
import tensorflow as tf

keras = pytest.importorskip("keras")

from core import layers, losses, optimizers  # noqa: E402


def _keras_summary_counts(model):
    lines = []
    model.summary(print_fn=lambda line, *args, **kwargs: lines.append(line))
    text = "\n".join(lines)
    return tuple(int(re.search(rf"{label} params: ([\d,]+)", text).group(1).replace(",", ""))
                 for label in ("Total", "Trainable", "Non-trainable"))


def _one_layer():
    ours = layers.Sequential([layers.Flatten(), layers.Dense(10)])
    theirs = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(), keras.layers.Dense(10)])
    return ours, theirs


def _batchnorm_convnet():
    """The codelab's batch-norm convnet: conv 3x3x12 s1, 6x6x24 s2, 6x6x32 s2 (same, no bias, BN(scale=False),
    relu), flatten, dense 200 (no bias, BN, relu), dropout 0.3, dense 10."""
    ours, theirs = [], [keras.Input((28, 28, 1))]
    for filters, size, stride in [(12, 3, 1), (24, 6, 2), (32, 6, 2)]:
        ours += [layers.Conv2D(filters, size, strides=stride, padding="same", use_bias=False),
                 layers.BatchNorm(center=True, scale=False), layers.Activation("relu")]
        theirs += [keras.layers.Conv2D(filters, size, strides=stride, padding="same", use_bias=False),
                   keras.layers.BatchNormalization(center=True, scale=False), keras.layers.Activation("relu")]
    ours += [layers.Flatten(), layers.Dense(200, use_bias=False), layers.BatchNorm(scale=False),
             layers.Activation("relu"), layers.Dropout(0.3), layers.Dense(10)]
    theirs += [keras.layers.Flatten(), keras.layers.Dense(200, use_bias=False),
               keras.layers.BatchNormalization(scale=False), keras.layers.Activation("relu"),
               keras.layers.Dropout(0.3), keras.layers.Dense(10)]
    return layers.Sequential(ours), keras.Sequential(theirs)


@pytest.mark.parametrize("make,expected", [(_one_layer, (7850, 7850, 0)),
                                           (_batchnorm_convnet, (354538, 354002, 536))])
def test_parameter_counts_equal_keras_summary(make, expected):
    ours, theirs = make()
    ours.build((None, 28, 28, 1))
    assert ours.count_params() == expected
    assert _keras_summary_counts(theirs) == expected
    text = ours.summary(print_fn=lambda line: None)
    assert f"Total params: {expected[0]:,}" in text
    assert f"Non-trainable params: {expected[2]:,}" in text


def _twins(fused=True):
    """conv (same, stride 1) -> BN -> relu -> conv (same, stride 2, odd input) -> BN -> relu -> flatten -> dense ->
    BN -> relu -> dense, built by hand (on the fused kernels, or the formulas) and in Keras with identical weights."""
    ours = layers.Sequential([
        layers.Conv2D(4, 3, use_bias=False, fused=fused), layers.BatchNorm(scale=False, fused=fused),
        layers.Activation("relu", fused=fused),
        layers.Conv2D(6, 4, strides=2, use_bias=False, fused=fused),
        layers.BatchNorm(center=True, scale=True, fused=fused), layers.Activation("relu", fused=fused),
        layers.Flatten(), layers.Dense(16, use_bias=False, fused=fused), layers.BatchNorm(scale=False, fused=fused),
        layers.Activation("relu", fused=fused), layers.Dense(10, fused=fused)])
    theirs = keras.Sequential([
        keras.Input((9, 9, 1)),
        keras.layers.Conv2D(4, 3, padding="same", use_bias=False), keras.layers.BatchNormalization(scale=False),
        keras.layers.Activation("relu"),
        keras.layers.Conv2D(6, 4, strides=2, padding="same", use_bias=False), keras.layers.BatchNormalization(),
        keras.layers.Activation("relu"), keras.layers.Flatten(), keras.layers.Dense(16, use_bias=False),
        keras.layers.BatchNormalization(scale=False), keras.layers.Activation("relu"), keras.layers.Dense(10)])
    tf.random.set_seed(3)
    ours.build((None, 9, 9, 1))
    pairs = []
    for our_layer, keras_layer in zip(ours.layers, theirs.layers):
        ours_by_name = {v.name.split("/")[-1][:-2]: v for v in our_layer.variables}
        for kv in keras_layer.weights:
            name = {"kernel": "w", "bias": "b"}.get(kv.path.split("/")[-1], kv.path.split("/")[-1])
            ov = ours_by_name.pop(name)
            kv.assign(ov)
            pairs.append((ov, kv))
        assert not ours_by_name
    assert len(pairs) == len(ours.variables) == len(theirs.weights)
    return ours, theirs, pairs


def _batch(seed):
    rng = np.random.default_rng(seed)
    return (tf.constant(rng.random((8, 9, 9, 1)).astype(np.float32)),
            tf.constant(rng.integers(0, 10, 8).astype(np.int32)))


@pytest.mark.parametrize("fused", [False, True], ids=["formulas", "fused"])
def test_small_convnet_equals_its_keras_twin_in_both_modes(fused):
    """The formulas give Keras's logits to 1e-6 (measured: identical); the fused BatchNorm kernel sums in another
    order, and three of them compound it: 2.5e-6 measured, so its logits are held to 4e-6."""
    ours, theirs, pairs = _twins(fused)
    logits_atol = 4e-6 if fused else 1e-6
    keras_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    for training in (True, False):
        images, labels = _batch(0)
        with tf.GradientTape(persistent=True) as tape:
            logits_ours = ours(images, training=training)
            logits_keras = theirs(images, training=training)
            loss_ours = losses.softmax_cross_entropy(logits_ours, labels)
            loss_keras = keras_loss(labels, logits_keras)
        np.testing.assert_allclose(logits_ours.numpy(), logits_keras.numpy(), rtol=1e-5, atol=logits_atol)
        np.testing.assert_allclose(loss_ours.numpy(), loss_keras.numpy(), rtol=1e-6)
        for ov, kv in pairs:
            if ov.trainable:
                np.testing.assert_allclose(tape.gradient(loss_ours, ov).numpy(),
                                           tape.gradient(loss_keras, kv.value).numpy(),
                                           rtol=1e-5, atol=1e-6, err_msg=ov.name)
            np.testing.assert_allclose(ov.numpy(), kv.numpy(), rtol=1e-6, atol=1e-7, err_msg=ov.name)


def test_small_convnet_trains_like_its_keras_twin():
    """Five Adam steps in a tf.function on both: every variable (moving statistics included) stays equal,
    then inference logits agree."""
    ours, theirs, pairs = _twins()
    adam_ours, adam_keras = optimizers.Adam(0.01), keras.optimizers.Adam(0.01)
    adam_ours.build(ours.trainable_variables)
    keras_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def step_ours(images, labels):
        with tf.GradientTape() as tape:
            loss = losses.softmax_cross_entropy(ours(images, training=True), labels)
        adam_ours.apply(tape.gradient(loss, ours.trainable_variables), ours.trainable_variables)
        return loss

    def step_keras(images, labels):
        with tf.GradientTape() as tape:
            loss = keras_loss(labels, theirs(images, training=True))
        adam_keras.apply_gradients(zip(tape.gradient(loss, theirs.trainable_weights), theirs.trainable_weights))
        return loss

    for i in range(5):
        images, labels = _batch(10 + i)
        np.testing.assert_allclose(step_ours(images, labels).numpy(), step_keras(images, labels).numpy(), rtol=1e-5)
    for ov, kv in pairs:
        # measured: at most 1.4e-6 apart (float32 rounding amplified by Adam's g / sqrt(v) for tiny g)
        np.testing.assert_allclose(ov.numpy(), kv.numpy(), rtol=1e-5, atol=1e-5, err_msg=ov.name)
    images, _ = _batch(99)
    np.testing.assert_allclose(ours(images).numpy(), theirs(images, training=False).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours.predict(images).numpy(), tf.nn.softmax(theirs(images)).numpy(), atol=1e-5)
