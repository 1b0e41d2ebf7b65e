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
# (0.824, 0.450, 0.361, 0.368, ...), so patience 1 stops after epoch 4 with epoch 3 the best. Without XLA
# (the same figures): its compilation would be most of each run's time.
FAST = dict(epochs=8, steps_per_epoch=10, learning_rate=0.02, log_every=10, jit_compile=False)


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


@pytest.fixture(scope="module")
def stopped_run(mnist_dir):
    """lab.fit of dense with FAST, early_stopping=1, restore_best: (model, history, weights at each epoch end)."""
    data = lab.mnist(mnist_dir)
    config = lab.settings("dense", **FAST)
    model = lab.build("dense", config, data)
    weights = Weights(model)
    history = lab.fit(model, data, config, callbacks=[weights], early_stopping=1, restore_best=True)
    return model, history, weights.epochs, data


def test_fit_stops_and_ends_with_the_best_epochs_weights(stopped_run):
    model, history, weights, data = stopped_run
    losses = [e["val_loss"] for e in history.epochs]
    assert len(losses) == 4 and losses[3] > losses[2] == min(losses), losses
    assert history.stopped == {"reason": "early_stopping", "epoch": 4, "metric": "val_loss", "best": losses[2],
                               "best_epoch": 3, "patience": 1, "stopped_epoch": 4, "restore_best": True,
                               "restored": True}
    for now, best in zip(model.variables, weights[2]):
        np.testing.assert_array_equal(now.numpy(), best)
    assert any((b != last).any() for b, last in zip(weights[2], weights[3]))
    assert lab.evaluate(model, data.test)["loss"] == pytest.approx(losses[2], rel=1e-5)


def _checkpoint_number(run_dir):
    index = run_dir / "checkpoints" / "checkpoint"
    found = re.search(r'^model_checkpoint_path: "ckpt-(\d+)"', index.read_text(), re.M) if index.exists() else None
    return int(found.group(1)) if found else 0


def test_train_py_killed_and_resumed_stops_at_the_same_epoch_with_the_same_weights(stopped_run, mnist_dir,
                                                                                   tmp_path, capsys):
    """train.py saves every 5 steps: ckpt-6 is epoch 3's end (the best epoch, its weights copied), ckpt-7 step 35.
    Killed (SIGKILL, in a process of its own) after ckpt-7 and resumed (here, by train.run with the same
    settings), it must stop after epoch 4 and test epoch 3's weights, bit for bit as the uninterrupted lab.fit
    above (one path: the same trainer, batches and early stopping)."""
    import train
    model, history, _, _ = stopped_run
    settings = {**FAST, "checkpoint_every": 5, "steps_per_loop": 5, "early_stopping": 1, "restore_best": True}
    flags = [f"--{key}={value}" for key, value in settings.items()]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    victim = subprocess.Popen([sys.executable, str(REPO / "train.py"), "--model=dense", *flags, "--noprogress",
                               f"--data_dir={mnist_dir}", f"--logdir={tmp_path}", "--run_name=killed"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while victim.poll() is None and _checkpoint_number(tmp_path / "killed") < 7 and time.monotonic() < deadline:
            time.sleep(0.002)
        victim.kill()
    finally:
        victim.wait()
    assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    lines = []
    train.run(train.make_config({"model": "dense", **settings, "progress": False, "data_dir": mnist_dir,
                                 "logdir": str(tmp_path), "run_name": "killed"}), out=lines.append)
    out = "\n".join(lines) + capsys.readouterr().out
    assert "resuming" in out and "epoch 3/8" not in out and "epoch 5/8" not in out, out
    assert re.search(r"^stopped early after epoch 4: no better val_loss than epoch 3's [\d.]+ for 1 epoch$", out, re.M)
    assert re.search(r"^weights: epoch 3's \(best val_loss [\d.]+\), tested and exported$", out, re.M), out

    metrics = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    assert metrics["stopped"] == history.stopped
    assert metrics["epochs"] == 4 and metrics["steps"] == 40
    assert metrics["test_loss"] == history.stopped["best"]  # the test set is the validation set
    reader = tf.train.load_checkpoint(str(tmp_path / "killed" / "checkpoints"))
    for i, variable in enumerate(model.variables):
        saved = reader.get_tensor(f"early_stopping/best_weights/{i}/.ATTRIBUTES/VARIABLE_VALUE")
        np.testing.assert_array_equal(saved, variable.numpy())
