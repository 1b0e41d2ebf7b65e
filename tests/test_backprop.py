"""The hand-written backward passes against tf.GradientTape on the same forward pass, against finite differences,
and (Conv2D) against the sums written out; then whole models on a real MNIST batch."""
import numpy as np
import pytest
import tensorflow as tf

from core import backprop, layers, losses
from models import REGISTRY

TOLERANCE = {tf.float64: 1e-10, tf.float32: 1e-5}


def assert_close(actual, expected, dtype, what):
    """|actual - expected| <= tol * (|expected| + max |expected|): relative to the element and to the tensor's scale
    (a sum that cancels to near 0 keeps the rounding of its terms)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, what
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * np.max(np.abs(expected)), err_msg=what)


def build(layer, shape, dtype, seed=0):
    """Builds `layer` for inputs of `shape` in `dtype`, its variables randomised (gamma != 1, b != 0, ...)."""
    layer.build((None,) + tuple(shape[1:]), dtype)
    rng = np.random.default_rng(seed)
    for attribute, variable in vars(layer).items():
        if not isinstance(variable, tf.Variable):
            continue
        assert variable.dtype == dtype
        value = rng.standard_normal(variable.shape)
        if attribute == "w":
            value /= np.sqrt(np.prod(variable.shape[:-1]))
        if attribute == "moving_variance":
            value = np.abs(value) + 0.5
        variable.assign(value.astype(dtype.as_numpy_dtype))
    return layer


def trainable_attributes(layer):
    return sorted(name for name, v in vars(layer).items() if isinstance(v, tf.Variable) and v.trainable)


def inputs(shape, dtype, seed=1):
    return tf.constant(np.random.default_rng(seed).standard_normal(shape), dtype=dtype)


def check_against_tape(layer, x, training):
    """dL/dx and dL/dvariable for L = sum(y * r) from layer.backward(r, cache) equal the tape's on the same forward."""
    dtype = x.dtype
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y, cache = layer.forward_with_cache(x, training)
        r = inputs(y.shape, dtype, seed=2)
        loss = tf.reduce_sum(y * r)
    dx, grads = layer.backward(r, cache)
    assert sorted(grads) == trainable_attributes(layer)
    assert dx.dtype == dtype
    assert_close(dx, tape.gradient(loss, x), dtype, f"{layer} dx")
    for attribute, gradient in grads.items():
        assert_close(gradient, tape.gradient(loss, getattr(layer, attribute)), dtype, f"{layer} d{attribute}")
    return y


def finite_difference(f, x, h=1e-6):
    """dF/dx_k = (F(x + h e_k) - F(x - h e_k)) / 2h for every k, F scalar (float64)."""
    flat = x.numpy().ravel()
    grad = np.zeros_like(flat)
    for k in range(flat.size):
        plus, minus = flat.copy(), flat.copy()
        plus[k] += h
        minus[k] -= h
        grad[k] = (float(f(plus.reshape(x.shape))) - float(f(minus.reshape(x.shape)))) / (2 * h)
    return grad.reshape(x.shape)


def check_finite_differences(layer, x, training, reset=lambda: None):
    """layer.backward agrees with central differences of L = sum(y * r) for x and every variable (float64)."""
    reset()
    y, cache = layer.forward_with_cache(x, training)
    r = inputs(y.shape, tf.float64, seed=2)
    dx, grads = layer.backward(r, cache)

    def loss(x_value):
        reset()
        return tf.reduce_sum(layer.forward_with_cache(tf.constant(x_value), training)[0] * r)

    np.testing.assert_allclose(dx, finite_difference(loss, x), rtol=1e-6, atol=1e-7, err_msg=f"{layer} dx")
    for attribute, gradient in grads.items():
        variable = getattr(layer, attribute)
        original = variable.numpy()

        def loss_of_variable(value):
            variable.assign(value)
            return loss(x.numpy())

        numeric = finite_difference(loss_of_variable, variable)
        variable.assign(original)
        np.testing.assert_allclose(gradient, numeric, rtol=1e-6, atol=1e-7, err_msg=f"{layer} d{attribute}")


DTYPES = [tf.float32, tf.float64]

DENSE_CASES = [dict(activation=a, use_bias=b)
               for a in (None, "relu", "sigmoid", "tanh", "softmax") for b in (True, False)]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("kwargs", DENSE_CASES, ids=str)
def test_dense_backward_equals_tape(kwargs, dtype):
    layer = build(layers.Dense(5, **kwargs), (7, 13), dtype)
    x = inputs((7, 13), dtype)
    for training in (True, False):
        y = check_against_tape(layer, x, training)
    if dtype == tf.float32:
        np.testing.assert_array_equal(y, layer(x))


CONV_CASES = [
    dict(kernel_size=3, strides=1, padding="same", activation="relu"),
    dict(kernel_size=(4, 5), strides=2, padding="same", activation=None),   # odd total padding: extra row at the bottom
    dict(kernel_size=(2, 3), strides=(2, 3), padding="same", activation="tanh", use_bias=False),
    dict(kernel_size=3, strides=2, padding="valid", activation="relu"),
    dict(kernel_size=(5, 2), strides=(1, 2), padding="valid", activation="sigmoid", use_bias=False),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("kwargs", CONV_CASES, ids=str)
def test_conv2d_backward_equals_tape(kwargs, dtype):
    layer = build(layers.Conv2D(4, **kwargs), (3, 9, 11, 2), dtype)
    x = inputs((3, 9, 11, 2), dtype)
    for training in (True, False):
        y = check_against_tape(layer, x, training)
    if dtype == tf.float32:
        np.testing.assert_array_equal(y, layer(x))


def test_conv2d_backward_equals_the_sums_written_out():
    """stride 2, 'same', 4x3 kernel on 5x6: padding rows P = 3 -> top 1, bottom 2; columns P = 1 -> left 0, right 1."""
    n, h, w, c, f, kh, kw, s = 2, 5, 6, 2, 3, 4, 3, 2
    layer = build(layers.Conv2D(f, (kh, kw), strides=s, padding="same"), (n, h, w, c), tf.float64)
    x = inputs((n, h, w, c), tf.float64)
    y, cache = layer.forward_with_cache(x)
    dy = inputs(y.shape, tf.float64, seed=2).numpy()
    dx, grads = layer.backward(tf.constant(dy), cache)

    ho, wo = -(-h // s), -(-w // s)
    assert y.shape == (n, ho, wo, f)
    pad_h, pad_w = (ho - 1) * s + kh - h, (wo - 1) * s + kw - w
    top, left = pad_h // 2, pad_w // 2
    assert (top, pad_h - top, left, pad_w - left) == (1, 2, 0, 1)
    x_pad = np.zeros((n, h + pad_h, w + pad_w, c))
    x_pad[:, top:top + h, left:left + w, :] = x.numpy()
    kernel = layer.w.numpy()
    dw = np.zeros_like(kernel)
    dx_pad = np.zeros_like(x_pad)
    for b in range(n):
        for i in range(ho):
            for j in range(wo):
                for di in range(kh):
                    for dj in range(kw):
                        for ch in range(c):
                            for k in range(f):
                                dw[di, dj, ch, k] += x_pad[b, i * s + di, j * s + dj, ch] * dy[b, i, j, k]
                                dx_pad[b, i * s + di, j * s + dj, ch] += dy[b, i, j, k] * kernel[di, dj, ch, k]
    np.testing.assert_allclose(grads["w"], dw, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grads["b"], dy.sum(axis=(0, 1, 2)), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, dx_pad[:, top:top + h, left:left + w, :], rtol=1e-12, atol=1e-12)


BN_CASES = [((6, 5), dict()), ((3, 5, 7, 4), dict()), ((3, 5, 7, 4), dict(scale=False)),
            ((5, 3), dict(center=False)), ((2, 3, 3, 2), dict(center=False, scale=False))]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("shape, kwargs", BN_CASES, ids=str)
def test_batch_norm_backward_equals_tape_and_leaves_moving_statistics_alone(shape, kwargs, dtype):
    layer = build(layers.BatchNorm(momentum=0.9, **kwargs), shape, dtype)
    x = inputs(shape, dtype) * 3 + 1
    for training in (True, False):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y, cache = layer.forward_with_cache(x, training)
        moving = [layer.moving_mean.numpy(), layer.moving_variance.numpy()]
        layer.backward(tf.ones_like(y), cache)
        np.testing.assert_array_equal(moving, [layer.moving_mean.numpy(), layer.moving_variance.numpy()])
        check_against_tape(layer, x, training)


def test_batch_norm_training_forward_updates_moving_statistics_as_a_call_does():
    ours, reference = (build(layers.BatchNorm(momentum=0.9), (6, 3), tf.float32) for _ in range(2))
    x = inputs((6, 3), tf.float32)
    y, _ = ours.forward_with_cache(x, training=True)
    np.testing.assert_allclose(y, reference(x, training=True), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(ours.moving_mean.numpy(), reference.moving_mean.numpy())
    np.testing.assert_array_equal(ours.moving_variance.numpy(), reference.moving_variance.numpy())


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("rate", [0.0, 0.4])
def test_dropout_backward_uses_the_forward_mask(rate, dtype):
    layer = build(layers.Dropout(rate, seed=3), (4, 9, 5), dtype)
    x = inputs((4, 9, 5), dtype)
    y = check_against_tape(layer, x, training=True)
    if rate:
        dx, _ = layer.backward(tf.ones_like(y), layer.forward_with_cache(x, True)[1])
        dropped = dx.numpy() == 0
        assert 0.2 < dropped.mean() < 0.6
    check_against_tape(layer, x, training=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("fn", ["relu", "sigmoid", "tanh", "softmax", "linear"])
def test_activation_backward_equals_tape(fn, dtype):
    layer = build(layers.Activation(fn), (5, 7), dtype)
    x = inputs((5, 7), dtype) * 3
    for training in (True, False):
        check_against_tape(layer, x, training)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("layer_fn, shape", [(lambda: layers.Flatten(), (3, 5, 7, 2)),
                                             (lambda: layers.Reshape((7, 10)), (3, 5, 14)),
                                             (lambda: layers.GlobalAveragePooling2D(), (3, 5, 7, 2))],
                         ids=["flatten", "reshape", "global_average_pooling"])
def test_shape_layers_backward_equals_tape(layer_fn, shape, dtype):
    layer = build(layer_fn(), shape, dtype)
    check_against_tape(layer, inputs(shape, dtype), training=True)


MAXPOOL_CASES = [dict(pool_size=2), dict(pool_size=3, strides=2, padding="same"),
                 dict(pool_size=(2, 3), strides=1, padding="valid"), dict(pool_size=3, strides=(1, 2), padding="same")]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("kwargs", MAXPOOL_CASES, ids=str)
def test_max_pool_backward_equals_tape(kwargs, dtype):
    layer = build(layers.MaxPool2D(**kwargs), (2, 7, 9, 3), dtype)
    x = inputs((2, 7, 9, 3), dtype)
    y = check_against_tape(layer, x, training=True)
    np.testing.assert_array_equal(y, layer._forward(x, False))
    # After a ReLU whole windows are 0: ties go to the first position of the window, as the tape's do.
    check_against_tape(layer, tf.nn.relu(x - 1.0), training=True)


FINITE_DIFFERENCE_CASES = {
    "dense_relu": (lambda: layers.Dense(3, activation="relu"), (4, 5), [True]),
    "dense_sigmoid": (lambda: layers.Dense(3, activation="sigmoid"), (4, 5), [True]),
    "conv_same_stride2": (lambda: layers.Conv2D(2, (3, 2), strides=2, activation="tanh"), (2, 5, 4, 2), [True]),
    "conv_valid": (lambda: layers.Conv2D(2, 2, padding="valid"), (1, 4, 3, 2), [True]),
    "batch_norm": (lambda: layers.BatchNorm(), (2, 3, 2, 3), [True, False]),
    "batch_norm_dense": (lambda: layers.BatchNorm(scale=False), (5, 3), [True, False]),
    "dropout": (lambda: layers.Dropout(0.5, seed=4), (3, 4), [True, False]),
    "softmax": (lambda: layers.Activation("softmax"), (3, 4), [True]),
    "flatten": (lambda: layers.Flatten(), (2, 3, 2, 2), [True]),
    "max_pool": (lambda: layers.MaxPool2D(2, strides=1, padding="same"), (1, 4, 3, 2), [True]),
    "global_average_pooling": (lambda: layers.GlobalAveragePooling2D(), (2, 3, 2, 2), [True]),
}


@pytest.mark.parametrize("case", FINITE_DIFFERENCE_CASES)
def test_backward_equals_finite_differences_in_float64(case):
    layer_fn, shape, modes = FINITE_DIFFERENCE_CASES[case]
    layer = build(layer_fn(), shape, tf.float64)
    reset = (lambda: layer.generator.reset_from_seed(layer.seed)) if isinstance(layer, layers.Dropout) else lambda: None
    for training in modes:
        check_finite_differences(layer, inputs(shape, tf.float64), training, reset)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_softmax_cross_entropy_backward_equals_tape_and_finite_differences(dtype):
    logits = inputs((6, 4), dtype) * 5
    labels = tf.constant([0, 3, 1, 1, 2, 3])
    with tf.GradientTape() as tape:
        tape.watch(logits)
        loss = losses.softmax_cross_entropy(logits, labels)
    dz = losses.softmax_cross_entropy_backward(logits, labels)
    assert_close(dz, tape.gradient(loss, logits), dtype, "dL/dlogits")
    np.testing.assert_allclose(tf.reduce_sum(dz, axis=1), 0.0, atol=1e-7)
    if dtype == tf.float64:
        numeric = finite_difference(lambda z: losses.softmax_cross_entropy(tf.constant(z), labels), logits)
        np.testing.assert_allclose(dz, numeric, rtol=1e-6, atol=1e-9)


def test_unknown_activation_and_loss_name_what_is_missing():
    layer = layers.Activation(lambda x: x * 2)
    layer.build((None, 3))
    with pytest.raises(ValueError, match="no hand-written backward pass"):
        layer.backward(tf.ones([2, 3]), (tf.ones([2, 3]), tf.ones([2, 3])))
    with pytest.raises(ValueError, match="no hand-written backward pass for the loss naive_softmax_cross_entropy"):
        backprop.loss_backward(losses.naive_softmax_cross_entropy)


@pytest.fixture(scope="module")
def mnist_batch(mnist_dir):
    """The first 32 training images [32, 28, 28, 1] and their labels."""
    from core import data
    from datasets import idx
    return next(iter(data.training_batches(idx.load(mnist_dir, "train").take(32), 32, seed=1, epoch=0)))


def _random_state(model):
    """The dropout generators' and moving statistics' values, to run two steps from the same state."""
    generators = [layer.generator for layer in model.layers if isinstance(layer, layers.Dropout)]
    moving = [v for v in model.variables if not v.trainable]
    saved = ([g.state.numpy() for g in generators], [v.numpy() for v in moving])

    def restore():
        for generator, state in zip(generators, saved[0]):
            generator.state.assign(state)
        for variable, value in zip(moving, saved[1]):
            variable.assign(value)
    return restore, moving


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_model_by_hand_step_equals_the_tape_step_on_mnist(name, mnist_batch):
    from core.runner import tape_gradients

    tf.random.set_seed(1)
    spec = REGISTRY[name]
    model = spec.build(spec.defaults["dropout"] or 0.25)   # dropout in every model that takes it
    model.build((None, 28, 28, 1))
    images, labels = mnist_batch
    variables = model.trainable_variables
    restore, moving = _random_state(model)
    step = {}
    for how, compute_gradients in (("tape", tape_gradients), ("by_hand", backprop.gradients)):
        restore()
        loss, logits, gradients = compute_gradients(model, losses.softmax_cross_entropy, images, labels, variables)
        step[how] = (loss, logits, gradients, [v.numpy() for v in moving])
    (loss, logits, tape, moving_tape), (hand_loss, hand_logits, hand, moving_hand) = step["tape"], step["by_hand"]
    np.testing.assert_array_equal(hand_loss, loss)
    np.testing.assert_array_equal(hand_logits, logits)
    for by_hand, expected in zip(moving_hand, moving_tape):
        np.testing.assert_array_equal(by_hand, expected)
    assert len(hand) == len(tape) == len(variables)
    for variable, by_hand, expected in zip(variables, hand, tape):
        assert float(tf.norm(expected)) > 0, variable.name
        assert_close(by_hand, expected, tf.float32, f"{name}: {variable.name}")


def test_trainer_with_the_by_hand_gradients_follows_the_tape_in_its_compiled_step(mnist_dir):
    """Two SGD steps of conv_bn (batch norm, dropout) with each gradient function end on the same weights (SGD: the
    update is linear in the gradient; Adam's g / sqrt(v) would magnify the rounding of gradients near 0). The second
    step starts from the first's weights. A third is left out: there the two sides' rounding (1e-7 after two steps)
    puts ReLU inputs that sit at 0 on different sides of it, and the weights part by 1e-3."""
    from core import data, optimizers
    from datasets import idx
    from core.trainer import Runner, Trainer

    train = idx.load(mnist_dir, "train").take(64)
    weights = {}
    for how, compute_gradients in (("tape", None), ("by_hand", backprop.gradients)):
        tf.random.set_seed(5)
        model = REGISTRY["conv_bn"].build(0.3)
        gradients = {"compute_gradients": compute_gradients} if compute_gradients else {}
        trainer = Trainer(Runner(model, optimizers.SGD(0.1), **gradients), progress=False)
        trainer.fit(lambda epoch: data.training_batches(train, 32, seed=1, epoch=epoch), epochs=1)
        assert trainer.runner.train.experimental_get_tracing_count() == 1
        weights[how] = [v.numpy() for v in model.variables]
    for by_hand, tape in zip(weights["by_hand"], weights["tape"]):
        np.testing.assert_allclose(by_hand, tape, rtol=1e-4, atol=1e-4 * np.max(np.abs(tape)))
