"""The model zoo: the codelab's networks, each a `Sequential` of hand-written layers. Reading the registry imports
no TensorFlow: a model's module is imported when it is first built, so train.py checks --model at once.

    spec = REGISTRY["conv"]
    model = spec.build(spec.defaults["dropout"], num_classes=10)   # images [N, H, W, C] -> logits [N, 10]
    model.build((None, 28, 28, 1))                 # the variables, for MNIST's images
    REGISTRY["conv_bn"].build(0.3, sync_batch_norm=True)   # an option, taken at construction

Every `ModelSpec` names the training settings of the codelab step it re-creates where they differ from
core.config.TrainingConfig's defaults (train.py uses them for each flag that is not given), where in the
codelab they come from, and the test accuracy that step should reach. A new model is its module (a function
(dropout, num_classes, **options) -> Sequential) and one REGISTRY entry; the tests take every entry.
"""
import dataclasses
import importlib
import inspect
from typing import Callable

from core.config import TrainingConfig

__all__ = ["ModelSpec", "REGISTRY", "OPTIONS", "get"]

PER_MODEL = tuple(field.name for field in dataclasses.fields(TrainingConfig) if field.metadata["per_model"])
# Construction options a model may take; a model without the layers an option is about ignores it.
OPTIONS = ("sync_batch_norm",)


class Builder:
    """A model's constructor, named by "module:function" (imported at the first build) or given as a function:
    builder(dropout, num_classes=10, **options) -> Sequential."""

    def __init__(self, function):
        self.function = function

    def __call__(self, dropout, num_classes=10, **options):
        unknown = set(options) - set(OPTIONS)
        if unknown:
            raise ValueError(f"unknown model options {sorted(unknown)}; a model takes {', '.join(OPTIONS)}")
        if isinstance(self.function, str):
            module, name = self.function.split(":")
            self.function = getattr(importlib.import_module(module), name)
        taken = inspect.signature(self.function).parameters
        return self.function(dropout, num_classes, **{key: value for key, value in options.items() if key in taken})

    def __repr__(self):
        return f"Builder({self.function!r})"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A named network: `build(dropout, num_classes=10, **options) -> Sequential`, its codelab settings, their
    source, and its target.

    build: "module:function" (imported when first built) or the function itself; options (OPTIONS) such as
      sync_batch_norm=True reach the function when it takes them.
    settings: only the TrainingConfig fields (marked per_model) where the codelab differs from the defaults,
      summaries_every_epochs where an epoch is short enough for TensorBoard's pictures to show, and
      jit_compile where XLA measured faster (the dense models: their many small element-wise ops fuse).
    """
    build: Callable | str
    description: str
    target: str
    source: str
    settings: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        unknown = set(self.settings) - set(PER_MODEL)
        if unknown:
            raise ValueError(f"model settings: {sorted(unknown)} are not per-model settings {PER_MODEL}")
        TrainingConfig(**self.settings)  # checks the values
        if not isinstance(self.build, Builder):
            object.__setattr__(self, "build", Builder(self.build))

    @property
    def defaults(self):
        """{setting: value} for every per-model setting (TrainingConfig's default unless the model sets it),
        and "source"."""
        config = TrainingConfig(**self.settings)
        return {**{name: getattr(config, name) for name in PER_MODEL}, "source": self.source}


CODELAB = "codelab 'TensorFlow, Keras and deep learning, without a PhD'"
PRACTICAL = "'TensorFlow 2.0 Practical'"

REGISTRY = {
    "softmax": ModelSpec(
        build="models.dense:softmax",
        settings=dict(batch_size=100, epochs=100, optimizer="sgd", learning_rate=0.01, summaries_every_epochs=10),
        source=f"{CODELAB} s.5 (keras_01: optimizer 'sgd' = lr 0.01, about 90% after 10 "
               f"epochs); {PRACTICAL} s.5 (SGD 0.005, batch 100, 300 epochs)",
        description="flatten 784 -> dense 10 (softmax regression)",
        target=">= 92% test accuracy"),
    "dense_sigmoid": ModelSpec(
        build="models.dense:dense_sigmoid",
        settings=dict(optimizer="sgd", learning_rate=0.01, summaries_every_epochs=5, jit_compile=True),
        source=f"{CODELAB} s.6 (first try with more layers: sigmoid, 'sgd', batch 128)",
        description="784 -> 200 -> 60 -> 10, sigmoid hidden layers (the lesson: sigmoid + SGD stalls)",
        target="report it (the lesson: it trains far slower than dense)"),
    "dense": ModelSpec(
        build="models.dense:dense",
        settings=dict(summaries_every_epochs=5, jit_compile=True),
        source=f"{CODELAB} s.7 (keras_02: ReLU, 'adam' = lr 0.001, batch 128)",
        description="784 -> 200 -> 60 -> 10, ReLU hidden layers",
        target=">= 97.5% test accuracy"),
    "dense_decay": ModelSpec(
        build="models.dense:dense_decay",
        settings=dict(learning_rate=0.01, lr_decay=0.6, dropout=0.25, summaries_every_epochs=5,
                      jit_compile=True),
        source=f"{CODELAB} s.8-9 (keras_03: lr 0.01 * 0.6^epoch, dropout 0.25)",
        description="784 -> 200 -> 100 -> 60 -> 10 ReLU, dropout after each hidden layer; "
                    "--dropout=0 is the learning-rate-decay step before dropout",
        target=">= 97.8% test accuracy (>= 98% with --dropout=0)"),
    "conv": ModelSpec(
        build="models.conv:conv",
        settings=dict(learning_rate=0.01, lr_decay=0.6, dropout=0.5),
        source=f"{CODELAB} s.11-12 (keras_04: conv 3x3x12, 6x6x24/2, 6x6x32/2, "
               "dense 200, dropout)",
        description="conv 3x3x12 -> 6x6x24 s2 -> 6x6x32 s2 (ReLU) -> dense 200 ReLU -> dropout -> dense 10",
        target=">= 99.0% test accuracy"),
    "conv_bn": ModelSpec(
        build="models.conv:conv_bn",
        settings=dict(batch_size=64, learning_rate=0.01, lr_decay=0.666, dropout=0.3),
        source=f"{CODELAB} s.13 (keras_05: batch 64, decay 0.666, dropout 0.3)",
        description="conv with BatchNorm(center, no scale) before each ReLU, no biases, dropout 0.3",
        target="median of 3 seeds >= 99.4% test accuracy"),
    "conv_bn_big": ModelSpec(
        build="models.conv:conv_bn_big",
        settings=dict(batch_size=100, epochs=20, steps_per_epoch=500, learning_rate=0.02,
                      lr_decay=0.36787944117144233, lr_decay_steps=1600, lr_min=0.0001, dropout=0.25),
        source="original low-level codelab, best network (batch norm): batch 100, "
               "10,000 steps, lr = 0.0001 + 0.02 * e^(-step/1600), pkeep 0.75",
        description="conv 6x6x24 -> 5x5x48 s2 -> 4x4x64 s2 -> dense 200, each BatchNorm + ReLU, "
                    "dropout 0.25, dense 10",
        target=">= 99.5% test accuracy"),
    "dense5": ModelSpec(
        build="models.dense:dense5",
        settings=dict(batch_size=100, learning_rate=0.003, lr_decay=0.8, summaries_every_epochs=5,
                      jit_compile=True),
        source=f"{PRACTICAL} s.7 (ReLU + Adam 0.003, batch 100; s.8 adds dropout 0.25 with "
               "lr 0.005); decay 0.8^epoch stands for the practical's Keras decay=0.001",
        description="784 -> 200 -> 100 -> 60 -> 30 -> 10 ReLU (--dropout adds dropout before each dense)",
        target=">= 98% test accuracy"),
    "conv_small": ModelSpec(
        build="models.conv:conv_small",
        settings=dict(batch_size=100, learning_rate=0.003, lr_decay=0.8, dropout=0.35),
        source=f"{PRACTICAL} s.10 (conv 6x6x6, 5x5x12/2, 4x4x24/2, dense 200, dropout 0.35, "
               "Adam 0.003 with Keras decay=0.001, here 0.8^epoch; batch 32 there)",
        description="conv 6x6x6 -> 5x5x12 s2 -> 4x4x24 s2 (ReLU) -> dense 200 ReLU -> dropout -> dense 10",
        target=">= 99.0% test accuracy"),
}


def get(name):
    """The ModelSpec called `name`; ValueError naming the known models otherwise."""
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(REGISTRY)}")
    return REGISTRY[name]
