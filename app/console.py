"""What train.py prints: the settings in words, --list_models and --summary, a line per epoch and the closing
report. Text only, apart from --summary, which builds the model to print it."""
import json
import os

from app.settings import make_config, make_strategy
from core.native_logs import load_tensorflow

__all__ = ["describe_schedule", "describe_training", "list_models", "print_summary", "describe_step", "plural",
           "percent", "EpochReport", "one_cpu_hint", "report"]


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
    accumulated = (f", {config.grad_accum_steps} batches per update (gradients accumulated)"
                   if config.grad_accum_steps > 1 else "")
    averaged = f", evaluated on the weights' moving average (decay {config.ema:g})" if config.ema is not None else ""
    return (f"{config.optimizer} {describe_schedule(config)}, batch {config.batch_size}, "
            f"{plural(config.epochs, 'epoch')}{steps}{dropout}{by_hand}{xla}{precision}{accumulated}{averaged}")


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


def one_cpu_hint(config, strategy):
    """'; no GPU found: --cpu_devices=2 ...' when --strategy=mirrored found one CPU device only, else ''."""
    import tensorflow as tf
    if config.strategy != "mirrored" or strategy.num_replicas_in_sync > 1 or tf.config.list_logical_devices("GPU"):
        return ""
    return "; no GPU found: --cpu_devices=2 splits the CPU into 2 devices to try data parallelism"


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
