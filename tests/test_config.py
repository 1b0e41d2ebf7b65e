"""core/config.py's TrainingConfig and what is derived from it: model settings, train.py's flags, resume keys,
HParams."""
import dataclasses

import pytest
from absl import flags

import train
from app.console import describe_training
from core import names
from core.config import SettingError, TrainingConfig, hparams, math_settings
from models import REGISTRY, ModelSpec


def test_defaults_normalisation_and_checks():
    config = TrainingConfig()
    assert (config.batch_size, config.optimizer, config.learning_rate, config.lr_decay) == (128, "adam", 0.001, None)
    assert TrainingConfig(lr_decay=1.0).lr_decay is None  # 1 = constant
    assert TrainingConfig(lr_decay_steps="1600").lr_decay_steps == 1600
    for bad, message in [({"epochs": 0}, "epochs must be a positive integer, got 0"),
                         ({"learning_rate": float("inf")}, "learning_rate must be finite, got inf"),
                         ({"lr_min": float("nan")}, "lr_min must be finite, got nan"),
                         ({"seed": 2 ** 63}, r"seed must be in \[0, 2\*\*63\)"),
                         ({"optimizer": "rmsprop"}, "optimizer must be one of adam, sgd"),
                         ({"steps_per_loop": 0}, "steps_per_loop must be a positive integer")]:
        with pytest.raises(SettingError, match=message):
            TrainingConfig(**bad)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.epochs = 3


def test_models_declare_only_what_differs():
    defaults = TrainingConfig()
    for name, spec in REGISTRY.items():
        for key, value in spec.settings.items():
            assert value != getattr(defaults, key), f"{name} repeats the default {key}={value!r}"
    # The codelab's step uses the defaults; the rest is how this framework shows and runs it.
    assert REGISTRY["dense"].settings == {"summaries_every_epochs": 5, "jit_compile": True}
    assert REGISTRY["conv"].defaults["batch_size"] == 128 and REGISTRY["conv"].defaults["dropout"] == 0.5
    with pytest.raises(ValueError, match=r"\['log_every'\] are not per-model settings"):
        ModelSpec(build=None, description="", target="", source="", settings={"log_every": 5})
    with pytest.raises(SettingError, match="dropout must be in"):
        ModelSpec(build=None, description="", target="", source="", settings={"dropout": 1.5})


def test_the_training_line_names_accumulation_and_the_moving_average():
    plain = describe_training(train.make_config({"model": "conv"}))
    assert "accumulated" not in plain and "moving average" not in plain
    line = describe_training(train.make_config({"model": "conv", "grad_accum_steps": 4, "ema": 0.999}))
    assert line.endswith(", 4 batches per update (gradients accumulated), evaluated on the weights' moving average "
                         "(decay 0.999)"), line


def test_the_dense_models_default_to_xla_except_under_a_strategy():
    jit = {name: train.make_config({"model": name}).jit_compile for name in REGISTRY}
    assert [name for name, on in jit.items() if on] == ["dense_sigmoid", "dense", "dense_decay", "dense5"]
    assert not train.make_config({"model": "dense5", "jit_compile": False}).jit_compile
    assert train.make_config({"model": "conv", "jit_compile": True}).jit_compile
    assert describe_training(train.make_config({"model": "dense5"})).endswith(", step compiled by XLA")
    assert "XLA" not in describe_training(train.make_config({"model": "conv"}))
    # The model's default yields to a strategy (XLA compiles one replica's step); the flag does not.
    assert not train.make_config({"model": "dense5", "strategy": "mirrored"}).jit_compile
    with pytest.raises(train.FlagError, match=r"--jit_compile compiles the step of one replica; drop it or "
                                               r"--strategy=multi_worker"):
        train.make_config({"model": "dense5", "strategy": "multi_worker", "jit_compile": True})


def test_resume_keys_and_hparams_come_from_the_fields():
    keys = math_settings(train.RunConfig)
    assert {"model", "seed", "batch_size", "learning_rate", "lr_min", "dropout", "validation"} <= set(keys)
    assert not {"epochs", "log_every", "steps_per_loop", "checkpoint_every", "logdir", "progress"} & set(keys)
    values = hparams(train.make_config({"model": "conv_bn_big"}))
    # Early stopping changes when a run ends, not its hyperparameters.
    assert set(values) == set(keys) - {"early_stopping", "early_stopping_metric", "restore_best"} | {"epochs"}
    assert values["lr_decay_steps"] == "1600" and values["steps_per_epoch"] == 500
    constant = hparams(train.make_config({"model": "softmax"}))
    assert constant["lr_decay"] == 1.0 and constant["steps_per_epoch"] == 0 and constant["lr_decay_steps"] == "epoch"
    assert all(isinstance(value, (bool, int, float, str)) for value in values.values())


def test_every_field_is_a_flag_checked_when_parsed():
    flag_values = flags.FlagValues()
    train.define_flags(flag_values)
    for field in dataclasses.fields(train.RunConfig):
        assert field.name in flag_values, field.name
        expected = None if field.metadata["per_model"] else field.default
        assert flag_values[field.name].default == expected, field.name
    flag_values(["train.py", "--seed=5", "--steps_per_loop=7", "--lr_decay_steps=400"])
    assert (flag_values.seed, flag_values.steps_per_loop, flag_values.lr_decay_steps) == (5, 7, "400")
    fresh = flags.FlagValues()
    train.define_flags(fresh)
    with pytest.raises(flags.IllegalFlagValueError, match=r"--learning_rate must be finite, got inf"):
        fresh(["train.py", "--learning_rate=inf"])


def test_every_choice_is_read_from_a_registry_and_each_name_works():
    """The flags' choices are the registries' names; every optimizer and gradient method named is made, so a new
    entry is tested without a test naming it."""
    choices = {field.name: field.metadata["choices"] for field in dataclasses.fields(train.RunConfig)}
    assert tuple(choices["optimizer"]) == tuple(names.OPTIMIZERS) == ("adam", "sgd")
    assert (tuple(choices["gradients"]), choices["precision"], choices["strategy"]) == (
        tuple(names.GRADIENTS), names.PRECISIONS, names.STRATEGIES)
    from core.optimizers import Optimizer
    for name in names.OPTIMIZERS:
        config = train.make_config({"model": "dense", "optimizer": name, "lr_decay": 0.5})
        optimizer = names.optimizer(config, names.learning_rate_schedule(config, steps_per_epoch=10))
        assert isinstance(optimizer, Optimizer)
        assert float(optimizer.learning_rate(20)) == pytest.approx(0.001 * 0.5 ** 2)  # two epochs of 10 steps
    for name in names.GRADIENTS:
        assert callable(names.gradient_function(name))


def test_workers_whose_commands_differ_are_told_which_settings(monkeypatch):
    """check_same_settings on worker 0 of two (dense, 2 epochs) when worker 1 runs softmax for 3 epochs with its
    own --logdir: the exchange (distribute.WorkerTable) is played here with worker 1's real row. The settings that
    differ, the models' own ones included, are named; --logdir may differ. Two processes:
    test_multi_worker_agreement.py."""
    import numpy as np

    from app import run
    from app.settings import FlagError
    from core import distribute

    rows = []

    class TwoWorkers:
        def __init__(self, strategy, width):
            pass

        def __call__(self, row):
            rows.append(np.asarray(row, np.float32))
            return np.stack(rows[-2:]) if len(rows) > 1 else rows[0][np.newaxis]

    monkeypatch.setattr(distribute, "WorkerTable", TwoWorkers)
    run.check_same_settings(train.make_config({"model": "softmax", "epochs": 3, "logdir": "/b", "run_name": "r"}), None)
    with pytest.raises(FlagError) as raised:
        run.check_same_settings(train.make_config({"model": "dense", "epochs": 2, "logdir": "/a", "run_name": "r"}),
                                None)
    assert str(raised.value) == (
        "the workers' commands differ in --batch_size, --epochs, --optimizer, --learning_rate, "
        "--summaries_every_epochs, --jit_compile, --model: every worker must run the same command (only --data_dir, "
        "--logdir, --export_dir, --progress may differ)")
    rows.clear()
    for logdir in ("/a", "/b"):  # the same command but for --logdir: no error
        run.check_same_settings(train.make_config({"model": "dense", "logdir": logdir, "run_name": "r"}), None)
