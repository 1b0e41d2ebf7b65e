"""Mixed precision by hand: float32 master weights and slots, the step computed in bfloat16 matches the float32
step within bfloat16's precision, BatchNorm stays float32, and the float16 loss scale follows Keras's
LossScaleOptimizer (halve and skip on overflow, double after N good steps)."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from core.layers import Activation, BatchNorm, Conv2D, Dense, Flatten, Sequential
from core.losses import softmax_cross_entropy
from core.module import Layer
from core.optimizers import Adam
from core.precision import LossScale, compute_dtype, compute_in, mixed_gradients
from core.runner import Runner, tape_gradients


def model_and_batch(seed=3, fused=True):
    tf.random.set_seed(seed)
    model = Sequential([Conv2D(4, 3, strides=2, use_bias=False), BatchNorm(scale=False, fused=fused), Flatten(),
                        Dense(16, activation="relu"), Dense(5)])
    model.build((None, 8, 8, 1))
    rng = np.random.default_rng(seed)
    images = tf.constant(rng.random((32, 8, 8, 1)), tf.float32)
    labels = tf.constant(rng.integers(0, 5, 32), tf.int32)
    return model, images, labels


def test_precision_names():
    assert [compute_dtype(p) for p in ("float32", "mixed_bfloat16", "mixed_float16")] == [
        tf.float32, tf.bfloat16, tf.float16]
    with pytest.raises(ValueError, match="precision must be one of float32, mixed_bfloat16, mixed_float16"):
        compute_dtype("bfloat16")


@pytest.mark.parametrize("fused, batch_norm_dtype", [(True, tf.bfloat16), (False, tf.float32)])
def test_layers_compute_in_bfloat16_batch_norm_keeps_float32_statistics_and_the_weights_come_back(
        fused, batch_norm_dtype):
    """The fused BatchNorm passes bfloat16 through (float32 statistics inside); the formula's computes in float32."""
    model, images, _ = model_and_batch(fused=fused)
    before = [(v.ref(), v.dtype) for v in model.variables]
    seen = {}
    with compute_in(model, tf.bfloat16):
        for name, output in model.activations(tf.cast(images, tf.bfloat16), training=True):
            seen[name] = output.dtype
    assert list(seen.values()) == [tf.bfloat16, batch_norm_dtype, tf.bfloat16, tf.bfloat16, tf.bfloat16]
    assert [(v.ref(), v.dtype) for v in model.variables] == before  # the float32 variables themselves
    assert all(v.dtype == tf.float32 for v in model.layers[1].variables)
    assert model.layers[1].dtype == tf.float32  # restored on exit
    assert all(isinstance(layer.w, tf.Variable) for layer in model.layers if hasattr(layer, "w"))


class Stack(Layer):
    """y = inner_k(... inner_1(x)): layers held in a list inside one layer, a container inside the model."""

    def __init__(self, inner, name=None):
        super().__init__(name=name)
        self.inner = list(inner)

    def _create_variables(self, input_shape):
        for layer in self.inner:
            layer.build(input_shape, self.dtype)
            input_shape = layer.output_shape(input_shape)

    def _forward(self, x, training):
        for layer in self.inner:
            x = layer(x, training)
        return x


def test_nested_layers_compute_in_bfloat16_and_a_nested_batch_norm_and_softmax_in_float32():
    """compute_in reaches layers nested in containers (two levels deep here), and follows each layer's
    computes_in_float32: the nested Dense weights are cast, a nested formula BatchNorm and a softmax stay float32."""
    tf.random.set_seed(4)
    deepest = Dense(6, name="deepest")
    norm = BatchNorm(fused=False, name="norm")
    softmax = Activation("softmax", name="softmax")
    model = Sequential([Flatten(), Stack([Dense(8, activation="relu", name="inner"), norm,
                                          Stack([deepest, softmax], name="stack2")], name="stack1"), Dense(3)])
    model.build((None, 2, 2, 1))
    x = tf.random.uniform([5, 2, 2, 1])
    with compute_in(model, tf.bfloat16):
        assert deepest.w.dtype == tf.bfloat16 and not isinstance(deepest.w, tf.Variable)
        assert model.layers[1].inner[0].w.dtype == tf.bfloat16
        assert isinstance(norm.beta, tf.Variable) and norm.dtype == tf.float32
        assert deepest(tf.cast(norm(tf.zeros([5, 8])), tf.bfloat16)).dtype == tf.bfloat16
        assert softmax(tf.zeros([5, 6], tf.bfloat16)).dtype == tf.float32
        assert model(tf.cast(x, tf.bfloat16)).dtype == tf.bfloat16
    assert isinstance(deepest.w, tf.Variable) and deepest.dtype == tf.float32  # restored on exit
    assert all(v.dtype == tf.float32 for v in model.variables)
    labels = tf.constant([0, 1, 2, 0, 1])
    variables = model.trainable_variables
    _, _, grads32 = tape_gradients(model, softmax_cross_entropy, x, labels, variables)
    _, _, grads16 = mixed_gradients(tf.bfloat16)(model, softmax_cross_entropy, x, labels, variables)
    for variable, g16, g32 in zip(variables, grads16, grads32):
        assert g16.dtype == tf.float32
        assert np.linalg.norm(g16.numpy() - g32.numpy()) <= 0.1 * np.linalg.norm(g32.numpy()), variable.name
    deepest_w = [i for i, v in enumerate(variables) if v is deepest.w][0]
    assert not np.array_equal(grads16[deepest_w].numpy(), grads32[deepest_w].numpy())  # computed in bfloat16


def test_mixed_step_matches_the_float32_step_within_bfloat16_precision_and_keeps_float32_gradients():
    model, images, labels = model_and_batch()
    variables = model.trainable_variables
    loss32, logits32, grads32 = tape_gradients(model, softmax_cross_entropy, images, labels, variables)
    loss16, logits16, grads16 = mixed_gradients(tf.bfloat16)(model, softmax_cross_entropy, images, labels,
                                                             variables)
    assert loss16.dtype == logits16.dtype == tf.float32
    assert all(g.dtype == tf.float32 for g in grads16)
    # bfloat16 keeps 8 significant bits (a rounding is up to 2^-9 = 0.2% off): the loss is off by ~0.2%; the
    # gradients of the first layers, sums of many terms that nearly cancel, by up to ~8% of their norm.
    np.testing.assert_allclose(loss16.numpy(), loss32.numpy(), rtol=1e-2)
    np.testing.assert_allclose(logits16.numpy(), logits32.numpy(), atol=5e-2)
    for g16, g32 in zip(grads16, grads32):
        assert np.linalg.norm(g16.numpy() - g32.numpy()) <= 0.1 * np.linalg.norm(g32.numpy())
    assert not np.array_equal(loss16.numpy(), loss32.numpy())  # it really computed in bfloat16


def test_mixed_runner_keeps_float32_master_weights_and_slots_and_tracks_the_float32_run():
    runs = {}
    for precision in ("float32", "mixed_bfloat16"):
        model, images, labels = model_and_batch()
        start = [v.numpy() for v in model.trainable_variables]
        runner = Runner(model, Adam(0.01), precision=precision)
        batches = tf.data.Dataset.from_tensors((images, labels)).repeat(5)
        runner.prepare(batches.element_spec)
        runner.train(iter(batches), tf.constant(5))
        assert all(v.dtype == tf.float32 for v in model.variables)
        assert all(slot.dtype == tf.float32 for slot in runner.optimizer.variables if slot.dtype.is_floating)
        assert int(runner.optimizer.step.numpy()) == 5 and int(runner.guard.bad_step.numpy()) == -1
        runs[precision] = [v.numpy() - s for v, s in zip(model.trainable_variables, start)]
    for mixed, full in zip(runs["mixed_bfloat16"], runs["float32"]):
        # The weights' moves over 5 Adam steps: Adam divides each gradient by its own size, so where bfloat16
        # turns a tiny gradient element's sign the move flips; seeds 1..5 give 0.2% to 15% of the move's norm.
        assert np.linalg.norm(mixed - full) <= 0.2 * np.linalg.norm(full)
        assert not np.array_equal(mixed, full)


def keras_scales(finite_steps, growth_steps):
    """Keras LossScaleOptimizer's dynamic scale after each step of finite (True) or overflowing gradients."""
    variable = keras.Variable(np.ones(2, np.float32))
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1), initial_scale=64.0,
                                                    dynamic_growth_steps=growth_steps)
    scales = []
    for finite in finite_steps:
        gradient = np.ones(2, np.float32) if finite else np.array([np.inf, 1.0], np.float32)
        optimizer.apply([tf.constant(gradient)], [variable])
        scales.append(float(optimizer.dynamic_scale.numpy()))
    return scales


def test_loss_scale_halves_on_overflow_and_doubles_after_n_good_steps_like_keras():
    steps = [True, True, True, False, True, True, True, True, True, True, True, False, False, True]
    scale = LossScale(initial_scale=64.0, growth_steps=3)
    ours = []
    for finite in steps:
        scale.update(tf.constant(finite))
        ours.append(float(scale.scale.numpy()))
    assert ours == keras_scales(steps, 3)
    assert ours[:5] == [64.0, 64.0, 128.0, 64.0, 64.0]


def test_float16_overflow_skips_the_update_halves_the_scale_and_does_not_stop_training():
    model, images, labels = model_and_batch()
    runner = Runner(model, Adam(0.01), precision="mixed_float16")
    runner.loss_scale.scale.assign(2.0 ** 40)  # the scaled loss overflows float16's 65504
    batches = tf.data.Dataset.from_tensors((images, labels)).repeat(40)
    runner.prepare(batches.element_spec)
    iterator = iter(batches)
    before = [v.numpy() for v in model.trainable_variables]
    runner.train(iterator, tf.constant(1))
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(before, model.trainable_variables))
    assert float(runner.loss_scale.scale.numpy()) == 2.0 ** 39
    assert int(runner.optimizer.step.numpy()) == 1  # a skipped step still counts (schedule, logs, resume)
    assert int(runner.guard.bad_step.numpy()) == -1  # an overflow under loss scaling is not an error
    runner.train(iterator, tf.constant(39))  # halves until the gradients fit, then trains
    assert float(runner.loss_scale.scale.numpy()) < 2.0 ** 39
    assert int(runner.loss_scale.good_steps.numpy()) > 0
    assert not all(np.array_equal(a, v.numpy()) for a, v in zip(before, model.trainable_variables))
    assert int(runner.guard.bad_step.numpy()) == -1
