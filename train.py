"""Train one of the codelab's models on MNIST with the hand-written layers, optimizers and training loop.

    python train.py --model=conv                  # the codelab's convnet with its own defaults
    python train.py --dataset=fashion_mnist       # another registered data set (datasets.REGISTRY)
    python train.py --data_dir=DIR                # any four IDX files: the model follows their image shape
    python train.py --list_models                 # every model, its defaults, the accuracy to expect
    python train.py --model=conv_bn --summary     # layers, formulas, parameter counts; no training
    python train.py --model=conv_bn --gradients=by_hand   # hand-written backward passes instead of the tape
    python train.py --model=conv_bn --strategy=mirrored --cpu_devices=2   # data parallel (docs/distributed.md)
    tensorboard --logdir runs                     # watch it

Every training flag left out takes the model's codelab default (models.REGISTRY). The learning rate is
    lr(step) = lr_min + learning_rate * lr_decay ^ (step / k)
with k = the steps of one epoch (floored: once per epoch) or --lr_decay_steps=K (smooth); no --lr_decay:
constant. Each run writes into <logdir>/<run_name>/: TensorBoard events, checkpoints/, PNG pictures,
config.json, metrics.json and saved_model/. Running again with the same --run_name resumes it. A run
directory is locked while its run lives (a second run on it stops at once); Ctrl-C or SIGTERM saves a
checkpoint at the current step, from which the same command resumes.

This file is the entry point only: flags -> app.settings.make_config -> app.run.run(config), which the tests
and lab/ call in-process (docs/design.md). Every flag is checked before TensorFlow loads.

Exit codes: 0 done; 1 unusable data, non-finite loss, failed save or export; 2 bad flags or a run or export
directory that cannot be used; 130 interrupted by Ctrl-C (SIGINT), 143 by SIGTERM.
"""
import os

from absl import app, flags, logging

from app.console import list_models, plural, print_summary
from app.run import Interrupted, RunError, load_data, run
from app.settings import FlagError, RunConfig, make_config, notes
from core import cli, interrupts
from core.native_logs import load_tensorflow
from models import REGISTRY

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PROGRAM = "train.py"
ACTIONS = ("summary", "list_models", "find_lr")
FROM_MODEL = " Default: the model's codelab value (see --list_models)."


def define_flags(flag_values=flags.FLAGS):
    """Declares train.py's flags on `flag_values` (the global FLAGS, or a fresh FlagValues in tests): one per
    RunConfig field, checked as the flags are parsed, plus the three that print and exit."""
    cli.define_flags(RunConfig, flag_values, per_model_note=FROM_MODEL)
    flags.adopt_module_key_flags(cli, flag_values=flag_values)  # --help lists them as train.py's
    flags.DEFINE_bool("summary", False, "Print the model (layers, formulas, parameter counts) and its "
                      "training settings, then exit.", flag_values=flag_values)
    flags.DEFINE_bool("find_lr", False, "Run the learning-rate range test from the model's initial weights, "
                      "write lr_find.png and print the suggested --learning_rate, then exit (no run is "
                      "trained).", flag_values=flag_values)
    flags.DEFINE_bool("list_models", False, "List the models with their codelab defaults and targets, then "
                      "exit.", flag_values=flag_values)


define_flags()
FLAGS = flags.FLAGS


def fail(message, code, error=True):
    """One line on stderr ("train.py: error: ...", or without "error:" for a deliberate stop), then exit."""
    cli.fail(PROGRAM, message, code, error)


def flag_values_given(flag_values=FLAGS):
    """{flag name: value} of train.py's flags, None for a model-default flag that was not given."""
    return cli.given(RunConfig, flag_values, extra=ACTIONS)


def find_learning_rate(config, path="lr_find.png", out=print):
    """--find_lr: the range test (lab/lr_finder.py) on the training images; writes `path`, prints the suggestion."""
    from lab import find_lr
    train, _, _, data_shape = load_data(config)
    from lab.api import Data
    result = find_lr(config.model, Data(train, train, train, *data_shape, config.data_dir or ""), config)
    result.plot(path)
    ended = "the loss diverged" if result.diverged else "the last rate was reached"
    out(f"learning-rate range test of {config.model}: {plural(len(result.losses), 'step')} from "
        f"{result.learning_rates[0]:.2g} to {result.learning_rates[-1]:.2g} ({ended})")
    out(f"suggested --learning_rate={result.suggestion:.2g}   (loss against learning rate: {path})")
    return result


def main(argv):
    """absl's main: the process's logging and signal handling, then command()."""
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # TensorFlow's Python INFO lines (SavedModel writing, ...)
    interrupts.raise_on_signals()
    return command(argv)


def command(argv, flag_values=FLAGS):
    """What train.py does with its parsed flags: every flag is checked before TensorFlow loads. Returns 0, or
    exits with one line and the exit code of the module docstring."""
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])} (flags look like --model=conv)", 2)
    values = flag_values_given(flag_values)
    try:
        if values["list_models"]:
            print(list_models(REGISTRY), end="")
            return 0
        config = make_config(values)
        for line in notes(values, config):
            print(line)
        load_tensorflow()
        if values["summary"]:
            print_summary(config, REGISTRY)
            return 0
        if values["find_lr"]:
            find_learning_rate(config)
            return 0
        run(config)
    except FlagError as error:
        fail(str(error), 2)
    except Interrupted as error:
        fail(str(error), error.code, error=False)
    except RunError as error:
        fail(str(error), 1)
    except KeyboardInterrupt as interrupt:
        fail(f"stopped by {getattr(interrupt, 'name', 'SIGINT')} during start-up; nothing was written",
             getattr(interrupt, "exit_code", 130), error=False)
    except OSError as error:  # a file the run writes (a full disk, a directory removed under it)
        where = f"{error.filename}: " if error.filename else ""
        fail(f"{where}{error.strerror or error}", 1)
    return 0


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser(PROGRAM))
