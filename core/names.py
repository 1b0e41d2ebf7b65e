"""The framework's choices by name, readable without TensorFlow: each name maps to "module:attribute", imported
only when it is used.

    OPTIMIZERS["adam"]                         # "core.optimizers:Adam"
    optimizer(config, schedule)                # core.optimizers.Adam(schedule) for config.optimizer == "adam"

This is the one list of each choice: core.config's flags, core.precision and core.distribute read it, so a
flag's value is checked before TensorFlow loads. A new optimizer is its class (in core/optimizers.py or a
module of its own) plus one entry in OPTIMIZERS. The application's names live beside what they name and import
no TensorFlow either: models.REGISTRY (networks) and datasets.REGISTRY (data sets).
"""
import importlib

__all__ = ["OPTIMIZERS", "GRADIENTS", "PRECISIONS", "STRATEGIES", "load", "optimizer", "gradient_function",
           "learning_rate_schedule"]

OPTIMIZERS = {"adam": "core.optimizers:Adam", "sgd": "core.optimizers:SGD"}
GRADIENTS = {"tape": "core.runner:tape_gradients", "by_hand": "core.backprop:gradients"}
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
STRATEGIES = ("default", "mirrored", "multi_worker")


def load(path):
    """The object a "module:attribute" path names (its module imported now)."""
    module, attribute = path.split(":")
    return getattr(importlib.import_module(module), attribute)


def optimizer(config, schedule):
    """config.optimizer's class (OPTIMIZERS) with `schedule` as its learning rate."""
    return load(OPTIMIZERS[config.optimizer])(schedule)


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
