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

Exit codes: 0 done; 1 unusable data, non-finite loss, failed save or export; 2 bad flags or a run or export
directory that cannot be used; 130 interrupted by Ctrl-C (SIGINT), 143 by SIGTERM.
"""
import contextlib
import dataclasses
import functools
import json
import os
import time

from absl import app, flags, logging

from app.settings import HOLDOUT_EXAMPLES, RESUME_KEYS, FlagError, RunConfig, make_config, notes
from core import cli, interrupts, names, rundir
from core.native_logs import quiet_native_logs
from models import REGISTRY

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PROGRAM = "train.py"
ACTIONS = ("summary", "list_models", "find_lr")
FROM_MODEL = " Default: the model's codelab value (see --list_models)."


def define_flags(flag_values=flags.FLAGS):
    """Declares train.py's flags on `flag_values` (the global FLAGS, or a fresh FlagValues in tests): one per
    RunConfig field, checked as the flags are parsed, plus the three that print and exit."""
    cli.define_flags(RunConfig, flag_values, per_model_note=FROM_MODEL)
    flags.DEFINE_bool("summary", False, "Print the model (layers, formulas, parameter counts) and its "
                      "training settings, then exit.", flag_values=flag_values)
    flags.DEFINE_bool("find_lr", False, "Run the learning-rate range test from the model's initial weights, "
                      "write lr_find.png and print the suggested --learning_rate, then exit (no run is "
                      "trained).", flag_values=flag_values)
    flags.DEFINE_bool("list_models", False, "List the models with their codelab defaults and targets, then "
                      "exit.", flag_values=flag_values)


define_flags()
FLAGS = flags.FLAGS


class RunError(RuntimeError):
    """Training could not start or finish (data, numbers, export); the message is one line."""


class Interrupted(RunError):
    """Ctrl-C or SIGTERM; the message says what was kept. `code`: the exit code, 128 + the signal number."""

    def __init__(self, message, code=130):
        super().__init__(message)
        self.code = code


def fail(message, code, error=True):
    """One line on stderr ("train.py: error: ...", or without "error:" for a deliberate stop), then exit."""
    cli.fail(PROGRAM, message, code, error)


def load_tensorflow():
    """Imports TensorFlow and initialises its devices with the start-up noise hidden; returns the module."""
    with quiet_native_logs():
        import tensorflow as tf
        tf.config.list_physical_devices()
    return tf


# ------------------------------------------------------------------------------------------- configuration

def flag_values_given(flag_values=FLAGS):
    """{flag name: value} of train.py's flags, None for a model-default flag that was not given."""
    return cli.given(RunConfig, flag_values, extra=ACTIONS)


# ------------------------------------------------------------------------------------------------ printing

def describe_schedule(config):
    """The learning-rate rule as a formula, e.g. 'lr = 0.01 * 0.6^epoch'."""
    lr = f"{config.learning_rate:g}"
    if config.lr_decay is None:
        return f"lr = {lr} (constant)"
    floor = f"{config.lr_min:g} + " if config.lr_min else ""
    if config.lr_decay_steps == "epoch":
        return f"lr = {floor}{lr} * {config.lr_decay:g}^epoch"
    return f"lr = {floor}{lr} * {config.lr_decay:.4g}^(step/{config.lr_decay_steps})"


def describe_training(config):
    steps = f", {config.steps_per_epoch} steps per epoch" if config.steps_per_epoch else ""
    dropout = f", dropout {config.dropout:g}" if config.dropout else ", no dropout"
    by_hand = ", gradients by hand" if config.gradients == "by_hand" else ""
    xla = ", step compiled by XLA" if config.jit_compile else ""
    precision = f", mixed precision ({config.precision})" if config.precision != "float32" else ""
    return (f"{config.optimizer} {describe_schedule(config)}, batch {config.batch_size}, "
            f"{plural(config.epochs, 'epoch')}{steps}{dropout}{by_hand}{xla}{precision}")


def list_models(registry):
    """The --list_models text: one block per model."""
    lines = []
    for name, spec in registry.items():
        config = make_config({"model": name}, registry)
        lines += [f"{name}", f"    {spec.description}", f"    defaults: {describe_training(config)}",
                  f"    target:   {spec.target}", f"    source:   {spec.source}", ""]
    return "\n".join(lines).rstrip() + "\n"


def print_summary(config, registry):
    """--summary: builds the model (seeded) and prints it with its training settings."""
    import datasets
    tf = load_tensorflow()
    replicas = summary_replicas(config)  # before any op: --cpu_devices splits the CPU
    tf.random.set_seed(config.seed)
    spec = registry[config.model]
    dataset = datasets.get(config.dataset)
    model = spec.build(config.dropout, num_classes=dataset.num_classes)
    model.build((None, *dataset.image_shape))
    if config.gradients == "by_hand":
        from core import backprop
        backprop.summary(model)
    else:
        model.summary()
    print(f"Training: {describe_training(config)}")
    print(f"Target:   {spec.target}")
    print(describe_step(config, model, replicas))


def summary_replicas(config):
    """How many replicas --strategy would make, without starting it (a multi-worker strategy would wait for
    its peers): the workers in $TF_CONFIG, or the local devices."""
    if config.strategy == "multi_worker":
        try:
            return len(json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {}).get("worker", [])) or 1
        except ValueError:
            return 1
    if config.strategy == "mirrored":
        return make_strategy(config).num_replicas_in_sync
    return 1


def describe_step(config, model, replicas):
    """The training step as it runs on each replica, with the all-reduce where it sits."""
    trainable = model.count_params()[1]
    slice_size = config.batch_size // replicas if config.batch_size % replicas == 0 else config.batch_size / replicas
    norm = ("all-reduce of sum, sum of squares and count per channel" if config.sync_batch_norm
            else "this replica's slice only")
    rows = [("x_r, y_r = replica r's rows of the global batch", f"{slice_size:g} of {config.batch_size} images"),
            ("L_r = mean loss over the slice / replicas", "BatchNorm statistics: " + norm),
            ("g_r = dL_r/dw", "backprop on the slice, no communication")]
    if replicas > 1:
        ring = 2 * (replicas - 1) / replicas * 4 * trainable
        rows.append(("L, g = all_reduce(SUM, (L_r, g_r))", f"{trainable:,} gradients + the loss: "
                     f"{4 * (trainable + 1) / 1e6:.2f} MB; a ring moves {ring / 1e6:.2f} MB per replica"))
    else:
        rows.append(("L, g = L_r, g_r", "one replica: nothing to all-reduce"))
    rows.append((f"w <- {config.optimizer}(w, g) if L and every g are finite", "the same update on every replica"))
    lines = [f"Step ({config.strategy} strategy, {plural(replicas, 'replica')}; on every replica r, in parallel):"]
    lines += [f"  {left:<52} {right}" for left, right in rows]
    return "\n".join(lines)


def make_strategy(config):
    """The tf.distribute strategy of --strategy (before any TensorFlow op); FlagError for a bad setting."""
    from core import distribute
    try:
        return distribute.make_strategy(config.strategy, config.cpu_devices, config.collective_timeout)
    except distribute.DistributeError as error:
        raise FlagError(str(error)) from None


def plural(count, word):
    return f"{count:,} {word}" + ("" if count == 1 else "s")


def percent(value):
    return f"{100 * value:.2f}%"


class EpochReport:
    """Trainer callback: one console line per epoch with the training and validation figures."""

    def __init__(self, epochs, validation_name, out=print):
        self.epochs = epochs
        self.validation_name = validation_name
        self.out = out

    def on_epoch_end(self, epoch, step, logs):
        line = (f"epoch {epoch}/{self.epochs}  step {step:,}  loss {logs['loss']:.4f}  "
                f"accuracy {percent(logs['accuracy'])}")
        if "val_loss" in logs:
            line += (f"  | {self.validation_name} loss {logs['val_loss']:.4f}  "
                     f"accuracy {percent(logs['val_accuracy'])}")
        line += f"  | lr {logs['learning_rate']:.3g}  {logs['seconds']:.1f} s"
        self.out(line)


# ------------------------------------------------------------------------------------------------- the run

def claim_run_dir(config):
    """Claims <logdir>/<run_name> for this process (locked until it ends; a new unique name by default) ->
    rundir.RunDir; FlagError (one line) if the directory is in use or cannot be used."""
    try:
        return rundir.claim(config.logdir, config.run_name, prefix=config.model, program=PROGRAM)
    except rundir.RunDirError as error:
        raise FlagError(str(error)) from None


def check_resume(config, run_dir):
    """Whether run_dir holds checkpoints to resume; FlagError if it may not be resumed with these settings.
    A run that holds checkpoints is never started over: its config.json must be readable and agree."""
    from core.checkpoint import holds_checkpoints
    if not holds_checkpoints(os.path.join(run_dir, "checkpoints")):
        return False
    if not config.resume:
        raise FlagError(f"{run_dir} already holds a checkpoint; drop --noresume to continue it, "
                        f"or pass another --run_name")
    try:
        started = rundir.read_json(os.path.join(run_dir, "config.json"))
    except rundir.RunDirError as error:
        raise FlagError(str(error)) from None
    if not isinstance(started, dict):
        raise FlagError(f"{run_dir} holds checkpoints but no usable config.json to check the settings against; "
                        f"restore it, or pass another --run_name")
    settings = dataclasses.asdict(config)
    for key in RESUME_KEYS:
        now = settings[key]
        # A setting added after the run was started had its default then.
        then = started.get(key, RunConfig.__dataclass_fields__[key].default)
        if then != now:
            raise FlagError(f"{run_dir} was started with --{key}={then}, not {now}; resume "
                            f"it with the same settings or pass another --run_name")
    return True


def check_export_dirs(config, run_dir):
    """[<run dir>/saved_model, --export_dir]: absolute, ~ expanded, symlinks resolved, each checked to be
    writable and replaceable (a previous export, or nothing) before any training; FlagError otherwise.
    Staging directories a killed export left beside them are removed."""
    from app import export
    targets = [(os.path.join(run_dir, "saved_model"), "the run's saved_model")]
    if config.export_dir:
        targets.append((config.export_dir, "--export_dir"))
    checked = []
    for path, what in targets:
        try:
            checked.append(export.check_target(path))
        except export.ExportError as error:
            raise FlagError(f"{what}: {error}") from None
        export.remove_leftovers(checked[-1])
    return checked


def load_data(config):
    """(train, validation, test, (image shape, number of classes)): the datasets and what their files hold;
    RunError(one line) if the files are unusable."""
    import datasets
    from core import data
    from datasets import idx
    try:
        data_dir = datasets.prepare(config.data_dir, config.dataset, download=True, progress=config.progress)
        shape = idx.describe(data_dir)
        train = idx.load(data_dir, "train")
        test = idx.load(data_dir, "test")
    except idx.DataError as error:
        raise RunError(str(error)) from None
    if config.validation == "holdout":
        train, validation = data.split_validation(train, HOLDOUT_EXAMPLES)
    else:
        validation = test
    return train, validation, test, shape


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


def run(config, out=print):
    """Trains `config.model` as configured and returns the figures written to metrics.json.

    The strategy is made first (before any op: --cpu_devices splits the CPU), then the data is read and checked
    with the flags that depend on it (check_data), and only then is the run directory claimed (claim_run_dir)
    and held until the end; a start that fails before writing into a new run directory removes it. Under
    --strategy=multi_worker only the chief claims and writes the run; every other worker reads the chief's
    directory (to resume) and writes a temporary copy it removes.
    Raises FlagError (bad settings found once the data is known, a run or export directory that cannot be used
    or resumed), RunError (data, non-finite loss, checkpoint or export problems, a lost worker) and Interrupted
    (SIGINT, SIGTERM), each with a one-line message.
    """
    if config.strategy == "multi_worker" and not config.run_name:
        raise FlagError("--strategy=multi_worker needs --run_name: every worker must name the same run")
    strategy = make_strategy(config)
    from core import distribute
    data = check_data(config, strategy, out)
    claimed = claim_run_dir(config) if distribute.is_chief(strategy) else None
    run_dir = claimed.path if claimed else os.path.join(os.path.expanduser(config.logdir), config.run_name)
    try:
        with lost_workers(strategy, config.collective_timeout):
            return train_in(run_dir, config, strategy, data, out)
    except BaseException as error:
        discarded = claimed is not None and claimed.discard()
        if isinstance(error, KeyboardInterrupt):  # outside the training loop, or a second signal inside it
            raise Interrupted(interrupted(run_dir, error, resume_hint(config, run_dir), discarded),
                              getattr(error, "exit_code", 130)) from None
        raise
    finally:
        if claimed:
            claimed.release()


def resume_hint(config, run_dir):
    """How to resume the run in `run_dir`: the same command, and its --run_name when the command lacks one."""
    named = "" if config.run_name else f" and --run_name={os.path.basename(run_dir)}"
    return f"resume with the same command{named}"


def interrupted(run_dir, interrupt, hint, discarded=False):
    """The one line for a run ended by a signal outside the training loop: what is kept, how to resume."""
    from core.checkpoint import on_disk
    what = f"stopped by {getattr(interrupt, 'name', 'SIGINT')}"
    if discarded:
        return f"{what} during start-up; nothing was written"
    if on_disk(os.path.join(run_dir, "checkpoints")):
        return f"{what}; the last checkpoint in {run_dir} is kept: {hint}"
    return f"{what} before the first checkpoint; nothing to resume in {run_dir}"


@contextlib.contextmanager
def lost_workers(strategy, timeout):
    """A collective that fails because a worker is gone -> one RunError naming it."""
    import tensorflow as tf
    from core import distribute
    try:
        yield
    except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.CancelledError,
            tf.errors.AbortedError) as error:
        if distribute.worker_index(strategy)[1] == 1:
            raise
        lost = distribute.lost_worker(error)
        what = (f"lost {lost}: a collective operation failed" if lost else
                f"no answer from another worker within --collective_timeout={timeout:g} s"
                if isinstance(error, tf.errors.DeadlineExceededError) else
                f"lost a worker: a collective operation failed ({type(error).__name__})")
        raise RunError(f"{what}; restart every worker with the same command to resume from the last "
                       f"checkpoint") from None


def check_data(config, strategy, out=print):
    """The data, read and checked with the flags that depend on it, before any run directory is claimed:
    ((train, validation, test), (image shape, number of classes), steps per epoch). FlagError or RunError."""
    from core import distribute
    try:
        distribute.replica_batch_size(config.batch_size, strategy)
    except distribute.DistributeError as error:
        raise FlagError(str(error)) from None
    train, validation, test, data_shape = load_data(config)
    train_count = int(train.cardinality())
    full_epoch = train_count // config.batch_size
    if full_epoch < 1:
        raise FlagError(f"--batch_size={config.batch_size} is larger than the {train_count:,} training images")
    if config.steps_per_epoch and config.steps_per_epoch > full_epoch:
        out(f"note: {config.steps_per_epoch} steps per epoch is more than one pass over {train_count:,} "
            f"images at batch {config.batch_size}; using {full_epoch}")
    return (train, validation, test), data_shape, min(config.steps_per_epoch or full_epoch, full_epoch)


def train_in(run_dir, config, strategy, data, out=print):
    """run()'s work for the run in `run_dir` (claimed by this process, or the chief's under multi_worker) on
    check_data's `data`."""
    tf = load_tensorflow()
    from core import distribute

    spec = REGISTRY[config.model]
    splits, (image_shape, num_classes), steps_per_epoch = data
    resuming = check_resume(config, run_dir)
    # The chief writes the run; another worker takes part in every save but writes into a temporary copy.
    writes = distribute.WorkerDirectory(run_dir, strategy)
    try:
        if writes.chief:
            export_dirs = check_export_dirs(config, run_dir)
        else:  # a copy nobody reads: exporting reads every replica, so every worker exports
            export_dirs = [os.path.join(writes.path, "saved_model")] + (
                [os.path.join(writes.path, "export")] if config.export_dir else [])
        tf.config.experimental.enable_op_determinism()
        tf.random.set_seed(config.seed)
        schedule = names.learning_rate_schedule(config, steps_per_epoch)
        with strategy.scope():  # every variable mirrored on each replica (docs/distributed.md)
            model = spec.build(config.dropout, num_classes=num_classes, sync_batch_norm=config.sync_batch_norm)
            model.build((None, *image_shape))
            optimizer = names.optimizer(config, schedule)
        return train_and_export(config, strategy, spec, model, optimizer, schedule, run_dir, writes.path,
                                export_dirs, resuming, splits, (image_shape, num_classes), steps_per_epoch, out)
    finally:
        writes.cleanup()


def train_and_export(config, strategy, spec, model, optimizer, schedule, chief_run_dir, run_dir, export_dirs,
                     resuming, splits, data_shape, steps_per_epoch, out):
    """Trains, evaluates and exports; writes into `run_dir` (the chief's run directory, or a worker's copy)."""
    from app.summaries import LastGradients
    from core import data, distribute
    from core.checkpoint import CheckpointUnreadableError, CheckpointWriteError
    from core.trainer import CheckpointMismatchError, EarlyStopping, NonFiniteError, Trainer
    from datasets.idx import shape_text
    started = time.monotonic()
    train, validation, test = splits
    chief = run_dir == chief_run_dir
    if not resuming and chief:
        rundir.write_json(os.path.join(run_dir, "config.json"), dataclasses.asdict(config))
    validation_name = "test" if config.validation == "test" else "held-out"
    total, trainable, non_trainable = model.count_params()
    image_shape, num_classes = data_shape
    out(f"{config.model}: {spec.description}")
    out(f"  {total:,} parameters ({non_trainable:,} non-trainable); {describe_training(config)}")
    out(f"  {int(train.cardinality()):,} training images {shape_text(image_shape)} in {num_classes} classes, "
        f"{steps_per_epoch} steps per epoch; validation: {validation_name}")
    out(f"  run directory: {chief_run_dir}" + (" (resuming from its checkpoint)" if resuming else ""))
    if config.strategy != "default":
        per_replica = plural(distribute.replica_batch_size(config.batch_size, strategy), "image")
        out(f"  {distribute.describe(strategy)}; {per_replica} per replica"
            + ("" if chief else "; the chief writes the run") + one_cpu_hint(config, strategy))

    # The applied gradients, kept for TensorBoard; not in mixed precision, whose step computes its own gradients
    # (core/precision.py), so TensorBoard shows no gradients rather than zeros.
    last_gradients = None
    if config.precision == "float32":
        with strategy.scope():
            last_gradients = LastGradients(model)
    stop = interrupts.StopOnSignal()
    callbacks = [EpochReport(config.epochs, validation_name, out), stop]
    callbacks += tensorboard_callbacks(config, run_dir, schedule, steps_per_epoch, test, last_gradients)
    trainer = Trainer(model, optimizer, callbacks=callbacks, log_every=config.log_every,
                      **gradient_options(config, last_gradients),
                      checkpoint_dir=os.path.join(chief_run_dir, "checkpoints"),
                      checkpoint_write_dir=os.path.join(run_dir, "checkpoints"),
                      checkpoint_every=config.checkpoint_every, keep_checkpoints=config.keep_checkpoints,
                      progress=config.progress, steps_per_loop=config.steps_per_loop, strategy=strategy,
                      precision=config.precision, jit_compile=config.jit_compile,
                      early_stopping=EarlyStopping(config.early_stopping, config.early_stopping_metric,
                                                   config.restore_best)
                      if config.early_stopping or config.restore_best else None)
    if strategy.num_replicas_in_sync == 1:  # the batches gathered inside the compiled loop: no input pipeline
        batches = data.GatheredBatches(train, config.batch_size, config.seed)
    else:  # the same batches from tf.data, which the strategy splits among the replicas
        batches = functools.partial(data.training_batches, train, config.batch_size, config.seed)
    try:
        with stop:
            history = trainer.fit(batches, config.epochs, validation_data=data.evaluation_batches(validation),
                                  steps_per_epoch=steps_per_epoch)
    except NonFiniteError as error:
        raise RunError(f"{error}; try a smaller --learning_rate") from None
    except CheckpointMismatchError as error:
        raise FlagError(f"{chief_run_dir}: the checkpoint does not fit this model ({error}); "
                        f"pass another --run_name") from None
    except (CheckpointUnreadableError, CheckpointWriteError) as error:
        raise RunError(str(error)) from None
    if stop.signum:
        raise Interrupted(f"stopped by {stop.name} at step {int(optimizer.step.numpy()):,}; its checkpoint is in "
                          f"{trainer.checkpointer.latest}: {resume_hint(config, chief_run_dir)}", stop.exit_code)
    results = trainer.evaluate(data.evaluation_batches(test))

    exported = [export_model(model, path, chief_run_dir) for path in export_dirs]

    epochs = history.epochs
    best = max(epochs, key=lambda e: e.get("val_accuracy", -1.0)) if epochs else None
    metrics = {
        "model": config.model,
        "test_accuracy": results["accuracy"],
        "test_loss": results["loss"],
        "validation": config.validation,
        "best_val_accuracy": best.get("val_accuracy") if best else None,
        "best_epoch": best["epoch"] if best else None,
        "final_val_accuracy": epochs[-1].get("val_accuracy") if epochs else None,
        "epochs": len(epochs),
        "steps": int(optimizer.step.numpy()),
        "train_seconds": sum(e["seconds"] for e in epochs),
        "wall_seconds": time.monotonic() - started,
        "params": {"total": total, "trainable": trainable, "non_trainable": non_trainable},
        "target": spec.target,
        "run_dir": chief_run_dir,
        "saved_model": exported,
        "pictures": sorted(f for f in os.listdir(run_dir) if f.endswith(".png")),
        "resumed": resuming,
        "stopped": history.stopped,
        "hparams": config.hparams(),
    }
    rundir.write_json(os.path.join(run_dir, "metrics.json"), metrics)
    if config.strategy == "multi_worker":
        index, count = distribute.worker_index(strategy)
        out(f"worker {index} of {count}: weights sha256 {weights_digest(model)} (every worker prints the same)")
    if chief:
        report(metrics, config, out, full_run=codelab_run(config, spec, int(train.cardinality()), steps_per_epoch))
    return metrics


def one_cpu_hint(config, strategy):
    """'; no GPU found: --cpu_devices=2 ...' when --strategy=mirrored found one CPU device only, else ''."""
    import tensorflow as tf
    if config.strategy != "mirrored" or strategy.num_replicas_in_sync > 1 or tf.config.list_logical_devices("GPU"):
        return ""
    return "; no GPU found: --cpu_devices=2 splits the CPU into 2 devices to try data parallelism"


def codelab_run(config, spec, train_count, steps_per_epoch):
    """{"epochs": the epochs of the model's codelab run (the one its target is for), "reached": whether this
    run trains on at least as many images}."""
    codelab = make_config({"model": config.model}, {config.model: spec})
    full_epoch = train_count // codelab.batch_size
    codelab_images = codelab.epochs * min(codelab.steps_per_epoch or full_epoch, full_epoch) * codelab.batch_size
    return {"epochs": codelab.epochs,
            "reached": config.epochs * steps_per_epoch * config.batch_size >= codelab_images}


def weights_digest(model):
    """The first 16 hex digits of sha256 over this process's copy of every model variable."""
    import hashlib
    digest = hashlib.sha256()
    for variable in model.variables:
        digest.update(variable.read_value().numpy().tobytes())
    return digest.hexdigest()[:16]


def gradient_options(config, last_gradients):
    """The Trainer's compute_gradients: gradient_function's, recorded into `last_gradients`; none without them
    (mixed precision: the runner's own)."""
    if last_gradients is None:
        return {}
    return {"compute_gradients": last_gradients.recording(names.gradient_function(config.gradients))}


def tensorboard_callbacks(config, run_dir, schedule, steps_per_epoch, test, gradients):
    """[TensorBoard callback] writing into run_dir: scalars each epoch, histograms and pictures of the first
    1,000 test images every config.summaries_every_epochs-th epoch, the last step's gradients (`gradients`, a
    LastGradients, or None), the graph, the hparams, and at the end curves.png, learning_rate.png,
    predictions.png (layout: app/summaries.py); printed digits too when the data set is handwritten digits of
    its own shape."""
    import datasets
    from app.summaries import TensorBoard
    sample_images, sample_labels = next(iter(test.batch(1000)))
    dataset = datasets.get(config.dataset)
    font_digits = dataset.digits and tuple(sample_images.shape[1:]) == dataset.image_shape
    return [TensorBoard(run_dir, sample_images, sample_labels, hparams=config.hparams(), schedule=schedule,
                        total_steps=config.epochs * steps_per_epoch, font_digits=font_digits,
                        summaries_every_epochs=config.summaries_every_epochs, gradients=gradients)]


def export_model(model, export_dir, run_dir):
    """export.export_saved_model, with its failures as a one-line RunError that says how to export again."""
    from app import export
    again = (f"the trained weights are in {os.path.join(run_dir, 'checkpoints')}: run the same command with "
             f"--run_name={os.path.basename(run_dir)} to export without training again")
    try:
        return export.export_saved_model(model, export_dir)
    except (export.ExportError, OSError) as error:
        raise RunError(f"export failed: {error}; {again}") from None
    except Exception as error:  # a failed trace of the serving functions: the run's work is safe all the same
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [""]
        # "... for the following reason(s):" is followed by the reason
        what = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]
        raise RunError(f"export failed ({type(error).__name__}: {what}); {again}") from None


def report(metrics, config, out=print, full_run=None):
    """The closing lines: accuracies, wall time, where everything is. full_run: codelab_run's answer; a run
    shorter than the codelab's says that the target is the full run's."""
    run_dir = metrics["run_dir"]
    best = metrics["best_val_accuracy"]
    target = (f"(target: {metrics['target']})" if full_run is None or full_run["reached"] else
              f"(target of the full {full_run['epochs']}-epoch run: {metrics['target']})")
    if config.validation == "test" and best is not None:
        out(f"test accuracy: final {percent(metrics['test_accuracy'])}, best {percent(best)} "
            f"(epoch {metrics['best_epoch']})   {target}")
    else:
        held_out = f", best held-out {percent(best)} (epoch {metrics['best_epoch']})" if best is not None else ""
        out(f"test accuracy: final {percent(metrics['test_accuracy'])}{held_out}   {target}")
    stopped = metrics.get("stopped") or {}
    if stopped.get("reason") == "early_stopping":
        out(f"stopped early after epoch {stopped['stopped_epoch']}: no better {stopped['metric']} than epoch "
            f"{stopped['best_epoch']}'s {stopped['best']:.4f} for {plural(stopped['patience'], 'epoch')}")
    if stopped.get("restored"):
        out(f"weights: epoch {stopped['best_epoch']}'s (best {stopped['metric']} {stopped['best']:.4f}), "
            f"tested and exported")
    out(f"wall time: {metrics['wall_seconds']:.1f} s "
        f"({plural(metrics['steps'], 'step')}, {plural(metrics['epochs'], 'epoch')})")
    out(f"logs:        {run_dir}   (tensorboard --logdir {config.logdir})")
    pictures = ", ".join(metrics["pictures"]) or "none"
    out(f"pictures:    {pictures} in {run_dir}")
    out(f"checkpoints: {os.path.join(run_dir, 'checkpoints')}")
    out(f"saved model: {', '.join(metrics['saved_model'])}")
    out(f"metrics:     {os.path.join(run_dir, 'metrics.json')}")


# ---------------------------------------------------------------------------------------------------- main

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
