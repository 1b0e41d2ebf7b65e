"""Every choice a flag takes is one list of names, read without TensorFlow: core.names (optimizers, gradients,
precisions, strategies), models.REGISTRY and datasets.REGISTRY. The framework and the flags read the same list,
so a name added to a registry is a choice at once, and a bad name is refused before TensorFlow loads."""
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

import datasets
from app.settings import FlagError, RunConfig, make_config
from core import distribute, names, precision
from core.config import SettingError, TrainingConfig
from models import REGISTRY

REPO = Path(__file__).resolve().parents[1]


def test_the_framework_and_the_flags_read_one_list_of_each_name():
    choices = {field.name: field.metadata["choices"] for field in dataclasses.fields(RunConfig)}
    assert distribute.STRATEGIES is names.STRATEGIES is choices["strategy"]
    assert precision.PRECISIONS is names.PRECISIONS is choices["precision"]
    assert list(choices["optimizer"]) == list(names.OPTIMIZERS)
    assert list(choices["gradients"]) == list(names.GRADIENTS)
    assert list(choices["dataset"]) == list(datasets.REGISTRY) == ["mnist", "fashion_mnist"]


def test_a_name_added_to_a_registry_is_a_choice_at_once(monkeypatch):
    """One entry, nothing else: the settings' check follows the registry (it does not hold a copy of its names)."""
    with pytest.raises(SettingError, match="optimizer must be one of adam, sgd, got 'momentum'"):
        TrainingConfig(optimizer="momentum")
    with pytest.raises(FlagError, match="--dataset must be one of mnist, fashion_mnist, got 'tiny'"):
        make_config({"dataset": "tiny"})
    monkeypatch.setitem(names.OPTIMIZERS, "momentum", "core.optimizers:SGD")
    monkeypatch.setitem(names.GRADIENTS, "twice", "core.runner:tape_gradients")
    monkeypatch.setitem(datasets.REGISTRY, "tiny", datasets.MNIST)
    config = make_config({"optimizer": "momentum", "gradients": "twice", "dataset": "tiny"})
    assert (config.optimizer, config.gradients, config.dataset) == ("momentum", "twice", "tiny")


def test_a_bad_model_or_data_set_is_refused_before_tensorflow_loads():
    """One short process (only a fresh one can show what was never imported): train.py's flags, --model=nope and
    --dataset=nope each one line and exit code 2, in well under a second of CPU, TensorFlow never imported."""
    harness = (
        "import sys, time\n"
        "start = time.process_time()\n"
        "import train\n"
        "from core import cli\n"
        "for arg in ('--model=nope', '--dataset=nope'):\n"
        "    train.FLAGS.unparse_flags()\n"
        "    try:\n"
        "        train.command(cli.parse('train.py', ['train.py', arg]))\n"
        "    except SystemExit as stop:\n"
        "        print(stop.code)\n"
        "print('tensorflow' in sys.modules, time.process_time() - start)\n")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-c", harness], capture_output=True, text=True, cwd=REPO, env=env,
                            timeout=60)
    code_model, code_dataset, loaded, seconds = result.stdout.split()
    assert (code_model, code_dataset, loaded) == ("2", "2", "False"), result.stderr
    assert result.stderr.splitlines() == [
        "train.py: error: unknown model 'nope'; choose one of: " + ", ".join(REGISTRY),
        "train.py: error: flag --dataset=nope: value should be one of <mnist|fashion_mnist>"]
    assert float(seconds) < 1.0
