"""Data parallelism on two logical CPUs (tests/conftest.py): 2 replicas at global batch 2B compute what 1 replica
computes at batch 2B, step for step; replicas never drift; per-replica BatchNorm statistics are each slice's;
checkpoints move between replica counts. Small synthetic images keep each test a few seconds."""
import glob
import shutil

import numpy as np
import pytest
import tensorflow as tf

import train
from app import export
from core import distribute
from core.layers import BatchNorm, Dense, Flatten, Sequential
from core.optimizers import SGD, Adam
from core.runner import Runner
from core.trainer import Trainer
from models import REGISTRY, conv

GLOBAL_BATCH = 8


def images_and_labels(examples=48, size=12, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.random((examples, size, size, 1), dtype=np.float32),
            rng.integers(0, 10, examples).astype(np.int32))


def batches(examples=48, size=12, batch=GLOBAL_BATCH):
    return tf.data.Dataset.from_tensor_slices(images_and_labels(examples, size)).batch(batch, drop_remainder=True)


def mirrored():
    strategy = distribute.make_strategy("mirrored")
    assert strategy.num_replicas_in_sync == 2
    return strategy


def dense_model():
    return Sequential([Flatten(), Dense(32, activation="relu"), Dense(10)])


def conv_bn_model(synchronized=False):
    model = conv.conv_bn(dropout=0.0)
    for layer in model.layers:
        if isinstance(layer, BatchNorm):
            layer.synchronized = synchronized
    return model


def runner_for(make_model, strategy, optimizer=lambda: SGD(0.05), size=12, like=None):
    """A built Runner under `strategy`; with `like`, its model starts from `like`'s weights."""
    with strategy.scope():
        model = make_model()
        runner = Runner(model, optimizer(), strategy=strategy)
    runner.build((None, size, size, 1))
    if like is not None:
        for mine, theirs in zip(model.variables, like.model.variables):
            mine.assign(theirs.read_value())
    return runner


def values(variable):
    """Every replica's copy of `variable` (one for a plain variable)."""
    return [v.numpy() for v in getattr(variable, "values", [variable])]


def max_difference(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


@pytest.mark.parametrize("name, make_model", [("dense", dense_model),
                                              ("conv_bn, sync batch norm", lambda: conv_bn_model(True))])
def test_two_replicas_equal_one_replica_step_for_step(name, make_model):
    """Equal to float32 rounding: the sums split 8 or 4 + 4 ways round differently. Seeded, as the rounding
    differences depend on the weights drawn: after 4 steps of conv_bn they were 2.4e-7 to 5.5e-7 over 8 seeds, and
    an unseeded draw now and then passed 1e-6."""
    tf.random.set_seed(1)
    one = runner_for(make_model, tf.distribute.get_strategy())
    two = runner_for(make_model, mirrored(), like=one)
    one_batches = iter(one.distribute(batches()))
    two_batches = iter(two.distribute(batches()))
    for step in range(4):
        one.train(one_batches, tf.constant(1))
        two.train(two_batches, tf.constant(1))
        one_weights = [v.numpy() for v in one.model.variables]
        two_weights = [v.read_value().numpy() for v in two.model.variables]
        assert max_difference(one_weights, two_weights) < 1e-6, f"{name}, step {step + 1}"
    assert max_difference(one_weights, [v.numpy() for v in runner_for(make_model, one.strategy).model.variables]) > 1e-3
    assert int(two.optimizer.step.numpy()) == 4
    # The metrics (ON_READ, SUM) read as the global batch's: each replica added its own 4 examples per step.
    assert float(two.train_accuracy.count.numpy()) == 4 * GLOBAL_BATCH
    assert float(two.train_loss.result()) == pytest.approx(float(one.train_loss.result()), rel=1e-6)


def test_replicas_never_drift():
    """After Adam steps on conv_bn with dropout and per-replica batch norm, every mirrored variable (weights, Adam's
    m, v and step, the runner's state) is identical on both replicas; only the ON_READ ones may differ."""
    strategy = mirrored()
    with strategy.scope():
        model = conv.conv_bn(dropout=0.3)
        runner = Runner(model, Adam(0.01), strategy=strategy)
    runner.build((None, 12, 12, 1))
    runner.train(iter(runner.distribute(batches())), tf.constant(5))
    mirrored_variables = [v for v in runner.variables if v.synchronization != tf.VariableSynchronization.ON_READ]
    assert len(mirrored_variables) > 20
    for variable in mirrored_variables:
        first, second = values(variable)
        np.testing.assert_array_equal(first, second, err_msg=variable.name)
    per_replica = [v for v in model.variables if v.synchronization == tf.VariableSynchronization.ON_READ]
    assert per_replica and all(v.aggregation == tf.VariableAggregation.MEAN for v in per_replica)
    assert any(np.any(values(v)[0] != values(v)[1]) for v in per_replica)  # each replica's own statistics


def test_a_forgotten_all_reduce_is_caught_as_drift(monkeypatch):
    monkeypatch.setattr(distribute, "all_reduce_gradients", lambda loss, gradients: (loss, gradients))
    strategy = mirrored()
    runner = runner_for(dense_model, strategy)
    runner.train(iter(runner.distribute(batches())), tf.constant(2))
    first, second = values(runner.model.layers[1].w)
    assert np.max(np.abs(first - second)) > 1e-4


def test_per_replica_batch_norm_statistics_are_each_slices():
    """Without sync, replica r's moving mean after one step is (1 - momentum) * mean(z over its slice) and its
    moving variance momentum + (1 - momentum) * var(z over its slice), z = x w the BatchNorm's input; their read
    value is the mean over replicas."""
    def model():
        return Sequential([Flatten(), Dense(6, use_bias=False), BatchNorm(momentum=0.9), Dense(10)])

    strategy = mirrored()
    runner = runner_for(model, strategy, size=4)
    images, labels = images_and_labels(GLOBAL_BATCH, size=4)
    w = runner.model.layers[1].w.read_value().numpy()
    runner.train(iter(runner.distribute(tf.data.Dataset.from_tensors((images, labels)))), tf.constant(1))
    norm = runner.model.layers[2]
    z = images.reshape(GLOBAL_BATCH, -1).astype(np.float64) @ w.astype(np.float64)
    half = GLOBAL_BATCH // 2
    for replica, rows in enumerate((slice(0, half), slice(half, GLOBAL_BATCH))):
        np.testing.assert_allclose(values(norm.moving_mean)[replica], 0.1 * z[rows].mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(values(norm.moving_variance)[replica], 0.9 + 0.1 * z[rows].var(0), rtol=1e-5)
    np.testing.assert_allclose(norm.moving_mean.read_value().numpy(), 0.1 * z.mean(0), rtol=1e-5, atol=1e-6)


def test_sync_batch_norm_moments_are_the_global_batchs():
    x = tf.constant(images_and_labels(GLOBAL_BATCH, size=3)[0])
    strategy = mirrored()
    per_replica = strategy.experimental_distribute_values_from_function(
        lambda context: x[context.replica_id_in_sync_group * 4:(context.replica_id_in_sync_group + 1) * 4])
    results = strategy.run(lambda part: distribute.cross_replica_moments(part, [0, 1, 2]), args=(per_replica,))
    for mean, variance in zip(*(strategy.experimental_local_results(r) for r in results)):
        np.testing.assert_allclose(mean.numpy(), np.mean(x.numpy(), axis=(0, 1, 2)), rtol=1e-6)
        np.testing.assert_allclose(variance.numpy(), np.var(x.numpy(), axis=(0, 1, 2)), rtol=1e-5)


def fit(strategy, checkpoint_dir, epochs):
    """Trainer.fit on conv_bn (sync batch norm, SGD), 3 steps per epoch; returns the trainer."""
    tf.random.set_seed(3)
    with strategy.scope():
        model, optimizer = conv_bn_model(synchronized=True), SGD(0.05)
    trainer = Trainer(Runner(model, optimizer, strategy=strategy), checkpoint_dir=str(checkpoint_dir), progress=False,
                      log_every=1)
    data = lambda epoch: batches(examples=48).shuffle(6, seed=epoch, reshuffle_each_iteration=False)  # noqa: E731
    trainer.fit(data, epochs=epochs, steps_per_epoch=3)
    return trainer


def first_epoch_checkpoint(run_dir, directory):
    """`directory` holding only the checkpoint a run in `run_dir` saved at the end of its first epoch (step 3),
    as a run of that one epoch leaves it."""
    directory.mkdir()
    for path in glob.glob(str(run_dir / "ckpt-1.*")):
        shutil.copy(path, directory)
    assert tf.train.load_checkpoint(str(directory / "ckpt-1")).get_tensor(
        "optimizer/step/.ATTRIBUTES/VARIABLE_VALUE") == 3
    return directory


def test_checkpoints_move_between_replica_counts(tmp_path):
    """The first epoch on 2 replicas resumed on 1, and on 1 resumed on 2: each ends as 2 epochs straight on the
    replica count it resumed on."""
    strategies = {1: tf.distribute.get_strategy(), 2: mirrored()}
    straight = {count: fit(strategy, tmp_path / f"straight{count}", epochs=2) for count, strategy in strategies.items()}
    for first, then in ((2, 1), (1, 2)):
        moved = first_epoch_checkpoint(tmp_path / f"straight{first}", tmp_path / f"moved{first}to{then}")
        resumed = fit(strategies[then], moved, epochs=2)
        assert resumed.restored_from and int(resumed.optimizer.step.numpy()) == 6
        assert max_difference([v.read_value().numpy() for v in straight[then].model.variables],
                              [v.read_value().numpy() for v in resumed.model.variables]) < 1e-5, (first, then)
        for a, b in zip(straight[then].history.steps, resumed.history.steps):
            assert a["step"] == b["step"] and a["loss"] == pytest.approx(b["loss"], abs=1e-5)


def test_the_global_batch_must_divide_among_replicas():
    with pytest.raises(distribute.DistributeError, match="--batch_size=9 .* 2 replicas"):
        distribute.replica_batch_size(9, mirrored())
    assert distribute.replica_batch_size(8, mirrored()) == 4


def test_bad_strategy_and_a_model_outside_the_scope():
    with pytest.raises(distribute.DistributeError, match="unknown strategy 'tpu'"):
        distribute.make_strategy("tpu")
    with pytest.raises(distribute.DistributeError, match="already started with 2"):
        distribute.configure_cpu_devices(3)
    runner = Runner(dense_model(), SGD(0.1), strategy=mirrored())
    with pytest.raises(ValueError, match="outside the strategy's scope"):
        runner.build((None, 4, 4, 1))
    with mirrored().scope():
        model = dense_model()
    runner = Runner(model, SGD(0.1), strategy=mirrored())
    with pytest.raises(ValueError, match="variable step:0 was created outside"):
        runner.build((None, 4, 4, 1))


def test_a_failed_collective_names_the_lost_worker(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["127.0.0.1:4001", "127.0.0.1:4002"]}, '
                                    '"task": {"type": "worker", "index": 0}}')
    gone = ("Op at device /job:worker/replica:0/task:0/device:CPU:0 ... aborted by: remote target "
            "/job:worker/replica:0/task:1 while calling RecvBuf")
    assert distribute.lost_worker(gone) == "worker 1 (127.0.0.1:4002)"
    assert distribute.lost_worker("failed to connect to ipv4:127.0.0.1:4002: refused") == "worker 1 (127.0.0.1:4002)"
    assert distribute.lost_worker("/job:worker/replica:0/task:0 Deadline Exceeded") is None


@pytest.mark.parametrize("name", ["dense", "conv", "conv_bn"])
def test_a_mirrored_model_exports_what_one_process_restores(name, tmp_path):
    """A model on 2 replicas, with random weights and different BatchNorm statistics on each replica (as
    training leaves them), checkpointed and exported: the SavedModel's probabilities are those of the model
    restored from the checkpoint without a strategy (which holds the statistics' mean)."""
    spec, strategy = REGISTRY[name], mirrored()
    with strategy.scope():
        model = spec.build(spec.defaults["dropout"])
        model.build((None, 28, 28, 1))
    rng = np.random.default_rng(7)
    per_replica = [v for v in model.variables if v.synchronization == tf.VariableSynchronization.ON_READ]
    for variable in model.trainable_variables:
        variable.assign(rng.normal(0.0, 0.1, variable.shape).astype(np.float32))
    for variable in per_replica:
        for copy in variable.values:
            copy.assign(variable.read_value() + rng.uniform(0.0, 0.5, variable.shape).astype(np.float32))
    saved = tf.train.Checkpoint(model=model).write(str(tmp_path / "ckpt"))
    exported = export.Classifier(export.export_saved_model(model, tmp_path / "saved_model"))

    restored = spec.build(spec.defaults["dropout"])
    restored.build((None, 28, 28, 1))
    tf.train.Checkpoint(model=restored).read(saved).assert_existing_objects_matched()
    images = images_and_labels(16, size=28, seed=5)[0]
    probabilities = restored.predict(images).numpy()
    np.testing.assert_allclose(exported(images)[0], probabilities, atol=1e-6)
    assert np.ptp(probabilities) > 0.01
    assert len(per_replica) == (8 if name == "conv_bn" else 0)
    assert all(np.all(values(v)[0] != values(v)[1]) for v in per_replica)


def test_cpu_devices_are_bounded_by_the_cores(monkeypatch):
    monkeypatch.setattr(distribute.os, "cpu_count", lambda: 2)
    with pytest.raises(distribute.DistributeError, match=r"^--cpu_devices=256 is more than this machine can run: "
                                                         r"at most 8 \(4 per core, 2 cores\)$"):
        distribute.configure_cpu_devices(256)


def test_distribution_flags_need_their_strategy():
    with pytest.raises(train.FlagError, match=r"^--cpu_devices splits the CPU into the replicas of "
                                              r"--strategy=mirrored; add that or drop --cpu_devices$"):
        train.make_config({"model": "dense", "cpu_devices": 2})
    with pytest.raises(train.FlagError, match="^--cpu_devices splits"):
        train.make_config({"model": "dense", "cpu_devices": 2, "strategy": "multi_worker"})
    with pytest.raises(train.FlagError, match=r"^--sync_batch_norm .* needs --strategy=mirrored or multi_worker$"):
        train.make_config({"model": "conv_bn", "sync_batch_norm": True})
    config = train.make_config({"model": "conv_bn", "strategy": "mirrored", "cpu_devices": 2, "sync_batch_norm": True})
    assert (config.cpu_devices, config.sync_batch_norm) == (2, True)
    assert train.make_config({"model": "conv_bn", "sync_batch_norm": False}).strategy == "default"


def test_a_failed_export_names_its_reason(monkeypatch, tmp_path):
    """TensorFlow's save errors put the reason on the line after '... for the following reason(s):'."""
    def refuse(model, export_dir):
        raise ValueError("Unable to save function b'__inference_signature_wrapper_7' for the following reason(s):\n"
                         "\nConcreteFunction that uses distributed variables in certain way cannot be saved.\n"
                         "If you're saving with\n")

    monkeypatch.setattr(export, "export_saved_model", refuse)
    from app.run import export_model
    with pytest.raises(train.RunError) as caught:
        export_model(dense_model(), str(tmp_path / "saved_model"), str(tmp_path / "run"))
    assert str(caught.value).startswith(
        "export failed (ValueError: Unable to save function b'__inference_signature_wrapper_7' for the following "
        "reason(s): ConcreteFunction that uses distributed variables in certain way cannot be saved.); the trained "
        f"weights are in {tmp_path / 'run' / 'checkpoints'}")


@pytest.mark.parametrize("tf_config, message", [
    (None, "--strategy=multi_worker needs the TF_CONFIG environment variable (see docs/distributed.md, or start "
           "local workers with python -m cluster.launch)"),
    ("{'cluster': 1}", "TF_CONFIG is not valid JSON: Expecting property name enclosed in double quotes: line 1 "
                       "column 2 (char 1)"),
    ('{"cluster": {}, "task": {"type": "worker", "index": 0}}',
     'TF_CONFIG has no cluster of "chief" or "worker" addresses (see docs/distributed.md)'),
    ('{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 3}}',
     'TF_CONFIG\'s task {"type": "worker", "index": 3} is not one of its cluster\'s (worker 0..0)'),
    ('{"cluster": {"chief": ["h:1"], "worker": ["h:2", "h:3"]}, "task": {"type": "ps", "index": 0}}',
     'TF_CONFIG\'s task {"type": "ps", "index": 0} is not one of its cluster\'s (chief 0..0, worker 0..1)'),
    ('{"cluster": {"worker": ["127.0.0.1:1"]}}', "TF_CONFIG's task null is not one of its cluster's (worker 0..0)"),
])
def test_a_tf_config_that_names_no_task_of_its_cluster_is_one_line(monkeypatch, tf_config, message):
    """Checked before TensorFlow starts a server (an index past the cluster was a traceback)."""
    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", tf_config)
    with pytest.raises(distribute.DistributeError) as raised:
        distribute.make_strategy("multi_worker")
    assert str(raised.value) == message
