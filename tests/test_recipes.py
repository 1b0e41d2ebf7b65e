"""The contributor recipes of docs/design.md, each done here exactly as the recipe says, in this process:

    an optimizer:  its module (one file), core/optimizers/<name>.py                  -> --optimizer=<name> takes it
    a data set:    one entry in datasets.REGISTRY                                    -> --dataset trains on it
    a model:       its module (one file) + one entry in models.REGISTRY (+ its Keras twin for the tests)
                   -> --model takes it and every test parametrized over the registry runs it
    a layer:       its module (one file) + its test                                   -> models use it, --summary shows it

The recipes' new files are written into a folder put on sys.path (the optimizer's into a folder added to the
core.optimizers package), the registry entries added with monkeypatch: nothing else is touched. The initializer
and optimizer shown in the recipes compute what the Keras piece of the same name computes.
"""
import dataclasses
import importlib.util
import json
import math
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from absl import flags

keras = pytest.importorskip("keras")

import datasets  # noqa: E402
import models  # noqa: E402
from app.settings import make_config  # noqa: E402
from core import cli, data, layers, names, optimizers  # noqa: E402
from core.initializers import fans  # noqa: E402
from core.optimizers import Optimizer  # noqa: E402
from core.runner import Runner  # noqa: E402
from core.trainer import Trainer  # noqa: E402
from keras_twins import KERAS_TWINS  # noqa: E402
from models import ModelSpec  # noqa: E402
from train_in_process import train_command  # noqa: E402

TESTS = Path(__file__).resolve().parent


@dataclasses.dataclass(frozen=True)
class HeUniform:
    """w ~ U(-L, L), L = sqrt(6 / fan_in)  (He et al. 2015, for ReLU layers)."""

    def __call__(self, shape, dtype):
        fan_in, _ = fans(shape)
        limit = math.sqrt(6.0 / fan_in)
        return tf.random.uniform(shape, minval=-limit, maxval=limit, dtype=dtype)


class Adagrad(Optimizer):
    """accumulator = accumulator + g^2;  w = w - lr * g / sqrt(accumulator + epsilon)."""

    def __init__(self, learning_rate, initial_accumulator_value=0.1, epsilon=1e-7, name=None):
        super().__init__(learning_rate, name=name or "adagrad")
        self.initial, self.epsilon = initial_accumulator_value, epsilon
        self.accumulators = []

    def _create_slots(self, variables):
        self.accumulators = [tf.Variable(tf.fill(w.shape, tf.cast(self.initial, w.dtype)), trainable=False,
                                         name="accumulator") for w in variables]

    def _update(self, g, w, i, lr):
        accumulator = self.accumulators[i]
        accumulator.assign_add(tf.square(g))
        w.assign_sub(lr * g / tf.sqrt(accumulator + self.epsilon))


@pytest.mark.parametrize("shape", [(784, 200), (5, 5, 6, 12)])
def test_he_uniform_draws_what_keras_he_uniform_draws(shape):
    """Keras draws with its own generators, so the values differ: the bound and the moments must agree."""
    fan_in = fans(shape)[0]
    limit = math.sqrt(6.0 / fan_in)
    tf.random.set_seed(3)
    ours = HeUniform()(shape, tf.float32).numpy()
    theirs = np.asarray(keras.initializers.HeUniform(seed=3)(shape, dtype="float32"))
    n = ours.size
    for w in (ours, theirs):
        assert w.shape == shape and w.dtype == np.float32
        assert np.abs(w).max() <= limit
        assert np.abs(w).max() > limit * (1 - 20 / n)  # the bound is reached, not a narrower one
        assert abs(w.mean()) < 5 * limit / math.sqrt(3 * n)  # mean 0 within 5 standard errors
        assert w.std() == pytest.approx(limit / math.sqrt(3), rel=0.02)  # Var = L^2 / 3 = 2 / fan_in
    assert ours.std() == pytest.approx(theirs.std(), rel=0.03)
    assert ours.std() ** 2 == pytest.approx(2.0 / fan_in, rel=0.04)


def test_he_uniform_in_a_layer_is_seeded_and_in_the_layer_dtype():
    def build(seed, dtype):
        tf.random.set_seed(seed)
        dense = layers.Dense(200, w_init=HeUniform())
        dense(tf.zeros([1, 784], dtype))
        return dense.w

    a, b, c = build(1, tf.float32), build(1, tf.float32), build(2, tf.float32)
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert not np.array_equal(a.numpy(), c.numpy())
    assert build(1, tf.float64).dtype == tf.float64


@pytest.mark.parametrize("use_tf_function", [False, True])
def test_adagrad_matches_keras_adagrad_over_50_steps(use_tf_function):
    rng = np.random.default_rng(0)
    shapes = [(6, 4), (4,), (3, 3, 2, 5)]
    initial = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [[(rng.standard_normal(s) * 10.0 ** rng.integers(-3, 2)).astype(np.float32) for s in shapes]
             for _ in range(50)]
    ours_vars = [tf.Variable(v) for v in initial]
    keras_vars = [keras.Variable(v) for v in initial]
    ours, theirs = Adagrad(0.1), keras.optimizers.Adagrad(0.1)
    ours.build(ours_vars)
    theirs.build(keras_vars)

    def ours_apply(gs):
        ours.apply(gs, ours_vars)

    def theirs_apply(gs):
        theirs.apply_gradients(zip(gs, keras_vars))

    if use_tf_function:  # both compiled: Grappler rounds the same graph the same way on both sides
        ours_apply, theirs_apply = tf.function(ours_apply), tf.function(theirs_apply)
    for gs in grads:
        ours_apply([tf.constant(g) for g in gs])
        theirs_apply([tf.constant(g) for g in gs])
    assert int(ours.step.numpy()) == 50 == int(theirs.iterations.numpy())
    for a, b, start in zip(ours_vars, keras_vars, initial):
        np.testing.assert_array_equal(a.numpy(), np.asarray(b.numpy()))  # 0 ulps
        assert np.abs(a.numpy() - start).max() > 0.1  # the variables really moved
    for accumulator, w in zip(ours.accumulators, ours_vars):
        assert accumulator.shape == w.shape and not accumulator.trainable


def add_module(folder, monkeypatch, name, source):
    """A recipe's one new file: `name`.py in `folder`, which is put on sys.path."""
    (folder / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(folder))


def parsed(*args):
    """train.py's RunConfig for the command line `args`, its flags declared afresh (so they see the registries
    as they are now)."""
    import train
    flag_values = flags.FlagValues()
    train.define_flags(flag_values)
    cli.parse("train.py", ["train.py", *args], flag_values)
    return make_config(train.flag_values_given(flag_values))


def step_losses(model, optimizer, train, steps=8, batch_size=64):
    """The training loss after each of `steps` updates on `train` (core.data.Examples), through Trainer.fit."""
    trainer = Trainer(Runner(model, optimizer), log_every=1, progress=False)
    trainer.fit(lambda epoch: data.training_batches(train, batch_size, seed=1, epoch=epoch), epochs=1,
                steps_per_epoch=steps)
    return [point["loss"] for point in trainer.history.steps]


MOMENTUM = """\
    \"\"\"v = mu * v + g;  w = w - lr * v  (heavy-ball momentum, Polyak 1964).\"\"\"
    import tensorflow as tf

    from core.optimizers import Optimizer


    class Momentum(Optimizer):
        def __init__(self, learning_rate, momentum=0.9, name=None):
            super().__init__(learning_rate, name=name or "momentum")
            self.momentum = momentum
            self.velocities = []

        def _create_slots(self, variables):
            self.velocities = [tf.Variable(tf.zeros_like(w), trainable=False, name="velocity") for w in variables]

        def _update(self, g, w, i, lr):
            v = self.velocities[i]
            v.assign(self.momentum * v + g)
            w.assign_sub(lr * v)
    """


def test_recipe_an_optimizer_is_its_file(tmp_path, monkeypatch, small_mnist):
    """core/optimizers/momentum.py alone: core.names lists it as core.names does on import (without importing
    it), --optimizer=momentum is accepted, and names.optimizer makes its one Optimizer subclass."""
    folder = tmp_path / "optimizers"
    folder.mkdir()
    (folder / "momentum.py").write_text(textwrap.dedent(MOMENTUM))
    package_folders = optimizers.__path__  # the list the import system searches for core.optimizers.<name>
    package_folders.append(str(folder))
    try:
        found = names.modules_of("core.optimizers")
        assert found == {"adam": "core.optimizers.adam", "momentum": "core.optimizers.momentum",
                         "sgd": "core.optimizers.sgd"}
        for name, module in found.items():  # what `import core.names` computes with the file in place
            monkeypatch.setitem(names.OPTIMIZERS, name, module)
        config = parsed("--model=softmax", "--optimizer=momentum", "--learning_rate=0.05")
        optimizer = names.optimizer(config, names.learning_rate_schedule(config, steps_per_epoch=10))
    finally:
        package_folders.remove(str(folder))
        sys.modules.pop("core.optimizers.momentum", None)
        vars(optimizers).pop("momentum", None)
    assert type(optimizer).__name__ == "Momentum" and type(optimizer).__module__ == "core.optimizers.momentum"
    assert float(optimizer.learning_rate(7)) == pytest.approx(0.05)

    # Keras' SGD with momentum keeps m = mu * m - lr * g (= -lr * v at a constant rate) and adds it: the same steps.
    rng = np.random.default_rng(0)
    shapes = [(6, 4), (4,)]
    ours_vars = [tf.Variable(rng.standard_normal(s).astype(np.float32)) for s in shapes]
    keras_vars = [keras.Variable(v.numpy()) for v in ours_vars]
    theirs = keras.optimizers.SGD(0.05, momentum=0.9)
    optimizer.build(ours_vars)
    theirs.build(keras_vars)
    for _ in range(30):
        gradients = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        optimizer.apply([tf.constant(g) for g in gradients], ours_vars)
        theirs.apply_gradients(zip([tf.constant(g) for g in gradients], keras_vars))
    for a, b in zip(ours_vars, keras_vars):
        np.testing.assert_allclose(a.numpy(), np.asarray(b.numpy()), rtol=1e-5, atol=1e-5)

    train = datasets.load(small_mnist, download=False).train
    tf.random.set_seed(1)
    model = models.REGISTRY["softmax"].build(0.0)
    losses = step_losses(model, type(optimizer)(0.05), train)
    assert len(losses) == 8 and losses[-1] < 0.7 * losses[0], losses


def test_recipe_a_data_set_is_one_registry_entry(tmp_path, monkeypatch, small_mnist, capsys):
    """A data set of 512 MNIST training images under a name of its own (its files' URLs are never fetched: they
    are present, and their content MD5s make them this data set's), trained on by train.py's command."""
    from datasets.download import content_md5
    from datasets.idx import FILES

    files = {key: datasets.DataFile(f"https://example.invalid/{name}.gz",
                                    content_md5(str(Path(small_mnist) / f"{name}.gz")))
             for key, name in FILES.items()}
    monkeypatch.setitem(datasets.REGISTRY, "mnist512", datasets.Dataset(
        name="mnist512", title="MNIST's first 512", image_shape=(28, 28, 1), num_classes=10, files=files))
    result = train_command("--dataset=mnist512", f"--data_dir={small_mnist}", "--model=softmax", "--epochs=1",
                           "--batch_size=64", "--learning_rate=0.5", "--optimizer=sgd", f"--logdir={tmp_path}",
                           "--run_name=r", "--noprogress", capsys=capsys)
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "r"
    assert json.loads((run_dir / "config.json").read_text())["dataset"] == "mnist512"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test_accuracy"] > 0.6, metrics  # 8 steps of softmax regression on 512 digits


WIDE_MODULE = """\
    from core.layers import Dense, Dropout, Flatten, Sequential


    def wide(dropout=0.2, num_classes=10):
        \"\"\"x[N, H*W*C] -> 400 ReLU -> [dropout] -> logits [N, num_classes].\"\"\"
        layers = [Flatten(name="flatten"), Dense(400, activation="relu", name="dense1")]
        if dropout:
            layers.append(Dropout(dropout, name="dropout1"))
        layers.append(Dense(num_classes, name="logits"))
        return Sequential(layers, name="wide")
    """


def fresh_module(path):
    """The test module at `path` imported anew: its parametrize lists are read from the registries as they are now."""
    spec = importlib.util.spec_from_file_location(f"recipe_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parametrized_names(module):
    """{test name: the values of its "name" parameter} for every test of `module` parametrized over models."""
    found = {}
    for test_name, test in vars(module).items():
        for mark in getattr(test, "pytestmark", []):
            if test_name.startswith("test_") and mark.name == "parametrize" and mark.args[0] == "name":
                found[test_name] = list(mark.args[1])
    return found


def test_recipe_a_model_is_its_file_and_one_entry_and_the_tests_find_it(tmp_path, monkeypatch, capsys):
    add_module(tmp_path, monkeypatch, "recipe_wide", WIDE_MODULE)
    monkeypatch.setitem(models.REGISTRY, "wide", ModelSpec(
        build="recipe_wide:wide", settings=dict(learning_rate=0.003, dropout=0.2),
        source="where each setting comes from", description="784 -> 400 -> 10, ReLU, dropout 0.2",
        target=">= 98% test accuracy"))
    monkeypatch.setitem(KERAS_TWINS, "wide", lambda: keras.Sequential([
        keras.Input((28, 28, 1)), keras.layers.Flatten(), keras.layers.Dense(400, activation="relu"),
        keras.layers.Dropout(0.2), keras.layers.Dense(10)]))

    every_model = list(models.REGISTRY)
    for path in ("test_models.py", "test_backprop.py", "test_train_cli.py"):
        module = fresh_module(TESTS / path)
        by_test = parametrized_names(module)
        assert by_test and all(values == every_model for values in by_test.values()), (path, by_test)
        if path == "test_models.py":
            module.test_registry_names_are_the_interface()
            module.test_parameter_counts_equal_keras_twin("wide")
            module.test_every_model_takes_other_images_and_classes("wide")

    config = parsed("--model=wide")
    assert (config.learning_rate, config.dropout, config.batch_size) == (0.003, 0.2, 128)  # the rest: defaults
    assert [layer.name for layer in models.REGISTRY["wide"].build(0.0).layers] == ["flatten", "dense1", "logits"]
    with pytest.raises(ValueError, match="per-model"):
        ModelSpec(build="recipe_wide:wide", settings=dict(log_every=5), source="", description="", target="")
    result = train_command("--model=wide", "--summary", capsys=capsys)
    assert result.returncode == 0, result.stderr
    assert "Total params: 318,010" in result.stdout and "dropout1" in result.stdout


SCALE_LAYER = """\
    \"\"\"y = x * s: a learned scale per feature, s [C] (initially 1).\"\"\"
    import tensorflow as tf

    from core.layers import Dense, Flatten, Sequential
    from core.module import Layer


    class Scale(Layer):
        def _create_variables(self, input_shape):
            self.s = tf.Variable(tf.ones(input_shape[-1:], self.dtype), name="s")

        def _forward(self, x, training):
            return x * self.s


    def scaled(dropout=0.0, num_classes=10):
        \"\"\"x[N, H*W*C] -> 64 ReLU -> scale -> logits [N, num_classes].\"\"\"
        return Sequential([Flatten(name="flatten"), Dense(64, activation="relu", name="dense1"),
                           Scale(name="scale"), Dense(num_classes, name="logits")], name="scaled")
    """


def test_recipe_a_layer_is_its_file_and_its_test(tmp_path, monkeypatch, small_mnist, capsys):
    """The layer's own test: its gradient (through the tape) against finite differences; then a model using it
    trains and shows it in --summary."""
    add_module(tmp_path, monkeypatch, "recipe_scale", SCALE_LAYER)
    import recipe_scale

    layer = recipe_scale.Scale()
    x = tf.constant(np.random.default_rng(0).standard_normal((3, 5)), tf.float64)
    layer(x)
    layer.s.assign(tf.range(1.0, 6.0, dtype=tf.float64))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.sin(layer(x)))
    analytic = tape.gradient(loss, layer.s).numpy()
    h, s0 = 1e-6, layer.s.numpy()
    numeric = []
    for j in range(5):
        values = []
        for sign in (1, -1):
            layer.s.assign(s0 + sign * h * np.eye(5)[j])
            values.append(float(tf.reduce_sum(tf.sin(layer(x)))))
        numeric.append((values[0] - values[1]) / (2 * h))
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6)
    np.testing.assert_allclose(analytic, (x.numpy() * np.cos(x.numpy() * s0)).sum(axis=0), rtol=1e-12)

    train = datasets.load(small_mnist, download=False).train
    tf.random.set_seed(1)
    model = recipe_scale.scaled()
    losses = step_losses(model, optimizers.Adam(0.003), train)
    assert losses[-1] < 0.7 * losses[0], losses
    assert not np.allclose(model.layers[2].s.numpy(), 1.0)  # the scale learned too

    monkeypatch.setitem(models.REGISTRY, "scaled", ModelSpec(
        build="recipe_scale:scaled", description="784 -> 64 -> scale -> 10", target="", source=""))
    result = train_command("--model=scaled", "--summary", capsys=capsys)
    assert result.returncode == 0, result.stderr
    assert "y = scale(x[N,64])" in result.stdout, result.stdout
