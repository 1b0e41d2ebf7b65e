"""The learning-rate range test: dense on MNIST suggests a rate within a factor 10 of the codelab's 0.001-0.01;
train.py --find_lr writes lr_find.png, prints the suggestion and touches no run directory."""
import os

import numpy as np

import lab
from lab.lr_finder import suggest


def test_suggest_picks_the_steepest_fall_before_the_minimum():
    rates = np.logspace(-6, 0, 61)
    loss = 2.3 - 2.0 / (1 + np.exp(-(np.log10(rates) + 3) * 3)) + np.where(rates > 0.1, 50 * (rates - 0.1), 0)
    assert abs(np.log10(suggest(rates, loss)) + 3) <= 0.1   # the logistic falls fastest at 1e-3


def test_dense_on_mnist_suggests_the_codelabs_range_and_train_py_writes_the_picture(mnist_dir, tmp_path,
                                                                                      monkeypatch):
    import train
    from models import REGISTRY
    config = train.make_config({"model": "dense", "data_dir": mnist_dir, "logdir": str(tmp_path / "runs"),
                                "progress": False, "jit_compile": False}, REGISTRY)   # no XLA: a faster test
    lines = []
    monkeypatch.chdir(tmp_path)
    result = train.find_learning_rate(config, out=lines.append)
    assert 0.0001 <= result.suggestion <= 0.1, result.suggestion
    assert result.learning_rates[0] == np.float32(1e-7) and np.all(np.diff(result.learning_rates) > 0)
    assert result.diverged and len(result.losses) < 300   # dense diverges before 10
    assert lines[-1].startswith(f"suggested --learning_rate={result.suggestion:.2g}")
    assert (tmp_path / "lr_find.png").stat().st_size > 10_000
    assert sorted(os.listdir(tmp_path)) == ["lr_find.png"]   # no run directory, no logdir
    model = lab.build("dense", lab.settings("dense"))
    before = [v.numpy() for v in model.variables]
    lab.find_lr(model, lab.mnist(mnist_dir).subset(train=2000), lab.settings("dense", jit_compile=False), steps=20)
    assert all((b == v.numpy()).all() for b, v in zip(before, model.variables))   # its weights are put back
