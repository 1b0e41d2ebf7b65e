"""A run's settings: RunConfig (the training settings of core.config plus where the data and the run live) and
make_config, which fills what a user leaves out from the model's codelab settings and checks the settings that
depend on each other. Imports no TensorFlow: train.py checks every flag, --model and --dataset included (their
names from models.REGISTRY and datasets.REGISTRY), before it loads.

    config = make_config({"model": "conv", "epochs": 2})      # RunConfig; FlagError (one line) if unusable
"""
import dataclasses
import os

from core import names
from core.config import SettingError, TrainingConfig, math_settings, setting
from core.config import hparams as config_hparams
from datasets import REGISTRY as DATASETS
from models import REGISTRY

__all__ = ["RunConfig", "RESUME_KEYS", "HOLDOUT_EXAMPLES", "FlagError", "make_config", "notes", "make_strategy"]

HOLDOUT_EXAMPLES = 5000


class FlagError(ValueError):
    """A bad command line; the message is one line naming the flag."""


def _not_empty(value):
    return None if value.strip() else "must not be empty"


# The longest wait a timeout may ask for, in seconds (about 11.6 days): infinity would wait forever, and
# TensorFlow counts its timeouts in 64-bit milliseconds.
MAX_TIMEOUT_SECONDS = 1e6


def _timeout(value):
    return (None if 0 < value <= MAX_TIMEOUT_SECONDS else
            f"must be > 0 and at most {MAX_TIMEOUT_SECONDS:g} seconds, got {value:g}")


def _optional_positive_int(value):
    return None if value is None or value >= 1 else f"must be a positive integer, got {value}"


def _plain_name(value):
    if value is None:
        return None
    if not value.strip():
        return "must not be empty"
    if os.sep in value or value in (".", ".."):
        return f"must be a plain directory name, got {value!r}"
    return None


@dataclasses.dataclass(frozen=True)
class RunConfig(TrainingConfig):
    """Everything a run needs: the training settings (core.config) and where the data and the run live.
    Each field is a flag of the same name; make_config fills the fields a user leaves out from the model."""
    model: str = setting("conv", "Which network to train (see --list_models).", math=True)
    validation: str = setting("test", "Data evaluated after each epoch: the 10,000 test images (as the codelab "
                              f"does) or the last {HOLDOUT_EXAMPLES:,} training images, held out of training.",
                              math=True, choices=("test", "holdout"))
    dataset: str = setting("mnist", "Data set (datasets.REGISTRY); its files are downloaded into --data_dir if "
                           "missing.", math=True, choices=DATASETS.keys())
    data_dir: str | None = setting(None, "Directory of the four IDX files (plain or .gz; any image shape and "
                                   "number of classes, read from the files); --dataset's files are downloaded "
                                   "there if missing (default: $TF_BY_HAND_DATA_DIR or "
                                   "~/.cache/tf-by-hand/<dataset>).")
    logdir: str = setting("runs", "Parent directory of the run directories (point TensorBoard here).", _not_empty)
    run_name: str | None = setting(None, "Name of this run's directory under --logdir (default: "
                                   "<model>-<YYYYmmdd-HHMMSS>). An existing run with a checkpoint is resumed.",
                                   _plain_name)
    resume: bool = setting(True, "Continue the run in --run_name when it holds a checkpoint; with --noresume "
                           "such a run directory is refused.")
    export_dir: str | None = setting(None, "Also write the SavedModel here (it is always written to "
                                     "<run dir>/saved_model).")
    gradients: str = setting("tape", "How the training step computes the gradients: tf.GradientTape, or each "
                             "layer's hand-written backward pass chained by core/backprop.py (docs/backprop.md). "
                             "With --summary, by_hand also prints every layer's backward formulas.",
                             math=True, choices=names.GRADIENTS.keys())
    strategy: str = setting("default", "How to spread training (docs/distributed.md): default = one device; "
                            "mirrored = one replica per local GPU (or per --cpu_devices); multi_worker = "
                            "the workers named in $TF_CONFIG (python -m cluster.launch starts them locally). "
                            "--batch_size is the global batch.", choices=names.STRATEGIES)
    cpu_devices: int | None = setting(None, "Split the CPU into this many logical devices (for "
                                      "--strategy=mirrored without GPUs).", _optional_positive_int)
    sync_batch_norm: bool = setting(False, "Under a strategy, normalize with the statistics of the global batch "
                                    "(all-reduced sum, sum of squares and count) instead of each replica's.",
                                    math=True)
    early_stopping: int | None = setting(None, "Stop after this many epochs without an improvement of "
                                         "--early_stopping_metric (default: train every epoch).",
                                         _optional_positive_int, math=True, hparam=False)
    early_stopping_metric: str = setting("val_loss", "What early stopping and --restore_best watch: the "
                                         "validation loss or accuracy, or the epoch's training loss or accuracy.",
                                         math=True, hparam=False,
                                         choices=("val_loss", "val_accuracy", "loss", "accuracy"))
    restore_best: bool = setting(False, "Test, export and report the weights of the epoch with the best "
                                 "--early_stopping_metric, not the last epoch's.", math=True, hparam=False)
    collective_timeout: float = setting(60.0, "Seconds a multi-worker all-reduce waits for a lost worker before "
                                        "the run stops.", _timeout)
    join_timeout: float = setting(600.0, "Seconds a multi-worker start waits for every worker of TF_CONFIG to "
                                  "join before it stops.", _timeout)

    def hparams(self):
        """The settings that shape the result, for the HParams dashboard and metrics.json."""
        return config_hparams(self)


# The settings a resumed run must share with the run it continues (--epochs may grow).
RESUME_KEYS = tuple(math_settings(RunConfig))


def make_config(values, registry=None):
    """RunConfig from flag values (None = not given -> the model's value, else the default); FlagError for
    bad values."""
    registry = REGISTRY if registry is None else registry
    name = values.get("model") or RunConfig.model
    if name not in registry:
        raise FlagError(f"unknown model {name!r}; choose one of: {', '.join(registry)}")
    given = {key: value for key, value in values.items()
             if key in RunConfig.__dataclass_fields__ and value is not None}
    try:
        config = RunConfig(**{**registry[name].settings, **given, "model": name})
    except SettingError as error:
        raise FlagError(f"--{error.name} {error.problem}") from None
    if config.gradients == "by_hand" and config.precision != "float32":
        raise FlagError(f"--gradients=by_hand works in float32 only, not with --precision={config.precision}")
    if config.jit_compile and config.strategy != "default":
        if "jit_compile" in given:
            raise FlagError(f"--jit_compile compiles the step of one replica; drop it or --strategy={config.strategy}")
        config = dataclasses.replace(config, jit_compile=False)  # the model's default compiles one replica only
    if config.cpu_devices is not None and config.strategy != "mirrored":
        raise FlagError("--cpu_devices splits the CPU into the replicas of --strategy=mirrored; add that or drop "
                        "--cpu_devices")
    if config.ema is not None and config.restore_best:
        raise FlagError("--restore_best keeps the best epoch's raw weights, --ema evaluates and exports the averages: "
                        "drop one of them")
    if config.sync_batch_norm and config.strategy == "default":
        raise FlagError("--sync_batch_norm shares batch statistics among replicas; it needs --strategy=mirrored "
                        "or multi_worker")
    return config


def notes(values, config):
    """Lines about given flags that do nothing in this configuration."""
    if values.get("lr_min") is not None and config.lr_decay is None:
        return [f"note: --lr_min has no effect: the learning rate of {config.model} is constant (add --lr_decay)"]
    return []


def make_strategy(config):
    """The tf.distribute strategy of --strategy (before any TensorFlow op); FlagError for a bad setting."""
    from core import distribute
    try:
        return distribute.make_strategy(config.strategy, config.cpu_devices, config.collective_timeout,
                                         config.join_timeout)
    except distribute.DistributeError as error:
        raise FlagError(str(error)) from None
