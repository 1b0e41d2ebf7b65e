"""The framework's choices by name, readable without TensorFlow: each name maps to a module (or
"module:attribute"), imported only when it is used.

    OPTIMIZERS["adam"]                         # "core.optimizers.adam": the modules of core/optimizers/
    optimizer(config, schedule)                # core.optimizers.adam.Adam(schedule) for config.optimizer == "adam"

This is the one list of each choice: core.config's flags, core.precision and core.distribute read it, so a
flag's value is checked before TensorFlow loads. A new optimizer is one file, core/optimizers/<name>.py holding
one subclass of core.optimizers.Optimizer: OPTIMIZERS lists the package's files (without importing them), so
--optimizer=<name> takes it. The application's names live beside what they name and import no TensorFlow
either: models.REGISTRY (networks) and datasets.REGISTRY (data sets).
"""
import importlib
import importlib.util
import os

__all__ = ["OPTIMIZERS", "GRADIENTS", "PRECISIONS", "STRATEGIES", "modules_of", "load", "optimizer_class",
           "optimizer", "gradient_function", "learning_rate_schedule"]


def modules_of(package):
    """{file name without .py: "package.name"} of the modules in a package's folders (not those starting with
    "_"), found without importing the package."""
    folders = importlib.util.find_spec(package).submodule_search_locations
    names = {entry[:-3] for folder in folders for entry in os.listdir(folder)
             if entry.endswith(".py") and not entry.startswith("_")}
    return {name: f"{package}.{name}" for name in sorted(names)}


OPTIMIZERS = modules_of("core.optimizers")
GRADIENTS = {"tape": "core.runner:tape_gradients", "by_hand": "core.backprop:gradients"}
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
STRATEGIES = ("default", "mirrored", "multi_worker")


def load(path):
    """The object a "module:attribute" path names (its module imported now)."""
    module, attribute = path.split(":")
    return getattr(importlib.import_module(module), attribute)


def optimizer_class(name):
    """The optimizer class OPTIMIZERS[name] names: "module:Class", or a module's one Optimizer subclass."""
    path = OPTIMIZERS[name]
    if ":" in path:
        return load(path)
    from core.optimizers import Optimizer
    module = importlib.import_module(path)
    defined = [value for value in vars(module).values() if isinstance(value, type) and issubclass(value, Optimizer)
               and value.__module__ == module.__name__]
    if len(defined) != 1:
        raise TypeError(f"{module.__file__}: an optimizer's module defines one subclass of "
                        f"core.optimizers.Optimizer, found {len(defined)}")
    return defined[0]


def optimizer(config, schedule):
    """config.optimizer's class (OPTIMIZERS) with `schedule` as its learning rate."""
    return optimizer_class(config.optimizer)(schedule)


def gradient_function(name):
    """The training step's gradient function: "tape" (tf.GradientTape) or "by_hand" (core/backprop.py)."""
    return load(GRADIENTS[name])


def learning_rate_schedule(config, steps_per_epoch):
    """lr(step) = lr_min + learning_rate * lr_decay ^ (step / k), k = steps_per_epoch (floored) or lr_decay_steps."""
    from core import schedules
    if config.lr_decay is None:
        return schedules.Constant(config.learning_rate)
    if config.lr_decay_steps == "epoch":
        return schedules.ExponentialDecay(config.learning_rate, config.lr_decay, steps_per_epoch, staircase=True,
                                          minimum=config.lr_min)
    return schedules.ExponentialDecay(config.learning_rate, config.lr_decay, config.lr_decay_steps,
                                      minimum=config.lr_min)
