"""Every hand-written layer against the Keras 3 layer of the same name: same weights in, same outputs and the
same gradients (w.r.t. the input and every variable) out, in training and in inference."""
import numpy as np
import pytest
import tensorflow as tf

keras = pytest.importorskip("keras")

from core import initializers, layers, losses, optimizers  # noqa: E402
from core.module import Layer  # noqa: E402

RTOL = ATOL = 1e-6


def _keras_weights(keras_layer):
    """Keras layer variables by our names."""
    names = {"kernel": "w", "bias": "b", "gamma": "gamma", "beta": "beta",
             "moving_mean": "moving_mean", "moving_variance": "moving_variance"}
    return {names[v.path.split("/")[-1]]: v for v in keras_layer.weights}


def _ours_weights(layer):
    return {v.name.split("/")[-1].split(":")[0]: v for v in layer.variables}


def _copy_weights(ours, theirs):
    """Randomise our variables (so that gamma != 1, bias != 0, ...) and copy them into the Keras layer."""
    rng = np.random.default_rng(7)
    ours_vars, keras_vars = _ours_weights(ours), _keras_weights(theirs)
    assert sorted(ours_vars) == sorted(keras_vars)
    for name, v in ours_vars.items():
        value = rng.standard_normal(v.shape).astype(np.float32)
        if name == "w":  # Glorot-like scale, so activations are not all saturated
            value /= np.sqrt(np.prod(v.shape[:-1]))
        if name == "moving_variance":
            value = np.abs(value) + 0.5
        v.assign(value)
        keras_vars[name].assign(value)
    return ours_vars, keras_vars


def assert_same_layer(ours, theirs, x, training):
    """Forward output and gradients of sum(y * r) w.r.t. x and every trainable variable agree."""
    x = tf.constant(x)
    ours.build(x.shape)
    if not theirs.built:
        theirs.build(x.shape)
    ours_vars, keras_vars = _copy_weights(ours, theirs)
    trainable = sorted(v.name.split("/")[-1].split(":")[0] for v in ours.trainable_variables)
    y_ours_shape = ours.output_shape(x.shape)
    r = tf.constant(np.random.default_rng(3).standard_normal((x.shape[0],) + y_ours_shape[1:]).astype(np.float32))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y1 = ours(x, training=training)
        y2 = theirs(x, training=training)
        l1 = tf.reduce_sum(y1 * r)
        l2 = tf.reduce_sum(y2 * r)
    assert y1.shape == y2.shape
    assert tuple(y1.shape[1:]) == y_ours_shape[1:]
    np.testing.assert_allclose(y1.numpy(), y2.numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(tape.gradient(l1, x).numpy(), tape.gradient(l2, x).numpy(), rtol=RTOL, atol=ATOL)
    for name in trainable:
        g1 = tape.gradient(l1, ours_vars[name])
        g2 = tape.gradient(l2, keras_vars[name].value)
        np.testing.assert_allclose(g1.numpy(), g2.numpy(), rtol=RTOL, atol=ATOL, err_msg=name)
    for name, v in ours_vars.items():
        np.testing.assert_allclose(v.numpy(), keras_vars[name].numpy(), rtol=RTOL, atol=ATOL, err_msg=name)
    return y1


def _images(n, h, w, c, seed=0):
    return np.random.default_rng(seed).standard_normal((n, h, w, c)).astype(np.float32)


@pytest.mark.parametrize("activation", [None, "relu", "sigmoid", "tanh"])
@pytest.mark.parametrize("use_bias", [True, False])
def test_dense_matches_keras(activation, use_bias):
    x = np.random.default_rng(1).standard_normal((6, 13)).astype(np.float32)
    ours = layers.Dense(5, activation=activation, use_bias=use_bias)
    theirs = keras.layers.Dense(5, activation=activation, use_bias=use_bias)
    for training in (False, True):
        assert_same_layer(ours, theirs, x, training)


@pytest.mark.parametrize("kernel_size,strides,padding,hw", [
    (3, 1, "same", (9, 7)),
    (6, 2, "same", (9, 7)),   # odd sizes: same padding is asymmetric, extra row/column bottom/right
    (5, 2, "same", (10, 11)),
    (3, 2, "valid", (9, 7)),
    ((2, 3), (1, 2), "valid", (8, 9)),
])
def test_conv2d_matches_keras(kernel_size, strides, padding, hw):
    x = _images(3, hw[0], hw[1], 2)
    ours = layers.Conv2D(4, kernel_size, strides=strides, padding=padding, activation="relu")
    theirs = keras.layers.Conv2D(4, kernel_size, strides=strides, padding=padding, activation="relu")
    assert_same_layer(ours, theirs, x, training=True)


def test_conv2d_same_padding_puts_the_extra_row_bottom_right():
    """A 2x2 stride-2 'same' conv on a 3x3 input needs one row/column of padding: TF puts it bottom/right,
    so output [0, 0] sees x[0:2, 0:2] and output [1, 1] sees x[2, 2] plus zeros."""
    x = tf.reshape(tf.range(1.0, 10.0), [1, 3, 3, 1])
    conv = layers.Conv2D(1, 2, strides=2, padding="same", use_bias=False)
    conv.build(x.shape)
    conv.w.assign(tf.ones([2, 2, 1, 1]))
    y = conv(x)[0, :, :, 0].numpy()
    np.testing.assert_array_equal(y, [[1 + 2 + 4 + 5, 3 + 6], [7 + 8, 9]])
    assert conv.output_shape((None, 3, 3, 1)) == (None, 2, 2, 1)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "formula"])
@pytest.mark.parametrize("center,scale", [(True, True), (True, False), (False, True), (False, False)])
def test_batchnorm_dense_rank_matches_keras(center, scale, fused):
    x = (np.random.default_rng(2).standard_normal((8, 5)) * 3 + 1).astype(np.float32)
    ours = layers.BatchNorm(center=center, scale=scale, fused=fused)
    theirs = keras.layers.BatchNormalization(center=center, scale=scale)
    assert_same_layer(ours, theirs, x, training=True)
    assert_same_layer(ours, theirs, x, training=False)


def test_batchnorm_variables_follow_center_and_scale():
    for center, scale, trainable in [(True, True, {"gamma", "beta"}), (True, False, {"beta"}),
                                     (False, True, {"gamma"}), (False, False, set())]:
        bn = layers.BatchNorm(center=center, scale=scale)
        bn.build((None, 4))
        assert {v.name.split("/")[-1][:-2] for v in bn.trainable_variables} == trainable
        assert {v.name.split("/")[-1][:-2] for v in bn.variables} - trainable == {"moving_mean", "moving_variance"}
        assert not bn.moving_mean.trainable and not bn.moving_variance.trainable


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "formula"])
def test_batchnorm_moving_statistics_match_keras_after_several_steps(fused):
    """[N, H, W, C]: statistics over N, H, W; moving = moving * momentum + batch * (1 - momentum)."""
    ours = layers.BatchNorm(momentum=0.9, center=True, scale=False, fused=fused)
    theirs = keras.layers.BatchNormalization(momentum=0.9, center=True, scale=False)
    shape = (4, 5, 3, 6)
    ours.build(shape)
    theirs.build(shape)
    _copy_weights(ours, theirs)
    expected_mean = ours.moving_mean.numpy().astype(np.float64)
    expected_var = ours.moving_variance.numpy().astype(np.float64)
    for step in range(6):
        x = _images(*shape, seed=10 + step) * (step + 1) + step
        y1 = ours(x, training=True)
        y2 = theirs(x, training=True)
        np.testing.assert_allclose(y1.numpy(), y2.numpy(), rtol=RTOL, atol=ATOL)
        batch_mean = x.astype(np.float64).mean(axis=(0, 1, 2))
        batch_var = x.astype(np.float64).var(axis=(0, 1, 2))  # biased: divides by the count
        expected_mean = expected_mean * 0.9 + batch_mean * 0.1
        expected_var = expected_var * 0.9 + batch_var * 0.1
    np.testing.assert_allclose(ours.moving_mean.numpy(), theirs.moving_mean.numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(ours.moving_variance.numpy(), theirs.moving_variance.numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(ours.moving_mean.numpy(), expected_mean, rtol=1e-5)
    np.testing.assert_allclose(ours.moving_variance.numpy(), expected_var, rtol=1e-5)

    before = [v.numpy().copy() for v in ours.variables]
    x = _images(*shape, seed=99)
    y1 = ours(x, training=False)
    np.testing.assert_allclose(y1.numpy(), theirs(x, training=False).numpy(), rtol=RTOL, atol=ATOL)
    for b, v in zip(before, ours.variables):
        np.testing.assert_array_equal(b, v.numpy())
    beta = ours.beta.numpy()
    expected = (x - ours.moving_mean.numpy()) / np.sqrt(ours.moving_variance.numpy() + 1e-3) + beta
    np.testing.assert_allclose(y1.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_batchnorm_training_normalises_the_batch():
    bn = layers.BatchNorm()
    x = _images(16, 3, 3, 4) * 5 + 2
    y = bn(x, training=True).numpy()
    np.testing.assert_allclose(y.mean(axis=(0, 1, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(y.var(axis=(0, 1, 2)), 25 / (25 + 1e-3), rtol=1e-4)


@pytest.mark.parametrize("pool,strides,padding,hw", [(2, None, "valid", (8, 6)), (2, None, "valid", (7, 9)),
                                                    (3, 2, "same", (7, 8))])
def test_maxpool_matches_keras(pool, strides, padding, hw):
    x = _images(2, hw[0], hw[1], 3)
    assert_same_layer(layers.MaxPool2D(pool, strides, padding),
                      keras.layers.MaxPooling2D(pool, strides, padding), x, training=True)


def test_global_average_pooling_flatten_reshape_match_keras():
    x = _images(3, 5, 4, 6)
    assert_same_layer(layers.GlobalAveragePooling2D(), keras.layers.GlobalAveragePooling2D(), x, training=True)
    assert_same_layer(layers.Flatten(), keras.layers.Flatten(), x, training=True)
    assert_same_layer(layers.Reshape((10, 12)), keras.layers.Reshape((10, 12)), x, training=True)
    y = assert_same_layer(layers.Reshape((-1, 3)), keras.layers.Reshape((-1, 3)), x, training=True)
    assert y.shape == (3, 40, 3)


@pytest.mark.parametrize("name", ["relu", "sigmoid", "tanh", "softmax"])
def test_activation_layer_matches_keras(name):
    x = (np.random.default_rng(4).standard_normal((4, 7)) * 4).astype(np.float32)
    assert_same_layer(layers.Activation(name), keras.layers.Activation(name), x, training=True)


def test_dropout_scaling_keep_rate_and_inference_identity():
    rate = 0.3
    dropout = layers.Dropout(rate, seed=1)
    x = tf.ones([200, 500])
    y = dropout(x, training=True).numpy()
    kept = y != 0
    np.testing.assert_allclose(y[kept], 1 / (1 - rate), rtol=1e-6)
    keep_rate = kept.mean()
    # 100,000 Bernoulli(0.7) draws: std of the mean is about 0.0014; 5 sigma
    assert abs(keep_rate - (1 - rate)) < 0.0075
    assert abs(y.mean() - 1.0) < 0.011  # E[y] = x: no rescaling needed at inference
    np.testing.assert_array_equal(dropout(x, training=False).numpy(), x.numpy())
    np.testing.assert_array_equal(layers.Dropout(0.0)(x, training=True).numpy(), x.numpy())
    assert dropout.variables == ()


def test_dropout_same_seed_same_mask_and_global_seed_determinism():
    x = tf.ones([8, 50])
    a, b = layers.Dropout(0.5, seed=42), layers.Dropout(0.5, seed=42)
    np.testing.assert_array_equal(a(x, training=True).numpy(), b(x, training=True).numpy())
    assert not np.array_equal(a(x, training=True).numpy(), layers.Dropout(0.5, seed=43)(x, training=True).numpy())

    def masks():
        tf.random.set_seed(123)
        d = layers.Dropout(0.5)
        return d(x, training=True).numpy(), d(x, training=True).numpy()

    first, second = masks(), masks()
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert not np.array_equal(first[0], first[1])


def test_dropout_inside_tf_function_draws_new_masks():
    d = layers.Dropout(0.5, seed=5)
    f = tf.function(lambda x: d(x, training=True))
    x = tf.ones([4, 64])
    assert not np.array_equal(f(x).numpy(), f(x).numpy())


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5, "0.5", None])
def test_dropout_rejects_bad_rate(rate):
    with pytest.raises(ValueError, match=r"Dropout 'dropout': rate must be a number in \[0, 1\)"):
        layers.Dropout(rate)


def test_glorot_uniform_and_truncated_normal_statistics():
    tf.random.set_seed(0)
    dense = layers.Dense(400)
    dense.build((None, 600))
    limit = np.sqrt(6 / (600 + 400))
    w = dense.w.numpy()
    assert np.abs(w).max() <= limit
    np.testing.assert_allclose(w.std(), limit / np.sqrt(3), rtol=0.01)
    np.testing.assert_array_equal(dense.b.numpy(), 0)

    conv = layers.Conv2D(32, 5, w_init=initializers.TruncatedNormal(stddev=0.1),
                         b_init=initializers.Constant(0.1))
    conv.build((None, 28, 28, 16))
    w = conv.w.numpy()
    assert w.shape == (5, 5, 16, 32)
    assert np.abs(w).max() <= 0.2
    np.testing.assert_allclose(w.std(), 0.1 * 0.8796, rtol=0.02)  # std of N(0, 1) truncated at +-2
    np.testing.assert_allclose(conv.b.numpy(), 0.1)

    conv = layers.Conv2D(32, 5)
    conv.build((None, 28, 28, 16))
    limit = np.sqrt(6 / (5 * 5 * 16 + 5 * 5 * 32))  # fan_in = kh*kw*in, fan_out = kh*kw*filters
    np.testing.assert_allclose(np.abs(conv.w.numpy()).max(), limit, rtol=0.01)


def test_same_global_seed_same_initial_weights():
    def weights():
        tf.random.set_seed(7)
        model = layers.Sequential([layers.Conv2D(4, 3), layers.Flatten(), layers.Dropout(0.2), layers.Dense(3)])
        model.build((None, 6, 6, 1))
        return [v.numpy() for v in model.variables]

    for a, b in zip(weights(), weights()):
        np.testing.assert_array_equal(a, b)


def test_variables_created_by_build_or_first_call_never_inside_later_traces():
    model = layers.Sequential([layers.Conv2D(3, 3), layers.BatchNorm(), layers.Flatten(), layers.Dropout(0.5),
                               layers.Dense(4)])
    assert model.variables == ()
    lazy = layers.Dense(2)
    lazy(tf.zeros([1, 3]))
    assert lazy.built and len(lazy.variables) == 2

    model.build((None, 5, 5, 1))
    count = len(model.variables)
    assert count == 2 + 4 + 2

    traces = []

    @tf.function
    def step(x, training):
        traces.append(training)
        return model(x, training=training)

    x = tf.zeros([2, 5, 5, 1])
    for training in (True, False, True, False):
        step(x, training)
    step(tf.zeros([3, 5, 5, 1]), True)  # a new batch size retraces: still no new variable
    assert len(model.variables) == count
    assert model.build((None, 5, 5, 1)) is None and len(model.variables) == count


def test_sequential_activations_predict_and_unique_names():
    tf.random.set_seed(1)
    model = layers.Sequential([layers.Flatten(), layers.Dense(8, activation="relu"), layers.Dense(3)])
    x = tf.random.uniform([5, 2, 2, 1])
    acts = model.activations(x)
    assert [name for name, _ in acts] == ["flatten", "dense", "dense_1"]
    assert [tuple(t.shape) for _, t in acts] == [(5, 4), (5, 8), (5, 3)]
    logits = model(x)
    np.testing.assert_array_equal(acts[-1][1].numpy(), logits.numpy())
    p = model.predict(x).numpy()
    np.testing.assert_allclose(p.sum(axis=1), 1, rtol=1e-6)
    np.testing.assert_allclose(p, tf.nn.softmax(logits).numpy(), rtol=1e-6)
    assert model.input_shape == (None, 2, 2, 1)


def test_summary_rows_formulas_and_totals():
    model = layers.Sequential([layers.Flatten(), layers.Dense(200, activation="relu"), layers.Dense(10)])
    model.build((None, 28, 28, 1))
    lines = []
    text = model.summary(print_fn=lines.append)
    assert "\n".join(lines) == text
    rows = {line.split()[0]: line for line in lines}
    assert rows["dense"].split()[1:4] == ["(Dense)", "[N,200]", "157,000"]
    assert rows["dense"].endswith("y = relu(x[N,784] @ w[784,200] + b[200])")
    assert rows["dense_1"].endswith("y = x[N,200] @ w[200,10] + b[10]")
    assert rows["flatten"].endswith("y = reshape(x[N,28,28,1], [N,784])")
    assert lines[-3:] == ["Total params: 159,010", "Trainable params: 159,010", "Non-trainable params: 0"]

    conv = layers.Conv2D(24, 6, strides=2, use_bias=False)
    assert conv.formula((None, 28, 28, 12)) == "y = conv2d(x[N,28,28,12], w[6,6,12,24], stride 2, same)"
    bn = layers.BatchNorm(scale=False)
    assert bn.formula((None, 14, 14, 24)) == "y = (x[N,14,14,24] - mean[24]) / sqrt(var[24] + 0.001) + beta[24]"
    assert layers.BatchNorm().formula((None, 3)) == "y = gamma[3] * (x[N,3] - mean[3]) / sqrt(var[3] + 0.001) + beta[3]"


def test_errors_name_the_layer_and_the_shapes():
    dense = layers.Dense(3)
    with pytest.raises(ValueError, match=r"Dense 'dense': expected input of rank 2 \[N,features\], got shape \[N,28,28,1\]"):
        dense(tf.zeros([2, 28, 28, 1]))
    dense(tf.zeros([2, 4]))
    with pytest.raises(ValueError, match=r"Dense 'dense' was built for input \[N,4\] but got \[N,5\]"):
        dense(tf.zeros([2, 5]))
    with pytest.raises(ValueError, match=r"Conv2D 'conv1': expected input of rank 4 \[N,height,width,channels\], "
                                         r"got shape \[N,784\]"):
        layers.Conv2D(4, 3, name="conv1")(tf.zeros([2, 784]))
    with pytest.raises(ValueError, match=r"Conv2D 'conv2d': unknown padding 'full'; expected 'same' or 'valid'"):
        layers.Conv2D(4, 3, padding="full")
    with pytest.raises(ValueError, match=r"MaxPool2D 'max_pool2d': unknown padding 'SAME_LOWER'"):
        layers.MaxPool2D(padding="SAME_LOWER")
    with pytest.raises(ValueError, match=r"Conv2D 'conv2d': input \[N,2,2,1\] is smaller than the 3x3 window"):
        layers.Conv2D(4, 3, padding="valid")(tf.zeros([1, 2, 2, 1]))
    with pytest.raises(ValueError, match=r"Reshape 'reshape': cannot reshape \[N,28,28,1\] \(784 values per "
                                         r"example\) to \[N,10,10\]"):
        layers.Reshape((10, 10))(tf.zeros([1, 28, 28, 1]))
    with pytest.raises(ValueError, match=r"unknown activation 'gelu2'"):
        layers.Dense(3, activation="gelu2")
    with pytest.raises(ValueError, match=r"Dense 'dense': w_init must be an initializer \(shape, dtype\) -> tensor "
                                         r"such as core.initializers.GlorotUniform\(\), got 'he'"):
        layers.Dense(3, w_init="he")
    with pytest.raises(ValueError, match=r"BatchNorm 'batch_norm': training must be a Python bool"):
        layers.BatchNorm()(tf.zeros([2, 3]), training=tf.constant(True))
    model = layers.Sequential([layers.Flatten(), layers.Dense(10)])
    with pytest.raises(ValueError, match=r"Sequential 'sequential' is not built"):
        model.count_params()
    model.build((None, 28, 28, 1))
    with pytest.raises(ValueError, match=r"Flatten 'flatten' was built for input \[N,28,28,1\] but got \[N,32,32,3\]"):
        model(tf.zeros([1, 32, 32, 3]))


class LayerNorm(Layer):
    """A layer core/ does not ship, in the two methods a new layer needs (the recipe of core/module.py):
    y = gamma * (x - mean) / sqrt(var + epsilon) + beta, mean and var over the last axis of each example,
    gamma [C] (init 1), beta [C] (init 0)."""

    def __init__(self, epsilon=1e-3, name=None):
        super().__init__(name=name)
        self.epsilon = epsilon

    def _create_variables(self, input_shape):
        self.gamma = tf.Variable(initializers.Ones()(input_shape[-1:], self.dtype), name="gamma")
        self.beta = tf.Variable(initializers.Zeros()(input_shape[-1:], self.dtype), name="beta")

    def _forward(self, x, training):
        mean, variance = tf.nn.moments(x, axes=[-1], keepdims=True)
        return self.gamma * (x - mean) / tf.sqrt(variance + self.epsilon) + self.beta


@pytest.mark.parametrize("shape", [(6, 9), (2, 5, 4, 7)])
def test_a_new_layer_in_two_methods_matches_keras_layer_normalization(shape):
    x = (np.random.default_rng(5).standard_normal(shape) * 3 + 1).astype(np.float32)
    ours, theirs = LayerNorm(), keras.layers.LayerNormalization(epsilon=1e-3)
    for training in (True, False):
        assert_same_layer(ours, theirs, x, training)
    assert ours.output_shape() == (None,) + shape[1:]  # the default: traced from _forward
    assert ours.formula() == f"y = layer_norm(x[N,{','.join(str(d) for d in shape[1:])}])"
    assert [name for name, _ in ours.named_variables()] == ["layer_norm/beta", "layer_norm/gamma"]


def test_a_new_layer_trains_in_a_model():
    """Adam on a small model with the test's LayerNorm: the loss on a fixed batch falls, the summary shows it."""
    tf.random.set_seed(0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 12)).astype(np.float32)
    labels = tf.constant(np.argmax(x @ rng.standard_normal((12, 3)), axis=1).astype(np.int32))  # separable
    x = tf.constant(x)
    model = layers.Sequential([layers.Dense(16), LayerNorm(), layers.Activation("relu"), layers.Dense(3)])
    adam = optimizers.Adam(0.01)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = losses.softmax_cross_entropy(model(x, training=True), labels)
        adam.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return loss

    history = [float(step()) for _ in range(30)]
    assert history[-1] < 0.5 * history[0], history
    gamma = dict(model.named_variables())["layer_norm/gamma"]
    assert np.abs(gamma.numpy() - 1).max() > 0.01  # the new layer's own variables were trained
    rows = {line.split()[0]: line for line in model.summary(print_fn=lambda line: None).splitlines()}
    assert rows["layer_norm"].split()[1:4] == ["(LayerNorm)", "[N,16]", "32"]
    assert rows["layer_norm"].endswith("y = layer_norm(x[N,16])")


class Residual(Layer):
    """y = x + s * dense2(relu(dense1(x))): variables in a list of nested layers and in a list of its own."""

    def _create_variables(self, input_shape):
        self.inner = [layers.Dense(input_shape[-1], activation="relu"), layers.Dense(input_shape[-1])]
        for dense in self.inner:
            dense.build(input_shape, self.dtype)
        self.scales = [tf.Variable(tf.ones([], self.dtype), name="s")]

    def _forward(self, x, training):
        y = x
        for dense in self.inner:
            y = dense(y, training)
        return x + self.scales[0] * y


def test_named_variables_name_every_variable_of_a_sequential_nested_ones_included():
    model = layers.Sequential([layers.Conv2D(2, 3, use_bias=False, name="conv1"), layers.BatchNorm(name="conv1_bn"),
                               layers.Flatten(), Residual(name="res"), layers.Dense(3, name="logits")])
    model.build((None, 4, 4, 1))
    named = model.named_variables()
    assert [name for name, _ in named] == [
        "conv1/w", "conv1_bn/beta", "conv1_bn/gamma", "conv1_bn/moving_mean", "conv1_bn/moving_variance",
        "res/scales/0", "res/inner/0/b", "res/inner/0/w", "res/inner/1/b", "res/inner/1/w",
        "logits/b", "logits/w"]
    assert {v.ref() for _, v in named} == {v.ref() for v in model.variables}
    assert dict(named)["res/inner/1/w"] is model.layers[3].inner[1].w


def _float64_model():
    return layers.Sequential([layers.Conv2D(3, 3, strides=2, use_bias=False), layers.BatchNorm(),
                              layers.Activation("tanh"), layers.Flatten(), layers.Dense(5, activation="sigmoid"),
                              LayerNorm(), layers.Dense(4)])


def test_float64_end_to_end_gradients_match_finite_differences():
    """Built from a float64 input, every variable is float64, the logits and the loss are float64, and the
    gradients w.r.t. the input and the weights equal float64 finite differences."""
    tf.random.set_seed(2)
    rng = np.random.default_rng(2)
    x = tf.constant(rng.standard_normal((4, 7, 7, 1)))  # float64
    labels = tf.constant([0, 3, 1, 2])
    model = _float64_model()
    logits = model(x, training=True)
    assert logits.dtype == tf.float64
    assert {v.dtype for v in model.variables} == {tf.float64}

    @tf.function  # traced once: the finite differences call it twice per input and per weight
    def loss_of_input(images):
        return losses.softmax_cross_entropy(model(images, training=True), labels)

    # central differences with step 1e-5: truncation error ~1e-10, rounding ~1e-11
    theoretical, numerical = tf.test.compute_gradient(loss_of_input, [x], delta=1e-5)
    np.testing.assert_allclose(theoretical[0], numerical[0], rtol=1e-7, atol=1e-10)
    for name, variable in model.named_variables():
        if not variable.trainable:
            continue

        def loss_of_variable(value, variable=variable):
            saved = variable.numpy()
            variable.assign(value)
            loss = loss_of_input(x)
            variable.assign(saved)
            return loss

        _, numerical = tf.test.compute_gradient(loss_of_variable, [tf.constant(variable.numpy())], delta=1e-5)
        with tf.GradientTape() as tape:
            loss = loss_of_input(x)
        np.testing.assert_allclose(tape.gradient(loss, variable).numpy().ravel(), numerical[0].ravel(),
                                   rtol=1e-7, atol=1e-10, err_msg=name)


def test_float64_model_matches_its_float64_keras_twin_and_trains_in_float64():
    tf.random.set_seed(4)
    ours = layers.Sequential([layers.Conv2D(3, 3, use_bias=False), layers.BatchNorm(), layers.Activation("relu"),
                              layers.Flatten(), layers.Dense(4)])
    theirs = keras.Sequential([keras.Input((5, 5, 1), dtype="float64"),
                               keras.layers.Conv2D(3, 3, padding="same", use_bias=False, dtype="float64"),
                               keras.layers.BatchNormalization(dtype="float64"),
                               keras.layers.Activation("relu", dtype="float64"), keras.layers.Flatten(dtype="float64"),
                               keras.layers.Dense(4, dtype="float64")])
    x = tf.constant(np.random.default_rng(4).standard_normal((6, 5, 5, 1)))
    labels = tf.constant([0, 1, 2, 3, 0, 1])
    ours.build(x.shape, tf.float64)
    for our_layer, keras_layer in zip(ours.layers, theirs.layers):
        by_name = {name.split("/")[-1]: v for name, v in our_layer.named_variables()}
        for kv in keras_layer.weights:
            kv.assign(by_name[{"kernel": "w", "bias": "b"}.get(kv.path.split("/")[-1], kv.path.split("/")[-1])])
    keras_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64")
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        loss_ours = losses.softmax_cross_entropy(ours(x, training=True), labels)
        loss_keras = keras_loss(labels, theirs(x, training=True))
    assert loss_ours.dtype == tf.float64
    np.testing.assert_allclose(loss_ours.numpy(), loss_keras.numpy(), rtol=1e-13)
    np.testing.assert_allclose(tape.gradient(loss_ours, x).numpy(), tape.gradient(loss_keras, x).numpy(),
                               rtol=1e-11, atol=1e-14)
    adam = optimizers.Adam(0.01)
    adam.apply(tape.gradient(loss_ours, ours.trainable_variables), ours.trainable_variables)
    assert {v.dtype for v in ours.variables} == {tf.float64}
    assert {v.dtype for v in adam.variables if v is not adam.step} == {tf.float64}


def test_inputs_are_cast_to_the_dtype_the_layer_was_built_in():
    """Built in float32 (from a shape, or from integer pixels), a layer casts later float64 inputs to float32."""
    dense = layers.Dense(2)
    dense.build((None, 3))
    assert dense.w.dtype == tf.float32 and dense(np.ones((1, 3))).dtype == tf.float32
    model = layers.Sequential([layers.Flatten(), layers.Dense(2)])
    assert model(np.zeros((1, 2, 2), np.uint8)).dtype == tf.float32
    with pytest.raises(ValueError, match=r"Dense 'dense': layers compute in a floating dtype, got int32"):
        layers.Dense(2).build((None, 3), tf.int32)


def test_initializers_take_shape_and_dtype_fans_from_the_shape():
    assert initializers.fans([784, 200]) == (784, 200)
    assert initializers.fans([5, 5, 16, 32]) == (5 * 5 * 16, 5 * 5 * 32)
    tf.random.set_seed(0)
    w = initializers.GlorotUniform()([600, 400], tf.float64)
    assert w.dtype == tf.float64 and np.abs(w.numpy()).max() <= np.sqrt(6 / 1000)
    assert initializers.Constant(0.1)([3], tf.bfloat16).dtype == tf.bfloat16
    np.testing.assert_array_equal(initializers.Zeros()([2, 2], tf.float32).numpy(), 0)
    with pytest.raises(ValueError, match="TruncatedNormal: stddev must be > 0"):
        initializers.TruncatedNormal(stddev=0.0)
