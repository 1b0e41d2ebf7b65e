"""DepthwiseConv2D, the recipe's proof (a layer added in core/layers.py alone): forward and the hand-written
backward pass against keras.layers.DepthwiseConv2D, against the formula written out, against finite differences,
and in a model (summary, backward formulas, the by-hand step, mixed precision)."""
import numpy as np
import pytest
import tensorflow as tf

keras = pytest.importorskip("keras")

from core import backprop, layers, losses  # noqa: E402
from core.precision import mixed_gradients  # noqa: E402
from core.runner import tape_gradients  # noqa: E402
from test_backprop import build, check_against_tape, check_finite_differences, inputs  # noqa: E402

RTOL = ATOL = 1e-6


def _twins(kernel_size, strides, padding, depth_multiplier, activation, shape):
    """Our layer and Keras's, built for `shape`, with the same random weights (bias != 0)."""
    ours = layers.DepthwiseConv2D(kernel_size, strides=strides, padding=padding, depth_multiplier=depth_multiplier,
                                  activation=activation)
    theirs = keras.layers.DepthwiseConv2D(kernel_size, strides=strides, padding=padding,
                                          depth_multiplier=depth_multiplier, activation=activation)
    ours.build(shape)
    theirs.build(shape)
    rng = np.random.default_rng(7)
    w = (rng.standard_normal(ours.w.shape) / np.sqrt(np.prod(ours.w.shape[:2]))).astype(np.float32)
    b = rng.standard_normal(ours.b.shape).astype(np.float32)
    ours.w.assign(w)
    ours.b.assign(b)
    theirs.kernel.assign(w)
    theirs.bias.assign(b)
    return ours, theirs


@pytest.mark.parametrize("depth_multiplier", [1, 2])
@pytest.mark.parametrize("strides", [1, 2])
@pytest.mark.parametrize("padding,kernel_size,activation", [("same", (4, 3), "relu"), ("valid", 3, None)])
def test_depthwise_conv2d_forward_and_by_hand_backward_match_keras(padding, kernel_size, activation, strides,
                                                                    depth_multiplier):
    """y, and dx, dw, db from layer.backward (no tape on our side) equal Keras's forward and its tape's gradients
    of L = sum(y * r); on 7x9 inputs 'same' pads 4x3 windows unevenly (the extra row at the bottom)."""
    shape = (3, 7, 9, 2)
    ours, theirs = _twins(kernel_size, strides, padding, depth_multiplier, activation, shape)
    x = tf.constant(np.random.default_rng(1).standard_normal(shape).astype(np.float32))
    y, cache = ours.forward_with_cache(x)
    r = tf.constant(np.random.default_rng(3).standard_normal(y.shape).astype(np.float32))
    with tf.GradientTape() as tape:
        tape.watch(x)
        expected = theirs(x)
        loss = tf.reduce_sum(expected * r)
    dx_keras, dw_keras, db_keras = tape.gradient(loss, [x, theirs.kernel.value, theirs.bias.value])
    dx, grads = ours.backward(r, cache)

    assert y.shape == expected.shape and ours.output_shape(shape) == (None,) + tuple(expected.shape[1:])
    assert y.shape[-1] == 2 * depth_multiplier
    np.testing.assert_allclose(y, expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(ours(x), expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(dx, dx_keras, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(grads["w"], dw_keras, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(grads["b"], db_keras, rtol=RTOL, atol=ATOL)


def test_depthwise_conv2d_equals_the_formula_written_out():
    """y[n, i, j, c*m + k] = sum_{di, dj} x_pad[n, i*s + di, j*s + dj, c] w[di, dj, c, k] + b[c*m + k], and its
    gradients, as loops in float64: stride 2, 'same', 4x3 kernel on 5x6, padding rows 1 top and 2 bottom, columns
    0 left and 1 right."""
    n, h, w, c, m, kh, kw, s = 2, 5, 6, 3, 2, 4, 3, 2
    layer = build(layers.DepthwiseConv2D((kh, kw), strides=s, padding="same", depth_multiplier=m), (n, h, w, c),
                  tf.float64)
    x = inputs((n, h, w, c), tf.float64)
    y, cache = layer.forward_with_cache(x)
    dy = inputs(y.shape, tf.float64, seed=2).numpy()
    dx, grads = layer.backward(tf.constant(dy), cache)

    (top, bottom), (left, right) = layer.padding_amounts((None, h, w, c))
    assert (top, bottom, left, right) == (1, 2, 0, 1)
    ho, wo = -(-h // s), -(-w // s)
    x_pad = np.zeros((n, h + top + bottom, w + left + right, c))
    x_pad[:, top:top + h, left:left + w, :] = x.numpy()
    kernel, bias = layer.w.numpy(), layer.b.numpy()
    y_sum = np.zeros((n, ho, wo, c, m))
    dw = np.zeros_like(kernel)
    dx_pad = np.zeros_like(x_pad)
    for b in range(n):
        for i in range(ho):
            for j in range(wo):
                for di in range(kh):
                    for dj in range(kw):
                        for ch in range(c):
                            for k in range(m):
                                y_sum[b, i, j, ch, k] += x_pad[b, i * s + di, j * s + dj, ch] * kernel[di, dj, ch, k]
                                dw[di, dj, ch, k] += x_pad[b, i * s + di, j * s + dj, ch] * dy[b, i, j, ch * m + k]
                                dx_pad[b, i * s + di, j * s + dj, ch] += dy[b, i, j, ch * m + k] * kernel[di, dj, ch, k]
    y_sum = y_sum.reshape(n, ho, wo, c * m) + bias  # channel c*m + k
    np.testing.assert_allclose(y, y_sum, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grads["w"], dw, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grads["b"], dy.sum(axis=(0, 1, 2)), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, dx_pad[:, top:top + h, left:left + w, :], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kwargs", [dict(kernel_size=(3, 2), strides=2, depth_multiplier=2, activation="tanh"),
                                    dict(kernel_size=2, padding="valid", use_bias=False)], ids=str)
def test_depthwise_conv2d_backward_equals_the_tape_and_finite_differences(kwargs):
    for dtype in (tf.float32, tf.float64):
        layer = build(layers.DepthwiseConv2D(**kwargs), (2, 5, 4, 2), dtype)
        check_against_tape(layer, inputs((2, 5, 4, 2), dtype), training=True)
    check_finite_differences(layer, inputs((2, 5, 4, 2), tf.float64), training=True)


def test_depthwise_conv2d_in_a_model_summary_by_hand_step_and_mixed_precision():
    tf.random.set_seed(0)
    model = layers.Sequential([layers.DepthwiseConv2D(3, strides=2, depth_multiplier=2, activation="relu"),
                               layers.Flatten(), layers.Dense(3)])
    model.build((None, 6, 6, 2))
    keras_model = keras.Sequential([keras.Input((6, 6, 2)),
                                    keras.layers.DepthwiseConv2D(3, 2, padding="same", depth_multiplier=2),
                                    keras.layers.Flatten(), keras.layers.Dense(3)])
    assert model.count_params()[0] == keras_model.count_params() == 3 * 3 * 2 * 2 + 4 + 3 * 3 * 4 * 3 + 3
    rows = {line.split()[0]: line for line in model.summary(print_fn=lambda line: None).splitlines()}
    assert rows["depthwise_conv2d"].split()[1:4] == ["(DepthwiseConv2D)", "[N,3,3,4]", "40"]
    assert rows["depthwise_conv2d"].endswith(
        "y = relu(depthwise_conv2d(x[N,6,6,2], w[3,3,2,2], stride 2, same) + b[4])")
    text = backprop.summary(model, print_fn=lambda line: None)
    assert ("backward: dz[N,3,3,4] = dy * [y > 0]; dw[3,3,2,2] = correlate_per_channel(x_pad, dz); "
            "db[4] = sum_N,H',W' dz; dx[N,6,6,2] = depthwise_conv2d_transpose(dz[N,3,3,4], w, stride 2, same)") in text

    rng = np.random.default_rng(0)
    images = tf.constant(rng.random((8, 6, 6, 2)), tf.float32)
    labels = tf.constant(rng.integers(0, 3, 8), tf.int32)
    variables = model.trainable_variables
    loss, _, tape = tape_gradients(model, losses.softmax_cross_entropy, images, labels, variables)
    by_hand_loss, _, by_hand = backprop.gradients(model, losses.softmax_cross_entropy, images, labels, variables)
    assert float(by_hand_loss) == float(loss)
    for g, expected in zip(by_hand, tape):
        np.testing.assert_allclose(g, expected, rtol=1e-5, atol=1e-7)
    _, _, mixed = mixed_gradients(tf.bfloat16)(model, losses.softmax_cross_entropy, images, labels, variables)
    for g, expected in zip(mixed, tape):
        assert g.dtype == tf.float32
        assert np.linalg.norm(g - expected) <= 0.1 * np.linalg.norm(expected)


def test_depthwise_conv2d_errors_name_the_layer():
    with pytest.raises(ValueError, match=r"DepthwiseConv2D 'depthwise_conv2d': depth_multiplier must be a positive "
                                         r"int, got 0"):
        layers.DepthwiseConv2D(3, depth_multiplier=0)
    with pytest.raises(ValueError, match=r"DepthwiseConv2D 'depthwise_conv2d': input \[N,2,2,1\] is smaller than "
                                         r"the 3x3 window"):
        layers.DepthwiseConv2D(3, padding="valid")(tf.zeros([1, 2, 2, 1]))
