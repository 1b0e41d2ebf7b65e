"""SGD (plain, momentum, Nesterov) and Adam against keras.optimizers over 101 steps of the same gradients."""
import numpy as np
import pytest
import tensorflow as tf

keras = pytest.importorskip("keras")

from core import optimizers, schedules  # noqa: E402

SHAPES = [(6, 4), (4,), (3, 3, 2, 5)]
STEPS = 101


def _gradient_sequence(seed=0):
    rng = np.random.default_rng(seed)
    # varying scales so Adam's v and the epsilon both matter
    return [[(rng.standard_normal(s) * 10.0 ** rng.integers(-4, 2)).astype(np.float32) for s in SHAPES]
            for _ in range(STEPS)]


def _initial(seed=1):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in SHAPES]


def _ulps(a, b):
    """Distance in units in the last place between float32 arrays."""
    ia = a.view(np.int32).astype(np.int64)
    ib = b.view(np.int32).astype(np.int64)
    ia = np.where(ia < 0, np.int64(-2**31) - ia, ia)
    ib = np.where(ib < 0, np.int64(-2**31) - ib, ib)
    return np.abs(ia - ib).max()


def _run_both(ours, theirs, use_tf_function=False):
    grads = _gradient_sequence()
    ours_vars = [tf.Variable(v) for v in _initial()]
    keras_vars = [keras.Variable(v) for v in _initial()]
    ours.build(ours_vars)
    apply = tf.function(ours.apply) if use_tf_function else ours.apply
    for gs in grads:
        apply([tf.constant(g) for g in gs], ours_vars)
        theirs.apply_gradients(zip([tf.constant(g) for g in gs], keras_vars))
    assert int(ours.step.numpy()) == STEPS == int(theirs.iterations.numpy())
    return [v.numpy() for v in ours_vars], [np.asarray(v.numpy()) for v in keras_vars]


@pytest.mark.parametrize("use_tf_function", [False, True])
def test_adam_matches_keras_to_the_last_ulps(use_tf_function):
    ours, theirs = _run_both(optimizers.Adam(0.01), keras.optimizers.Adam(0.01), use_tf_function)
    for a, b, initial in zip(ours, theirs, _initial()):
        assert _ulps(a, b) <= 4
        assert np.abs(a - initial).max() > 0.1  # the variables really moved


def test_adam_with_schedule_and_non_default_constants_matches_keras():
    ours = optimizers.Adam(schedules.ExponentialDecay(0.02, 0.5, 30, staircase=True), beta_1=0.8, beta_2=0.99,
                           epsilon=1e-4)
    theirs = keras.optimizers.Adam(keras.optimizers.schedules.ExponentialDecay(0.02, 30, 0.5, staircase=True),
                                   beta_1=0.8, beta_2=0.99, epsilon=1e-4)
    for a, b in zip(*_run_both(ours, theirs)):
        assert _ulps(a, b) <= 4


@pytest.mark.parametrize("xla_step", [False, True], ids=["tf_function", "inside_an_xla_step"])
def test_fused_adam_is_the_formula_bit_for_bit(xla_step, monkeypatch):
    """Adam(fused=True) (the float32 updates as one XLA-compiled function) against fused=False (the formula op by
    op, in a tf.function): the same bits in every weight and slot after 101 steps of a schedule, whether the step
    around the fast path runs op by op or is itself compiled by XLA (where the formula would not be: XLA fuses its
    products into the sums). A float64 variable beside them takes the formula (op by op: not in the XLA step)."""
    from core.optimizers import adam as adam_module
    compiled, calls = adam_module._compiled_updates, []
    monkeypatch.setattr(adam_module, "_compiled_updates", lambda *args: calls.append(len(args[0])) or compiled(*args))
    rng = np.random.default_rng(2)
    shapes = SHAPES + [(300, 40)]
    initial = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    initial += [] if xla_step else [rng.standard_normal(5)]
    grads = [[rng.standard_normal(np.shape(w)) * 10.0 ** rng.uniform(-6, 0) for w in initial] for _ in range(5)]
    results = []
    for fused in (True, False):
        weights = [tf.Variable(w) for w in initial]
        adam = optimizers.Adam(schedules.ExponentialDecay(0.02, 0.5, 30, staircase=True), fused=fused)
        adam.build(weights)
        step = tf.function(lambda gs: adam.apply(gs, weights), jit_compile=xla_step and fused)
        for t in range(STEPS):
            step([tf.constant(g, w.dtype) for g, w in zip(grads[t % 5], weights)])
        results.append([v.numpy() for v in weights + adam.m + adam.v])
    assert calls == [len(shapes)]  # traced once, with the float32 variables only
    for fast, formula in zip(*results):
        assert fast.tobytes() == formula.tobytes()
    assert all(np.abs(w - w0).max() > 0.1 for w, w0 in zip(results[0], initial))


def test_fused_adam_under_a_distribution_strategy_runs_the_formula(monkeypatch):
    """Under a tf.distribute strategy (variables that may be mirrored) Adam(fused=True) leaves the compiled function
    alone and runs the formula op by op."""
    from core.optimizers import adam as adam_module
    calls = []
    monkeypatch.setattr(adam_module, "_compiled_updates", lambda *args: calls.append(args))
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    with strategy.scope():
        weights = [tf.Variable(w) for w in _initial()]
        adam = optimizers.Adam(0.01, fused=True)
        adam.build(weights)
    strategy.run(tf.function(lambda: adam.apply([tf.ones_like(w) for w in weights], weights)))
    assert not calls and int(adam.step.numpy()) == 1
    assert all(np.abs(w.numpy() - w0).max() > 0.005 for w, w0 in zip(weights, _initial()))


@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.9, True), (0.5, True)])
def test_sgd_matches_keras(momentum, nesterov):
    ours, theirs = _run_both(optimizers.SGD(0.05, momentum=momentum, nesterov=nesterov),
                             keras.optimizers.SGD(0.05, momentum=momentum, nesterov=nesterov))
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
        assert _ulps(a, b) <= 4


def _adam_float64(w, grads, lr, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
    """Keras 3's Adam update (see core/optimizers/adam.py) in numpy float64."""
    m, v = np.zeros_like(w), np.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        alpha = lr * np.sqrt(1 - beta_2 ** t) / (1 - beta_1 ** t)
        m += (g - m) * (1 - beta_1)
        v += (g * g - v) * (1 - beta_2)
        w = w - m * alpha / (np.sqrt(v) + epsilon)
    return w


def _sgd_momentum_float64(w, grads, lr, momentum):
    velocity = np.zeros_like(w)
    for g in grads:
        velocity = momentum * velocity - lr * g
        w = w + velocity
    return w


@pytest.mark.parametrize("make,reference", [
    (lambda k: k.Adam(0.01), lambda w, gs, lr: _adam_float64(w, gs, lr)),
    (lambda k: k.SGD(0.05, momentum=0.9), lambda w, gs, lr: _sgd_momentum_float64(w, gs, lr, 0.9)),
], ids=["adam", "sgd-momentum"])
def test_float64_and_float32_variables_each_update_in_their_own_dtype(make, reference):
    """One optimizer, a float64 and a float32 variable: slots take each variable's dtype, the float64 variable
    follows the update computed in numpy float64 (Keras itself drifts by about 1e-6 there: it keeps some
    constants in float32), and the float32 one still equals Keras's to a few ulps."""
    grads = _gradient_sequence()
    initial = _initial()
    ours_vars = [tf.Variable(initial[0].astype(np.float64)), tf.Variable(initial[1])]
    keras_var = keras.Variable(initial[1])
    ours, theirs = make(optimizers), make(keras.optimizers)
    ours.build(ours_vars)
    apply = tf.function(ours.apply)
    for gs in grads:
        apply([tf.constant(gs[0].astype(np.float64)), tf.constant(gs[1])], ours_vars)
        theirs.apply_gradients([(tf.constant(gs[1]), keras_var)])
    slots = [v for v in ours.variables if v is not ours.step]
    assert slots and {v.dtype for v in slots} == {tf.float64, tf.float32}
    assert ours_vars[0].dtype == tf.float64
    lr = float(np.float32(ours.learning_rate))  # the learning rate is a float32 scalar, cast to each dtype
    expected = reference(initial[0].astype(np.float64), [gs[0].astype(np.float64) for gs in grads], lr)
    np.testing.assert_allclose(ours_vars[0].numpy(), expected, rtol=1e-12, atol=1e-12)
    assert np.abs(ours_vars[0].numpy() - initial[0]).max() > 0.01
    assert _ulps(ours_vars[1].numpy(), np.asarray(keras_var.numpy())) <= 4


def test_adam_first_step_by_hand():
    """t = 1: m = 0.1 g, v = 0.001 g^2, alpha = lr sqrt(0.001) / 0.1, so w moves by lr * g / (|g| + eps/sqrt(0.001))."""
    w = tf.Variable([1.0, -2.0, 0.5])
    g = np.array([0.5, -3.0, 1e-6], np.float32)
    adam = optimizers.Adam(0.1)
    adam.apply([tf.constant(g)], [w])
    eps_hat = 1e-7 / np.sqrt(1 - 0.999)
    expected = np.array([1.0, -2.0, 0.5]) - 0.1 * g / (np.abs(g) + eps_hat)
    np.testing.assert_allclose(w.numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(adam.m[0].numpy(), 0.1 * g, rtol=1e-6)
    np.testing.assert_allclose(adam.v[0].numpy(), 0.001 * g * g, rtol=1e-5)


def test_sgd_momentum_by_hand():
    w = tf.Variable(1.0)
    sgd = optimizers.SGD(0.1, momentum=0.9)
    for _ in range(2):
        sgd.apply([tf.constant(1.0)], [w])
    # velocity: -0.1 then 0.9 * -0.1 - 0.1 = -0.19; w = 1 - 0.1 - 0.19
    np.testing.assert_allclose(sgd.velocity[0].numpy(), -0.19, rtol=1e-6)
    np.testing.assert_allclose(w.numpy(), 0.71, rtol=1e-6)
    assert optimizers.SGD(0.1).velocity == []


def test_schedule_is_evaluated_at_the_step_before_the_increment():
    seen = []

    def schedule(step):
        seen.append(int(step.numpy()))
        return tf.constant(0.5) * 0.5 ** tf.cast(step, tf.float32)

    w = tf.Variable(0.0)
    sgd = optimizers.SGD(schedule)
    assert float(sgd.current_learning_rate()) == 0.5
    for _ in range(3):
        sgd.apply([tf.constant(1.0)], [w])
    assert seen[1:] == [0, 1, 2]
    np.testing.assert_allclose(w.numpy(), -(0.5 + 0.25 + 0.125))
    assert float(sgd.current_learning_rate()) == 0.0625
    assert sgd.step.dtype == tf.int64 and not sgd.step.trainable


def test_step_advances_inside_tf_function_and_no_variables_created_by_later_traces():
    w = [tf.Variable(tf.ones([3])), tf.Variable(tf.ones([2, 2]))]
    adam = optimizers.Adam(1e-3)
    adam.build(w)
    count = len(adam.variables)
    step = tf.function(lambda: adam.apply([tf.ones([3]), tf.ones([2, 2])], w))
    for _ in range(5):
        step()
    assert int(adam.step.numpy()) == 5 and len(adam.variables) == count == 1 + 4


def test_slots_restore_from_a_checkpoint(tmp_path):
    w = [tf.Variable([1.0, 2.0])]
    adam = optimizers.Adam(0.1)
    adam.apply([tf.constant([0.3, -0.2])], w)
    path = tf.train.Checkpoint(optimizer=adam).save(str(tmp_path / "ckpt"))
    fresh = optimizers.Adam(0.1)
    fresh.build([tf.Variable([0.0, 0.0])])
    tf.train.Checkpoint(optimizer=fresh).restore(path).assert_consumed()
    assert int(fresh.step.numpy()) == 1
    np.testing.assert_array_equal(fresh.m[0].numpy(), adam.m[0].numpy())
    np.testing.assert_array_equal(fresh.v[0].numpy(), adam.v[0].numpy())


@pytest.mark.parametrize("lr", [0.0, -0.01, "0.1", None, True])
def test_non_positive_learning_rate_is_a_value_error(lr):
    with pytest.raises(ValueError, match="Adam: learning_rate must be a positive number or a schedule"):
        optimizers.Adam(lr)
    with pytest.raises(ValueError, match="SGD: learning_rate must be a positive number or a schedule"):
        optimizers.SGD(lr)


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match=r"SGD: momentum must be a number in \[0, 1\]"):
        optimizers.SGD(0.1, momentum=1.5)
    with pytest.raises(ValueError, match=r"Adam: beta_1 must be in \[0, 1\)"):
        optimizers.Adam(0.1, beta_1=1.0)
    adam = optimizers.Adam(0.1)
    w = tf.Variable([1.0])
    with pytest.raises(ValueError, match="1 gradients for 2 variables"):
        adam.apply([tf.ones([1])], [w, tf.Variable([2.0])])
    with pytest.raises(ValueError, match=r"no gradient for variable .* \[1\]"):
        adam.apply([None], [w])
    with pytest.raises(ValueError, match=r"was not passed to build\(\)"):
        adam.apply([tf.ones([1])], [tf.Variable([3.0])])
