"""run(config): one training run, as train.py and the tests start it in-process. The strategy first, then the data
read and checked, then the run directory claimed; training with checkpoints, TensorBoard and early stopping;
then the test figures, the SavedModel export, metrics.json and the closing report.

    metrics = run(make_config({"model": "conv", "epochs": 2}), out=lines.append)

Errors are one line each: FlagError (app.settings) for settings or directories that cannot be used, RunError
for data, numbers, checkpoints or export, Interrupted for a signal (its exit code 128 + the signal).
"""
import contextlib
import dataclasses
import functools
import os
import signal
import time
import zlib

from app.console import EpochReport, describe_training, plural, one_cpu_hint, report
from app.rundirs import check_export_dirs, check_resume, claim_run_dir, interrupted, resume_hint
from app.settings import HOLDOUT_EXAMPLES, FlagError, make_config, make_strategy
from core import interrupts, names, rundir
from core.native_logs import load_tensorflow
from models import REGISTRY

__all__ = ["RunError", "Interrupted", "run", "load_data", "export_model", "codelab_run"]


class RunError(RuntimeError):
    """Training could not start or finish (data, numbers, export); the message is one line."""


class Interrupted(RunError):
    """Ctrl-C or SIGTERM; the message says what was kept. `code`: the exit code, 128 + the signal number."""

    def __init__(self, message, code=130):
        super().__init__(message)
        self.code = code


def load_data(config):
    """(train, validation, test, (image shape, number of classes)): the splits as core.data.Examples and what
    their files hold; RunError(one line) if the files are unusable."""
    import datasets
    try:
        loaded = datasets.load(config.dataset, config.data_dir, progress=config.progress)
    except datasets.DataError as error:
        raise RunError(str(error)) from None
    train, validation = loaded.train, loaded.test
    if config.validation == "holdout":
        train, validation = loaded.train.split(HOLDOUT_EXAMPLES)
    return train, validation, loaded.test, (loaded.image_shape, loaded.num_classes)


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
    with lost_workers(strategy, config.collective_timeout):
        check_same_settings(config, strategy)
    data = check_data(config, strategy, out)
    with lost_workers(strategy, config.collective_timeout):
        check_same_data(data, strategy)
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


# What each worker of a multi-worker job may set for itself: where its files are, and its progress bar.
PER_WORKER_SETTINGS = ("data_dir", "logdir", "export_dir", "progress")


def workers_differ(strategy, values):
    """The names of `values` ({name: value}) whose value is not the same on every worker: one exchange of a digest
    per name (distribute.WorkerTable), the same answer on every worker; [] without a cluster."""
    from core import distribute
    names = list(values)
    digests = [zlib.crc32(repr(values[name]).encode()) % 2 ** 24 for name in names]
    table = distribute.WorkerTable(strategy, len(names))(digests)
    return [name for name, column in zip(names, table.T) if len(set(column.tolist())) > 1]


def check_same_settings(config, strategy):
    """FlagError naming the settings in which the workers' commands differ: every worker must run the same
    command (but for PER_WORKER_SETTINGS), or their collectives mismatch."""
    differ = workers_differ(strategy, {f"--{field.name}": getattr(config, field.name)
                                       for field in dataclasses.fields(config)
                                       if field.name not in PER_WORKER_SETTINGS})
    if differ:
        raise FlagError(f"the workers' commands differ in {', '.join(differ)}: every worker must run the same "
                        f"command (only --{', --'.join(PER_WORKER_SETTINGS)} may differ)")


def check_same_data(data, strategy):
    """RunError naming what differs when the workers read different data (their --data_dir may differ, the data
    may not): the counts, the image shape, the classes, and a checksum of every split's pixels and labels."""
    from core import distribute
    if distribute.worker_index(strategy)[1] == 1:
        return
    (train, validation, test), (image_shape, classes), _ = data
    values = {"image shape": image_shape, "classes": classes}
    splits = [("training", train), ("test", test)] + ([] if validation is test else [("validation", validation)])
    for name, split in splits:  # --validation=test: the test split is read once
        values[f"{name} images"] = (len(split), zlib.crc32(split.images.numpy().tobytes()),
                                    zlib.crc32(split.labels.numpy().tobytes()))
    differ = workers_differ(strategy, values)
    if differ:
        raise RunError(f"the workers' data differ in {', '.join(differ)}: every worker must read the same data set "
                       f"(--data_dir may differ, its files may not)")


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
    train_count = len(train)
    full_epoch = train_count // config.batch_size
    if full_epoch < 1:
        raise FlagError(f"--batch_size={config.batch_size} is larger than the {train_count:,} training images")
    if config.steps_per_epoch and config.steps_per_epoch > full_epoch:
        out(f"note: {config.steps_per_epoch} steps per epoch is more than one pass over {train_count:,} "
            f"images at batch {config.batch_size}; using {full_epoch}")
    steps_per_epoch = min(config.steps_per_epoch or full_epoch, full_epoch)
    if steps_per_epoch < config.grad_accum_steps:
        raise FlagError(f"--grad_accum_steps={config.grad_accum_steps} needs that many batches per epoch, an epoch "
                        f"has {steps_per_epoch}")
    return (train, validation, test), data_shape, steps_per_epoch


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
        schedule = names.learning_rate_schedule(config, steps_per_epoch // config.grad_accum_steps)  # in updates
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
    from core import data, distribute
    from core.checkpoint import CheckpointUnreadableError, CheckpointWriteError
    from core.trainer import CheckpointMismatchError, EarlyStopping, NonFiniteError, Runner, Trainer
    from datasets import shape_text
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
    out(f"  {len(train):,} training images {shape_text(image_shape)} in {num_classes} classes, "
        f"{steps_per_epoch} steps per epoch{updates_text(config, steps_per_epoch)}; validation: {validation_name}")
    out(f"  run directory: {chief_run_dir}" + (" (resuming from its checkpoint)" if resuming else ""))
    if config.strategy != "default":
        per_replica = plural(distribute.replica_batch_size(config.batch_size, strategy), "image")
        out(f"  {distribute.describe(strategy)}; {per_replica} per replica"
            + ("" if chief else "; the chief writes the run") + one_cpu_hint(config, strategy))

    stop = interrupts.StopOnSignal()
    callbacks = [EpochReport(config.epochs, validation_name, out), stop]
    callbacks += tensorboard_callbacks(config, run_dir, schedule, steps_per_epoch, test)
    runner = Runner(model, optimizer, compute_gradients=names.gradient_function(config.gradients),
                    strategy=strategy, precision=config.precision, jit_compile=config.jit_compile,
                    grad_accum_steps=config.grad_accum_steps, ema=config.ema)
    stopping = (EarlyStopping(config.early_stopping, config.early_stopping_metric, config.restore_best)
                if config.early_stopping or config.restore_best else None)
    trainer = Trainer(runner, callbacks=callbacks, log_every=config.log_every,
                      checkpoint_dir=os.path.join(chief_run_dir, "checkpoints"),
                      checkpoint_write_dir=os.path.join(run_dir, "checkpoints"),
                      checkpoint_every=config.checkpoint_every, keep_checkpoints=config.keep_checkpoints,
                      progress=config.progress, steps_per_loop=config.steps_per_loop, early_stopping=stopping)
    if strategy.num_replicas_in_sync == 1:  # the batches gathered inside the compiled loop: no input pipeline
        batches = data.GatheredBatches(train, config.batch_size, config.seed)
    else:  # the same batches from tf.data, which the strategy splits among the replicas
        batches = functools.partial(data.training_batches, train, config.batch_size, config.seed)
    try:
        with stop:
            history = trainer.fit(batches, config.epochs, validation_data=data.evaluation_batches(validation),
                                  steps_per_epoch=steps_per_epoch)
    except NonFiniteError as error:
        too_large = "--lr_min" if config.lr_min > config.learning_rate else "--learning_rate"  # the rate's floor
        raise RunError(f"{error}; try a smaller {too_large}") from None
    except CheckpointMismatchError as error:
        raise FlagError(f"{chief_run_dir}: the checkpoint does not fit this model ({error}); "
                        f"pass another --run_name") from None
    except (CheckpointUnreadableError, CheckpointWriteError) as error:
        raise RunError(str(error)) from None
    # The checkpoint as the chief wrote it (another worker's own copy is deleted when it exits).
    kept = os.path.join(chief_run_dir, "checkpoints", os.path.basename(trainer.checkpointer.latest or ""))
    if stop.signum:
        raise Interrupted(f"stopped by {stop.name} at step {int(optimizer.step.numpy()):,}; its checkpoint is in "
                          f"{kept}: {resume_hint(config, chief_run_dir)}", stop.exit_code)
    if history.stopped["reason"] == "stopped":  # another worker was stopped by a signal, and every worker with it
        workers = ", ".join(str(index) for index in trainer.stopped_by)
        raise Interrupted(f"stopped at step {int(optimizer.step.numpy()):,} with worker {workers}, which was "
                          f"interrupted; its checkpoint is in {kept}: {resume_hint(config, chief_run_dir)}",
                          128 + signal.SIGTERM)
    results = tested_at_the_last_epoch_end(history, int(optimizer.step.numpy())) if validation is test else None
    if results is None:
        results = trainer.evaluate(data.evaluation_batches(test))

    with runner.averaged_weights():  # --ema: the moving averages are the exported model
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
        report(metrics, config, out, full_run=codelab_run(config, spec, len(train), steps_per_epoch))
    return metrics


def tested_at_the_last_epoch_end(history, step):
    """{loss, accuracy} of the last epoch end's validation when it evaluated the weights the model holds now (it
    ended at `step` and early stopping restored no other epoch's), else None. With --validation=test that
    evaluation is the test: evaluating the same weights on the same images again gives the same figures."""
    last = history.epochs[-1] if history.epochs else {}
    if last.get("step") != step or "val_loss" not in last or history.stopped.get("restored"):
        return None
    return {"loss": last["val_loss"], "accuracy": last["val_accuracy"]}


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


def updates_text(config, steps_per_epoch):
    """' (46 updates of 4 batches)' with --grad_accum_steps above 1, else ''."""
    accumulate = config.grad_accum_steps
    return f" ({steps_per_epoch // accumulate} updates of {accumulate} batches)" if accumulate > 1 else ""


def tensorboard_callbacks(config, run_dir, schedule, steps_per_epoch, test):
    """[TensorBoard callback] writing into run_dir: scalars each epoch, histograms and pictures of the first
    1,000 test images every config.summaries_every_epochs-th epoch, the gradients the last update applied
    (Runner.named_gradients), the graph, the hparams, and at the end curves.png, learning_rate.png,
    predictions.png (layout: app/summaries.py); printed digits too when the data set is handwritten digits of
    its own shape."""
    import datasets
    from app.summaries import TensorBoard
    from core import data
    (sample_images, sample_labels), = data.evaluation_batches(test.take(1000))
    dataset = datasets.get(config.dataset)
    font_digits = dataset.digits and tuple(sample_images.shape[1:]) == dataset.image_shape
    return [TensorBoard(run_dir, sample_images, sample_labels, hparams=config.hparams(), schedule=schedule,
                        total_steps=config.epochs * (steps_per_epoch // config.grad_accum_steps),
                        font_digits=font_digits, summaries_every_epochs=config.summaries_every_epochs,
                        gradients=True)]


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
