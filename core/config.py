"""Training settings: one frozen dataclass, each field with its default, its help text and its check.

    settings = TrainingConfig(batch_size=100, optimizer="sgd", learning_rate=0.01)
    settings.lr_decay_steps                  # "epoch"
    TrainingConfig(epochs=0)                 # SettingError: epochs must be a positive integer, got 0

Everything else is derived from the fields: a program's command-line flags (help and checks from the
metadata), the settings a resumed run must share with the run it continues (`math=True`: they change the
numbers a run computes), and the hyperparameters logged for TensorBoard (`hparams`). A model declares only
the settings where it differs from these defaults (`per_model=True` marks the ones it may set).

The learning rate is
    lr(step) = lr_min + learning_rate * lr_decay ^ (step / k)
with k = the steps of one epoch (lr_decay_steps="epoch": floored, once per epoch) or lr_decay_steps=K
(smooth); lr_decay None: constant.
"""
import dataclasses
import math
import typing

from core import names

__all__ = ["TrainingConfig", "SettingError", "setting", "problem", "math_settings", "hparams"]


class SettingError(ValueError):
    """A setting's value fails its check; `name` and `problem` ('must be ..., got ...') for the caller's wording."""

    def __init__(self, name, problem):
        super().__init__(f"{name} {problem}")
        self.name = name
        self.problem = problem


def setting(default, help, check=None, math=False, per_model=False, choices=None, hparam=None, none_means=None):
    """A dataclass field with metadata: help (text), check (value -> problem text or None), math (changes the
    numbers: resumes must match), per_model (a model may set it), choices (allowed values),
    hparam (logged as a hyperparameter; default: math), none_means (the value None stands for, as logged)."""
    return dataclasses.field(default=default, metadata={
        "help": help, "check": check, "math": math, "per_model": per_model, "choices": choices,
        "hparam": math if hparam is None else hparam, "none_means": none_means})


def _positive_int(value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return f"must be a positive integer, got {value!r}"
    return None


MAX_EPOCHS = 10 ** 9  # x steps per epoch stays inside the int64 step counter below 9e9 batches an epoch


def _epochs(value):
    problem = _positive_int(value)
    if problem is None and value > MAX_EPOCHS:
        problem = f"must be at most {MAX_EPOCHS:,}, got {value}"
    return problem


def _optional_positive_int(value):
    return None if value is None else _positive_int(value)


def _finite(value):
    return None if math.isfinite(value) else f"must be finite, got {value:g}"


FLOAT32_MAX = 3.4028234663852886e38  # the step computes in float32: a larger rate is inf there


def _rate(value):
    """Finite and representable in float32, in which the step computes the learning rate."""
    return _finite(value) or (None if value <= FLOAT32_MAX else f"must be at most {FLOAT32_MAX:.3g} (the largest "
                                                                 f"float32), got {value:g}")


def _learning_rate(value):
    return _rate(value) or (None if value > 0 else f"must be > 0, got {value:g}")


def _lr_decay(value):
    if value is None or 0 < value <= 1:
        return None
    return f"must be in (0, 1] (1: no decay), got {value:g}"


def _lr_min(value):
    return _rate(value) or (None if value >= 0 else f"must be >= 0, got {value:g}")


def _dropout(value):
    return None if 0 <= value < 1 else f"must be in [0, 1), got {value:g}"


def _ema_decay(value):
    return None if value is None or 0 <= value < 1 else f"must be in [0, 1), got {value:g}"


def _seed(value):
    return None if 0 <= value < 2 ** 63 else f"must be in [0, 2**63), got {value}"


def parse_decay_steps(value):
    """'epoch' -> 'epoch'; '1600' or 1600 -> 1600 (up to 2**63 - 1, the step counter's range); anything else ->
    None."""
    if value == "epoch":
        return value
    try:
        steps = int(value)
    except (TypeError, ValueError):
        return None
    return steps if 1 <= steps < 2 ** 63 and str(steps) == str(value).strip() else None


def _decay_steps(value):
    if parse_decay_steps(value) is None:
        return f"must be 'epoch' or a positive number of steps below 2**63, got {value!r}"
    return None


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """The settings of a training run with their defaults (see the module docstring)."""
    batch_size: int = setting(128, "Images per training step.", _positive_int, math=True, per_model=True)
    epochs: int = setting(10, "Number of epochs (passes over the training images).", _epochs,
                          per_model=True, hparam=True)
    steps_per_epoch: int | None = setting(None, "Stop each epoch after this many batches, for quick runs "
                                          "(None: a full pass).", _optional_positive_int, math=True,
                                          per_model=True, none_means=0)
    optimizer: str = setting("adam", "Optimizer.", math=True, per_model=True, choices=names.OPTIMIZERS.keys())
    learning_rate: float = setting(0.001, "Initial learning rate (above lr_min).", _learning_rate, math=True,
                                   per_model=True)
    lr_decay: float | None = setting(None, "Learning-rate decay factor per period, in (0, 1]; 1 = constant "
                                     "learning rate.", _lr_decay, math=True, per_model=True,
                                     none_means=1.0)
    lr_decay_steps: str | int = setting("epoch", "Decay period: 'epoch' (lr * decay^epoch, once per epoch) or a "
                                        "number of steps K (lr * decay^(step/K), smooth).", _decay_steps,
                                        math=True, per_model=True)
    lr_min: float = setting(0.0, "Learning-rate floor added to the decayed part.", _lr_min, math=True,
                            per_model=True)
    dropout: float = setting(0.0, "Dropout rate in [0, 1); 0 removes the dropout layers.", _dropout, math=True,
                             per_model=True)
    seed: int = setting(1, "Random seed: initial weights, shuffling, dropout. The same seed gives bit-identical "
                        "runs on the same machine.", _seed, math=True)
    log_every: int = setting(100, "Updates (steps) between log points (scalars, progress figures, NaN check).",
                             _positive_int)
    checkpoint_every: int | None = setting(None, "Also save a checkpoint every this many steps (None: only at "
                                           "the end of each epoch).", _optional_positive_int)
    summaries_every_epochs: int = setting(1, "TensorBoard's histograms and pictures at every n-th epoch end and "
                                          "the last only (its scalars at each): they take about 0.1 s, which "
                                          "counts when an epoch lasts a second.", _positive_int, per_model=True)
    keep_checkpoints: int = setting(3, "How many checkpoints to keep.", _positive_int)
    steps_per_loop: int = setting(50, "Most training steps per compiled call; log points, checkpoints and epoch "
                                  "ends cut a call short. Changes speed only, never the numbers.", _positive_int)
    precision: str = setting("float32", "Arithmetic of the training step: float32, or mixed_bfloat16 / "
                             "mixed_float16 (float32 weights and optimizer slots, the step in 16 bits; float16 "
                             "with dynamic loss scaling). Fast only where the hardware has 16-bit units.",
                             math=True, choices=names.PRECISIONS)
    jit_compile: bool = setting(False, "Compile the training step with XLA (fused kernels); the dense models do by "
                                "default, 30-40% faster on CPU (benchmarks/RESULTS.md). One replica only: a "
                                "model's default yields to --strategy. It rounds differently and draws other "
                                "dropout masks, so a run keeps its choice.", math=True, per_model=True)
    grad_accum_steps: int = setting(1, "Batches per update: each update applies the mean gradient of this many "
                                    "batches, as one batch K times larger would (without BatchNorm). Steps count "
                                    "updates; an epoch's remainder of fewer batches is left out.", _positive_int,
                                    math=True)
    ema: float | None = setting(None, "Keep an exponential moving average of the weights with this decay d in "
                                "[0, 1) (ema = d * ema + (1 - d) * w after each update); evaluation and the "
                                "export use it, training the raw weights (default: none).", _ema_decay,
                                math=True, none_means=0.0)
    progress: bool = setting(True, "Show a progress bar per epoch (on a terminal).")

    def __post_init__(self):
        for field in dataclasses.fields(self):
            text = problem(field, getattr(self, field.name))
            if text:
                raise SettingError(field.name, text)
        object.__setattr__(self, "lr_decay_steps", parse_decay_steps(self.lr_decay_steps))
        if self.lr_decay == 1:
            object.__setattr__(self, "lr_decay", None)


def problem(field, value):
    """What is wrong with `value` for dataclass field `field` (its choices, then its check), or None."""
    choices = field.metadata.get("choices")
    if choices and value not in choices:
        return f"must be one of {', '.join(choices)}, got {value!r}"
    check = field.metadata.get("check")
    return check(value) if check else None


def math_settings(config):
    """The names of the settings of `config` (a dataclass) that change the numbers of a run."""
    return [field.name for field in dataclasses.fields(config) if field.metadata.get("math")]


def hparams(config):
    """{name: value} of the settings marked as hyperparameters, in the types TensorBoard's HParams takes:
    None as the value it stands for, a setting that may be text (lr_decay_steps) always as text."""
    values = {}
    for field in dataclasses.fields(config):
        if field.metadata.get("hparam"):
            value = getattr(config, field.name)
            if value is None:
                value = field.metadata["none_means"]
            values[field.name] = str(value) if str in typing.get_args(field.type) else value
    return values
