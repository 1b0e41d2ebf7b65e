"""Every fast path equals its formula: the fused kernels (FusedBatchNormV3, tf.nn.bias_add, tf.nn.relu) and Conv2D's
input gradient as one stride-1 convolution (core/subpixel.py) against the layers' formula paths (fused=False) on the same weights and inputs, forward, gradients (input and every variable)
and moving statistics, in training and inference, in float32 to float32 rounding and with bfloat16 inputs within
bfloat16's precision; a run with the fast paths on resumes bit-identically."""
import numpy as np
import pytest
import tensorflow as tf

from core import activations, backprop, subpixel
from core.layers import Activation, BatchNorm, Conv2D, Dense, Flatten, Sequential
from core.losses import softmax_cross_entropy
from core.optimizers import Adam

EPS32 = np.finfo(np.float32).eps


def assert_rounding_close(fast, formula, ulps=16):
    """|fast - formula| <= ulps float32 roundings of the tensor's largest value, element by element: the two
    compute the same sums in different orders."""
    fast, formula = np.asarray(fast, np.float64), np.asarray(formula, np.float64)
    assert fast.shape == formula.shape
    bound = ulps * EPS32 * max(np.max(np.abs(formula)), 1e-30)
    assert np.max(np.abs(fast - formula)) <= bound, f"off by {np.max(np.abs(fast - formula)):.3g} > {bound:.3g}"


def run(layer, x, training, weights):
    """(y, dL/dx, {variable: dL/dvariable}) for L = sum(y * r), r fixed, with `weights` copied in first."""
    layer.build(x.shape)
    for variable in layer.variables:
        variable.assign(weights[variable.name.split("/")[-1].split(":")[0]])
    r = tf.constant(np.random.default_rng(5).standard_normal(x.shape[:1] + layer.output_shape(x.shape)[1:]),
                    tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=training)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) * r)
    names = [v.name.split("/")[-1].split(":")[0] for v in layer.trainable_variables]
    gradients = tape.gradient(loss, [x] + list(layer.trainable_variables))
    return y, gradients[0], dict(zip(names, gradients[1:]))


def batch_norm_weights(c, seed=1):
    rng = np.random.default_rng(seed)
    return {"gamma": rng.normal(1.0, 0.3, c).astype(np.float32), "beta": rng.normal(0.0, 0.5, c).astype(np.float32),
            "moving_mean": rng.normal(0.0, 1.0, c).astype(np.float32),
            "moving_variance": (np.abs(rng.normal(1.0, 0.5, c)) + 0.2).astype(np.float32)}


@pytest.mark.parametrize("shape", [(16, 5, 4, 6), (32, 7)], ids=["NHWC", "NC"])
@pytest.mark.parametrize("center,scale", [(True, True), (True, False)])
def test_fused_batch_norm_equals_the_formula_forward_gradients_and_moving_statistics(shape, center, scale):
    """Three training steps then inference: y, dL/dx, dL/dgamma, dL/dbeta and the moving statistics ([N, C] runs
    the formula on both paths)."""
    weights = batch_norm_weights(shape[-1])
    layers = {fused: BatchNorm(momentum=0.9, center=center, scale=scale, fused=fused) for fused in (True, False)}
    for step in range(3):
        x = tf.constant(np.random.default_rng(step).normal(step, 1.0 + step, shape), tf.float32)
        out = {fused: run(layer, x, True, weights) for fused, layer in layers.items()}
        for fast, formula in zip(out[True][:2], out[False][:2]):
            assert_rounding_close(fast, formula)
        assert sorted(out[True][2]) == sorted(out[False][2]) == sorted(
            name for name, on in (("gamma", scale), ("beta", center)) if on)
        for name in out[True][2]:
            assert_rounding_close(out[True][2][name], out[False][2][name])
        for name in ("moving_mean", "moving_variance"):
            fast, formula = (getattr(layers[fused], name).numpy() for fused in (True, False))
            assert_rounding_close(fast, formula, ulps=4)
            assert not np.array_equal(fast, weights[name])  # they moved
            weights[name] = formula  # the next step starts both from the same statistics
    x = tf.constant(np.random.default_rng(9).normal(0.5, 2.0, shape), tf.float32)
    out = {fused: run(layer, x, False, weights) for fused, layer in layers.items()}
    for fast, formula in zip(out[True][:2], out[False][:2]):
        assert_rounding_close(fast, formula)
    for name in out[True][2]:
        assert_rounding_close(out[True][2][name], out[False][2][name])
    for name in ("moving_mean", "moving_variance"):  # inference changes nothing
        np.testing.assert_array_equal(getattr(layers[True], name).numpy(), weights[name])


def test_fused_batch_norm_keeps_kerass_moving_variance_the_biased_one():
    """The kernel's batch variance divides by n - 1; the moving average must get the one dividing by n."""
    x = np.random.default_rng(0).normal(3.0, 2.0, (4, 3, 3, 2)).astype(np.float32)
    bn = BatchNorm(momentum=0.5)
    bn(x, training=True)
    np.testing.assert_allclose(bn.moving_variance.numpy(), 0.5 + 0.5 * x.astype(np.float64).var(axis=(0, 1, 2)),
                               rtol=1e-6)
    np.testing.assert_allclose(bn.moving_mean.numpy(), 0.5 * x.astype(np.float64).mean(axis=(0, 1, 2)), rtol=1e-6)


@pytest.mark.parametrize("channels", [6, 12, 24, 16],
                         ids=["cast_to_float32", "4_pixels_grouped", "2_pixels_grouped", "bfloat16_kernel"])
@pytest.mark.parametrize("training", [True, False])
def test_fused_batch_norm_takes_bfloat16_x_with_float32_statistics(training, channels):
    """bfloat16 x in, bfloat16 y out, float32 statistics; y and dL/dx within bfloat16's precision of the float32
    formula on the same (rounded) x, the moving statistics (accumulated in float32) to float32 rounding. 16
    channels run the bfloat16 kernel; 12 and 24 too in training, as 4 or 2 pixels' 48 channels; 6 (4 pixels wide,
    and 8 pixels would be needed) the float32 kernel between casts."""
    shape = (16, 5, 4, channels)
    weights = batch_norm_weights(shape[-1])
    x16 = tf.cast(tf.constant(np.random.default_rng(3).normal(1.0, 2.0, shape), tf.float32), tf.bfloat16)
    fast_layer, formula_layer = BatchNorm(fused=True), BatchNorm(fused=False)
    fast_layer.build(shape)
    assert fast_layer.mixed_input and not formula_layer.mixed_input
    fast_layer.dtype = tf.bfloat16  # as core.precision.compute_in sets it: the input is not cast up
    grouped, calls = fast_layer._fused_grouped, []
    fast_layer._fused_grouped = lambda x: calls.append(x.shape) or grouped(x)
    y, dx, grads = run(fast_layer, x16, training, weights)
    y32, dx32, grads32 = run(formula_layer, tf.cast(x16, tf.float32), training, weights)
    assert bool(calls) == (training and channels in (12, 24))
    assert y.dtype == dx.dtype == tf.bfloat16
    assert all(v.dtype == tf.float32 for v in fast_layer.variables)
    y, dx = (tf.cast(t, tf.float32).numpy() for t in (y, dx))
    np.testing.assert_allclose(y, y32.numpy(), atol=2 ** -8 * np.max(np.abs(y32)))
    np.testing.assert_allclose(dx, dx32.numpy(), atol=2 ** -7 * np.max(np.abs(dx32)))
    for name in grads32:  # sums of bfloat16 products: off by a fraction of the largest
        np.testing.assert_allclose(grads[name].numpy(), grads32[name].numpy(),
                                   atol=2 ** -7 * np.max(np.abs(grads32[name])))
    for name in ("moving_mean", "moving_variance"):
        assert_rounding_close(getattr(fast_layer, name).numpy(), getattr(formula_layer, name).numpy(), ulps=8)


def test_grouped_batch_norm_takes_an_x_of_unknown_batch_and_height():
    """A bfloat16 x [N, H, 4, 12] whose N and H are unknown when traced (a tf.function's signature) is grouped as a
    known shape is: the same y, dL/dx and moving statistics."""
    shape = (16, 5, 4, 12)
    x16 = tf.cast(tf.constant(np.random.default_rng(3).normal(1.0, 2.0, shape), tf.float32), tf.bfloat16)
    r = tf.constant(np.random.default_rng(5).standard_normal(shape), tf.float32)
    layers = []
    for _ in range(2):
        layer = BatchNorm()
        layer.build(shape)
        for variable in layer.variables:
            variable.assign(batch_norm_weights(12)[variable.name.split("/")[-1].split(":")[0]])
        layer.dtype = tf.bfloat16
        layers.append(layer)

    def forward_and_gradient(layer, x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(tf.cast(y, tf.float32) * r)
        return y, tape.gradient(loss, x)

    known = forward_and_gradient(layers[0], x16)
    unknown = tf.function(lambda x: forward_and_gradient(layers[1], x),
                          input_signature=[tf.TensorSpec([None, None, 4, 12], tf.bfloat16)])(x16)
    for a, b in zip(known, unknown):
        np.testing.assert_array_equal(tf.cast(a, tf.float32).numpy(), tf.cast(b, tf.float32).numpy())
    for name in ("moving_mean", "moving_variance"):
        np.testing.assert_array_equal(getattr(layers[0], name).numpy(), getattr(layers[1], name).numpy())


def test_a_grouped_batch_norm_and_the_relu_after_it_run_as_one_call_with_the_same_values(monkeypatch):
    """In bfloat16 training, Sequential runs each BatchNorm whose pixels are grouped (12 and 24 channels) and the
    ReLU after it as one call (BatchNorm.call_with_relu): the loss, every gradient and the moving statistics are
    bit-identical to the two layers called apart. 16 channels (no grouping) and inference run them apart."""
    from core.precision import compute_in

    def model():
        tf.random.set_seed(4)
        layers = []
        for filters, stride in ((12, 1), (24, 2), (16, 2)):
            layers += [Conv2D(filters, 3, strides=stride, padding="same", use_bias=False), BatchNorm(scale=False),
                       Activation("relu")]
        net = Sequential(layers + [Flatten(), Dense(10)])
        net.build((None, 8, 8, 1))
        return net

    x = tf.cast(tf.random.stateless_normal([16, 8, 8, 1], seed=[1, 2]), tf.bfloat16)
    labels = tf.constant(np.arange(16) % 10)
    merged = []
    call_with_relu = BatchNorm.call_with_relu
    monkeypatch.setattr(BatchNorm, "call_with_relu", lambda self, x: merged.append(x.shape[-1]) or call_with_relu(
        self, x))
    results = []
    for apart in (False, True):
        if apart:
            monkeypatch.setattr(BatchNorm, "merges_relu", lambda self, x, training: False)
        net = model()
        with tf.GradientTape() as tape:
            with compute_in(net, tf.bfloat16):
                logits = net(x, training=True)
            loss = softmax_cross_entropy(tf.cast(logits, tf.float32), labels)
        gradients = tape.gradient(loss, net.trainable_variables)
        with compute_in(net, tf.bfloat16):
            inference = net(x, training=False)
        results.append([loss, inference, *gradients, *[v for v in net.variables if "moving" in v.name]])
    assert merged == [12, 24]  # the 16-channel BatchNorm runs the kernel as it is, its ReLU merged by TensorFlow
    for a, b in zip(*results):
        assert tf.cast(a, tf.float32).numpy().tobytes() == tf.cast(b, tf.float32).numpy().tobytes()


def test_relu_kernel_is_the_formula_exactly_gradient_zero_at_zero():
    x = tf.constant([-2.0, -0.0, 0.0, 1e-30, 3.5, -1e-30])
    assert activations.kernel(activations.relu) is tf.nn.relu
    assert activations.kernel(activations.sigmoid) is activations.sigmoid  # no kernel: the formula
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        fast, formula = tf.nn.relu(x), activations.relu(x)
    np.testing.assert_array_equal(fast.numpy(), formula.numpy())
    np.testing.assert_array_equal(tape.gradient(fast, x).numpy(), [0, 0, 0, 1, 1, 0])
    np.testing.assert_array_equal(tape.gradient(formula, x).numpy(), [0, 0, 0, 1, 1, 0])


@pytest.mark.parametrize("channels,training,kernel", [(12, True, False), (16, True, True), (12, False, True)],
                         ids=["12_channels_training", "16_channels_training", "12_channels_inference"])
def test_relu_after_a_batch_norm_runs_the_formula_where_the_merged_kernel_would_be_onednns_reference(
        channels, training, kernel):
    """A float32 training BatchNorm with a channel count that is not a multiple of 8 is followed by relu's formula,
    which keeps TensorFlow from merging tf.nn.relu into it (oneDNN's reference kernel, 5x slower); elsewhere the
    relu kernel. Either way, y is the same."""
    x = tf.constant(np.random.default_rng(3).standard_normal((4, 5, 5, channels)), tf.float32)
    model = Sequential([BatchNorm(scale=False), Activation("relu")])
    model.build(x.shape)
    step = tf.function(lambda x: model(x, training=training))
    op_types = {op.type for op in step.get_concrete_function(x).graph.get_operations()}
    assert ("Relu" in op_types) is kernel
    y = step(x)
    normalized = model.layers[0](x, training=training)
    np.testing.assert_array_equal(y.numpy(), tf.nn.relu(normalized).numpy())


@pytest.mark.parametrize("make,shape", [
    (lambda fused: Dense(7, activation="relu", fused=fused), (9, 13)),
    (lambda fused: Conv2D(5, 6, strides=2, activation="relu", fused=fused), (3, 9, 7, 2)),
    (lambda fused: Conv2D(4, 3, activation=None, fused=fused), (2, 6, 6, 3)),
    (lambda fused: Activation("relu", fused=fused), (4, 11)),
], ids=["dense_relu", "conv_relu", "conv_linear", "activation"])
def test_bias_add_and_relu_kernels_equal_the_formula(make, shape):
    x = tf.constant(np.random.default_rng(2).standard_normal(shape), tf.float32)
    layer = make(True)
    layer.build(shape)
    rng = np.random.default_rng(4)
    weights = {v.name.split("/")[-1].split(":")[0]: rng.standard_normal(v.shape).astype(np.float32) * 0.3
               for v in layer.variables}
    for training in (True, False):
        fast = run(make(True), x, training, weights)
        formula = run(make(False), x, training, weights)
        np.testing.assert_array_equal(fast[0].numpy(), formula[0].numpy())  # one add, one max: identical
        assert_rounding_close(fast[1], formula[1])
        for name in formula[2]:
            assert_rounding_close(fast[2][name], formula[2][name])


GEOMETRIES = [  # x [N, H, W, C], kernel size, stride, padding
    ((2, 28, 28, 3), 6, 2, "SAME"),  # conv_bn's second layer
    ((2, 9, 7, 2), 6, 2, "SAME"),  # odd sizes: the last phase of a row is cropped
    ((2, 15, 15, 3), 5, 2, "SAME"),  # a kernel padded with a zero tap to 6x6
    ((2, 13, 11, 2), 5, 2, "VALID"),
    ((2, 29, 29, 2), 3, 3, "SAME"),
    ((2, 16, 16, 2), 4, 2, "VALID"),
    ((2, 10, 10, 2), 3, 1, "SAME"),  # stride 1: the reversed kernel, one phase
]


@pytest.mark.parametrize("x_shape,k,s,padding", GEOMETRIES, ids=[f"{g[0][1]}x{g[0][2]}_k{g[1]}_s{g[2]}_{g[3]}"
                                                                   for g in GEOMETRIES])
def test_a_strided_convolutions_input_gradient_as_one_stride_1_convolution_is_conv2d_transpose(x_shape, k, s, padding):
    """subpixel.input_gradient against TensorFlow's conv2d_transpose: the same products summed in another order, so
    equal to float64 rounding in float64, and within bfloat16's precision of the float32 kernel in bfloat16."""
    rng = np.random.default_rng(k * 10 + s)
    w = rng.standard_normal((k, k, x_shape[-1], 5))
    z_shape = tf.nn.conv2d(tf.zeros(x_shape, tf.float64), w, s, padding).shape
    dz = rng.standard_normal(z_shape)
    expected = tf.nn.conv2d_transpose(dz, w, x_shape, s, padding).numpy()
    got = subpixel.input_gradient(tf.constant(dz), tf.constant(w), x_shape[1:3], s, padding).numpy()
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-13 * np.max(np.abs(expected)))
    dz16, w16 = tf.cast(dz, tf.bfloat16), tf.cast(w, tf.bfloat16)
    got16 = subpixel.input_gradient(dz16, w16, x_shape[1:3], s, padding)
    expected32 = tf.nn.conv2d_transpose(tf.cast(dz16, tf.float32), tf.cast(w16, tf.float32), x_shape, s, padding)
    assert got16.dtype == tf.bfloat16
    np.testing.assert_allclose(tf.cast(got16, tf.float32).numpy(), expected32.numpy(), rtol=0,
                               atol=2 ** -7 * np.max(np.abs(expected32.numpy())))


@pytest.mark.parametrize("k,s,fused,fast", [(6, 2, True, True), (6, 2, False, False), (3, 1, True, False),
                                            (4, 2, True, False), (5, 2, True, False), (9, 3, True, True)])
def test_conv2d_takes_the_one_convolution_input_gradient_where_it_measured_faster(k, s, fused, fast):
    """The fast path replaces TensorFlow's backward-data kernel (Conv2DBackpropInput) by subpixel.input_gradient
    where the kernel is at least three whole strides (subpixel.pays); the formula path and other geometries keep
    the kernel. The forward convolution and the kernel gradient are TensorFlow's either way."""
    layer = Conv2D(4, k, strides=s, use_bias=False, fused=fused)
    x = tf.zeros((2, 18, 18, 3))
    layer.build(x.shape)

    @tf.function
    def input_gradient(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            z = layer(x)
        return tape.gradient(z, [x, layer.w])

    op_types = {op.type for op in input_gradient.get_concrete_function(x).graph.get_operations()}
    assert subpixel.pays((k, k), (s, s)) is (k % s == 0 and k // s >= 3 and s > 1)
    assert ("Conv2DBackpropInput" not in op_types) is fast
    assert "DepthToSpace" in op_types if fast else "DepthToSpace" not in op_types
    assert "Conv2DBackpropFilter" in op_types


def small_conv_bn(fused, seed=1):
    tf.random.set_seed(seed)
    return Sequential([Conv2D(4, 3, use_bias=False, fused=fused), BatchNorm(scale=False, fused=fused),
                       Activation("relu", fused=fused), Conv2D(6, 6, strides=2, use_bias=False, fused=fused),
                       BatchNorm(scale=False, fused=fused), Activation("relu", fused=fused), Flatten(),
                       Dense(8, use_bias=False, fused=fused), BatchNorm(scale=False, fused=fused),
                       Activation("relu", fused=fused), Dense(4, fused=fused)])


def test_a_conv_bn_model_on_the_fast_paths_has_the_formulas_loss_and_gradients_and_the_by_hand_ones():
    rng = np.random.default_rng(0)
    images = tf.constant(rng.random((16, 10, 10, 1)), tf.float32)
    labels = tf.constant(rng.integers(0, 4, 16), tf.int32)
    results = {}
    for fused in (True, False):
        model = small_conv_bn(fused)
        model.build(images.shape)
        with tf.GradientTape() as tape:
            loss = softmax_cross_entropy(model(images, training=True), labels)
        results[fused] = (loss, tape.gradient(loss, model.trainable_variables))
    model = small_conv_bn(True)
    model.build(images.shape)
    by_hand = backprop.gradients(model, softmax_cross_entropy, images, labels, model.trainable_variables)
    assert_rounding_close(results[True][0], results[False][0], ulps=4)
    assert_rounding_close(by_hand[0], results[False][0], ulps=4)
    for fast, formula in zip(*(results[fused][1] for fused in (True, False))):
        assert_rounding_close(fast, formula, ulps=64)  # three layers of rounding differences compound
    for hand, formula in zip(by_hand[2], results[False][1]):
        assert_rounding_close(hand, formula, ulps=64)


def conv_bn_steps(seed):
    """(model, optimizer, step): a small conv + fused BatchNorm + relu model and its compiled Adam step."""
    tf.random.set_seed(seed)
    model = Sequential([Conv2D(4, 6, strides=2, use_bias=False), BatchNorm(scale=False), Activation("relu"),
                        Flatten(), Dense(8, activation="relu"), BatchNorm(), Dense(4)])
    model.build((None, 8, 8, 1))
    optimizer = Adam(0.01)
    optimizer.build(model.trainable_variables)

    @tf.function
    def step(images, labels):
        with tf.GradientTape() as tape:
            loss = softmax_cross_entropy(model(images, training=True), labels)
        optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)

    return model, optimizer, step


def test_a_run_on_the_fast_paths_resumes_bit_identically(tmp_path):
    """Six steps straight against three steps, a checkpoint, and three steps of a model built with another seed:
    every variable (weights, moving statistics, Adam's slots and step) bit-identical."""
    rng = np.random.default_rng(0)
    batches = [(tf.constant(rng.random((16, 8, 8, 1)), tf.float32), tf.constant(rng.integers(0, 4, 16), tf.int32))
               for _ in range(6)]
    model, optimizer, step = conv_bn_steps(seed=1)
    for images, labels in batches[:3]:
        step(images, labels)
    path = tf.train.Checkpoint(model=model, optimizer=optimizer).write(str(tmp_path / "ckpt"))
    for images, labels in batches[3:]:
        step(images, labels)
    resumed, resumed_optimizer, resumed_step = conv_bn_steps(seed=7)
    tf.train.Checkpoint(model=resumed, optimizer=resumed_optimizer).read(path).assert_consumed()
    for images, labels in batches[3:]:
        resumed_step(images, labels)
    assert len(model.variables) == 12 and int(resumed_optimizer.step.numpy()) == 6
    for a, b in zip(model.variables + optimizer.variables, resumed.variables + resumed_optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.name)
