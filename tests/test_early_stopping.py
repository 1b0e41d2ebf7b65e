"""Early stopping and the best epoch's weights: the rule, in the API on real MNIST, and across a SIGKILL of
train.py (the patience counter and the best weights are in the checkpoint)."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import lab
from core.early_stopping import EarlyStopping
from core.trainer import Callback

REPO = Path(__file__).resolve().parents[1]

# dense at a high learning rate, 10 steps an epoch: the test loss falls for 3 epochs and rises at the 4th
# (0.824, 0.450, 0.361, 0.368, ...), so patience 1 stops after epoch 4 with epoch 3 the best.
FAST = dict(epochs=8, steps_per_epoch=10, learning_rate=0.02, log_every=10)


def test_the_rule_counts_epochs_without_improvement():
    stopping = EarlyStopping(patience=2, metric="val_loss")
    decisions = [stopping.update(epoch, {"val_loss": value})
                 for epoch, value in enumerate([1.0, 0.8, 0.9, 0.8], start=1)]
    assert decisions == [False, False, False, True]  # 0.8 again is no improvement
    assert stopping.summary() == {"metric": "val_loss", "best": 0.8, "best_epoch": 2, "patience": 2,
                                  "stopped_epoch": 4, "restore_best": False}
    accuracy = EarlyStopping(patience=1, metric="val_accuracy")
    assert [accuracy.update(e, {"val_accuracy": v}) for e, v in [(1, 0.9), (2, 0.95), (3, 0.95)]] == \
        [False, False, True]
    with pytest.raises(ValueError, match="metric must be one of"):
        EarlyStopping(metric="val_acc")
    with pytest.raises(ValueError, match="lack"):
        EarlyStopping(patience=1).update(1, {"loss": 1.0})


class Weights(Callback):
    """The model's weights at every epoch end."""

    def __init__(self, model):
        self.model, self.epochs = model, []

    def on_epoch_end(self, epoch, step, logs):
        self.epochs.append([v.numpy() for v in self.model.variables])


def test_fit_stops_and_ends_with_the_best_epochs_weights(mnist_dir):
    data = lab.mnist(mnist_dir)
    config = lab.settings("dense", **FAST)
    model = lab.build("dense", config, data)
    weights = Weights(model)
    history = lab.fit(model, data, config, callbacks=[weights], early_stopping=1, restore_best=True)
    losses = [e["val_loss"] for e in history.epochs]
    assert len(losses) == 4 and losses[3] > losses[2] == min(losses), losses
    assert history.stopped == {"reason": "early_stopping", "epoch": 4, "metric": "val_loss", "best": losses[2],
                               "best_epoch": 3, "patience": 1, "stopped_epoch": 4, "restore_best": True,
                               "restored": True}
    for now, best, last in zip(model.variables, weights.epochs[2], weights.epochs[3]):
        np.testing.assert_array_equal(now.numpy(), best)
    assert any((b != l).any() for b, l in zip(weights.epochs[2], weights.epochs[3]))
    assert lab.evaluate(model, data.test)["loss"] == pytest.approx(losses[2], rel=1e-5)


def train(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], capture_output=True, text=True,
                          env=env, timeout=300)


def _checkpoint_number(run_dir):
    index = run_dir / "checkpoints" / "checkpoint"
    found = re.search(r'^model_checkpoint_path: "ckpt-(\d+)"', index.read_text(), re.M) if index.exists() else None
    return int(found.group(1)) if found else 0


def _early_stopping_state(run_dir):
    reader = tf.train.load_checkpoint(str(run_dir / "checkpoints"))
    return {key: reader.get_tensor(key) for key in reader.get_variable_to_shape_map()
            if key.startswith("early_stopping/")}


def test_train_py_killed_and_resumed_stops_at_the_same_epoch_with_the_same_weights(mnist_dir, tmp_path):
    """Saves every 5 steps: ckpt-6 is epoch 3's end (the best epoch, its weights copied), ckpt-7 is step 35.
    The run killed after ckpt-7 and resumed must stop after epoch 4 and test epoch 3's weights, as the
    straight run does."""
    common = ["--model=dense", *(f"--{k}={v}" for k, v in FAST.items()), "--checkpoint_every=5",
              "--steps_per_loop=5", "--early_stopping=1", "--restore_best", "--noprogress",
              f"--data_dir={mnist_dir}", f"--logdir={tmp_path}"]
    straight = train(*common, "--run_name=straight")
    assert straight.returncode == 0, straight.stderr
    assert re.search(r"^stopped early after epoch 4: no better val_loss than epoch 3's [\d.]+ for 1 epoch$",
                     straight.stdout, re.M), straight.stdout
    assert re.search(r"^weights: epoch 3's \(best val_loss [\d.]+\), tested and exported$", straight.stdout, re.M)

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    victim = subprocess.Popen([sys.executable, str(REPO / "train.py"), *common, "--run_name=killed"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while victim.poll() is None and _checkpoint_number(tmp_path / "killed") < 7 and time.monotonic() < deadline:
            time.sleep(0.002)
        victim.kill()
    finally:
        victim.wait()
    assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    resumed = train(*common, "--run_name=killed")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout and "epoch 3/8" not in resumed.stdout and "epoch 5/8" not in resumed.stdout

    metrics = [json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("straight", "killed")]
    assert metrics[0]["stopped"] == metrics[1]["stopped"]
    assert metrics[0]["stopped"]["reason"] == "early_stopping" and metrics[0]["stopped"]["best_epoch"] == 3
    assert metrics[0]["epochs"] == metrics[1]["epochs"] == 4 and metrics[0]["steps"] == metrics[1]["steps"] == 40
    assert (metrics[0]["test_loss"], metrics[0]["test_accuracy"]) == (metrics[1]["test_loss"],
                                                                      metrics[1]["test_accuracy"])
    states = [_early_stopping_state(tmp_path / name) for name in ("straight", "killed")]
    assert any("best_weights" in key for key in states[0]) and states[0].keys() == states[1].keys()
    for key in states[0]:
        assert (states[0][key] == states[1][key]).all(), key
