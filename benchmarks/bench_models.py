"""Benchmark (not a test): train every model with its codelab defaults through train.py's own code path,
print best and final test accuracy and wall time per model as a markdown table, and time one conv training
step of our Trainer against keras model.fit on the same batches in the same process.

    python benchmarks/bench_models.py                                  # everything, hours on a small CPU
    python benchmarks/bench_models.py --models=conv,conv_bn --seed=2   # some models
    python benchmarks/bench_models.py --steps=20 --timing_steps=20     # a quick check that it all works
    python benchmarks/bench_models.py --models=conv_bn --formulas      # every layer on its formula (fused=False)

train.py's flags (--epochs, --steps_per_epoch, --data_dir, --logdir, --seed, ...) apply to every model.
The figures also go into this command's section of benchmarks/RESULTS.md.
"""
import dataclasses
import math
import os
import statistics
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train  # noqa: E402  (defines train.py's flags, which this script accepts too)
from app.console import describe_training  # noqa: E402
from app.run import load_data  # noqa: E402
from benchmarks import results  # noqa: E402
from core import cli  # noqa: E402
from core.native_logs import load_tensorflow  # noqa: E402

flags.DEFINE_list("models", None, "Models to train (default: all of them, in the codelab's order).")
flags.DEFINE_integer("steps", None, "Quick check: train each model for 1 epoch of this many steps "
                     "(overrides --epochs and --steps_per_epoch).")
flags.DEFINE_integer("timing_steps", 200, "Steps timed for the conv ms/step comparison (after a warm-up); "
                     "0 skips it.")
flags.DEFINE_integer("warmup_steps", 20, "Steps run (and not timed) before the timed ones.")
flags.DEFINE_bool("formulas", False, "Every layer on its formula (fused=False, the reference path) instead of its "
                  "fused kernel: the accuracy that the fast paths must leave unchanged.")
FLAGS = flags.FLAGS

SEEDS = {"conv_bn": 3}  # conv_bn's target is the median of 3 seeds


def seeds_for(name, seed):
    """The seeds a model is trained with: its target is judged on the median of SEEDS[name] runs."""
    return [seed + i for i in range(SEEDS.get(name, 1))]


def train_all(names, overrides, stamp, formulas=False):
    """Runs train.run for each model (and seed); returns [(name, seed, metrics)]. formulas: every layer of the
    models on its formula."""
    from models import REGISTRY
    rows = []
    for name in names:
        for seed in seeds_for(name, overrides.get("seed") or 1):
            values = {**overrides, "model": name, "seed": seed, "run_name": f"bench-{name}-s{seed}-{stamp}"}
            config = train.make_config(values, REGISTRY)
            print(f"\n=== {name}, seed {seed}{', every layer on its formula' if formulas else ''}: "
                  f"{describe_training(config)}", flush=True)
            spec = REGISTRY[name]
            if formulas:
                REGISTRY[name] = with_formulas(spec)
            try:
                rows.append((name, seed, train.run(config)))
            finally:
                REGISTRY[name] = spec
    return rows


def with_formulas(spec):
    """A copy of the ModelSpec `spec` whose models have every layer on its formula (fused=False)."""
    from benchmarks.fast_path_levers import on_formulas
    build = spec.build

    def formulas(*args, **kwargs):
        model = build(*args, **kwargs)
        on_formulas(model, "formulas")
        return model
    copy = dataclasses.replace(spec)
    object.__setattr__(copy, "build", formulas)  # build's options go through to the spec's own builder
    return copy


def markdown_table(rows):
    """One row per run, then a median row for a model trained with several seeds."""
    lines = ["| model | seed | target | final test accuracy | best test accuracy (epoch) | wall time | steps | "
             "ms/step (with evaluation) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in dict.fromkeys(name for name, _, _ in rows):
        runs = [(seed, m) for row_name, seed, m in rows if row_name == name]
        for seed, m in runs:
            best = f"{100 * m['best_val_accuracy']:.2f}% ({m['best_epoch']})" if m["best_val_accuracy"] else "-"
            if m["validation"] != "test":
                best += " held-out"
            per_step = 1000 * m["train_seconds"] / max(m["steps"], 1)
            lines.append(f"| {name} | {seed} | {m['target']} | {100 * m['test_accuracy']:.2f}% | {best} | "
                         f"{_duration(m['wall_seconds'])} | {m['steps']:,} | {per_step:.1f} |")
        if len(runs) > 1:
            median = statistics.median(m["test_accuracy"] for _, m in runs)
            lines.append(f"| {name} | median of {len(runs)} | | {100 * median:.2f}% | | | | |")
    return "\n".join(lines)


def _duration(seconds):
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


class _StepClock:
    """Wall-clock time at chosen step counts (the caller makes sure the step has really finished)."""

    def __init__(self, marks):
        self.marks = set(marks)
        self.times = {}

    def tick(self, step):
        if step in self.marks:
            self.times[step] = time.perf_counter()


def time_ours(tf, train_set, batch_size, learning_rate, seed, warmup, steps):
    """ms per step of core.trainer.Trainer.fit on the conv model (log points at warmup and warmup + steps)."""
    from core import data, optimizers
    from core.trainer import Callback, Runner, Trainer
    from models import REGISTRY

    clock = _StepClock([warmup, warmup + steps])

    class Clock(Callback):
        def on_log(self, step, logs):  # a log point reads the metric variables: the step has finished
            clock.tick(step)

    tf.random.set_seed(seed)
    model = REGISTRY["conv"].build(REGISTRY["conv"].defaults["dropout"])
    trainer = Trainer(Runner(model, optimizers.Adam(learning_rate)), callbacks=[Clock()],
                      log_every=math.gcd(warmup, steps), progress=False)
    trainer.fit(lambda epoch: data.training_batches(train_set, batch_size, seed, epoch), epochs=1,
                steps_per_epoch=warmup + steps)
    return 1000 * (clock.times[warmup + steps] - clock.times[warmup]) / steps


def time_keras(tf, train_set, batch_size, learning_rate, seed, warmup, steps):
    """ms per step of keras model.fit on the same architecture and the same batches."""
    import keras
    from core import data

    layers = keras.layers
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((28, 28, 1)),
        layers.Conv2D(12, 3, padding="same", activation="relu"),
        layers.Conv2D(24, 6, strides=2, padding="same", activation="relu"),
        layers.Conv2D(32, 6, strides=2, padding="same", activation="relu"),
        layers.Flatten(),
        layers.Dense(200, activation="relu"),
        layers.Dropout(0.5),
        layers.Dense(10),
    ])
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"],
                  jit_compile=False)
    clock = _StepClock([warmup, warmup + steps])

    class Clock(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch + 1 in clock.marks:
                int(self.model.optimizer.iterations.numpy())  # wait for the step to finish
                clock.tick(batch + 1)

    model.fit(data.training_batches(train_set, batch_size, seed, 0).take(warmup + steps), epochs=1, verbose=0,
              shuffle=False, callbacks=[Clock()])
    return 1000 * (clock.times[warmup + steps] - clock.times[warmup]) / steps


def compare_step_time(overrides, warmup, steps):
    """Ours vs Keras ms/step for conv at its default batch size and learning rate, as markdown."""
    from models import REGISTRY
    config = train.make_config({**overrides, "model": "conv"}, REGISTRY)
    tf = load_tensorflow()
    tf.config.experimental.enable_op_determinism()
    train_set = load_data(config)[0]
    args = (tf, train_set, config.batch_size, config.learning_rate, config.seed, warmup, steps)
    keras_runs, ours_runs = [], []
    for _ in range(2):  # alternated, so a change in the shared CPU's load hits both
        keras_runs.append(time_keras(*args))
        ours_runs.append(time_ours(*args))
    ours_ms, keras_ms = min(ours_runs), min(keras_runs)
    return "\n".join([
        f"conv training step, batch {config.batch_size}, {steps} steps timed after {warmup} warm-up steps, "
        f"same batches, same process, op determinism on, no XLA (best of 2 alternated runs):",
        "",
        "| trainer | ms/step | runs |", "| --- | --- | --- |",
        f"| ours (core.trainer.Trainer.fit) | {ours_ms:.1f} | {', '.join(f'{t:.1f}' for t in ours_runs)} |",
        f"| keras model.fit | {keras_ms:.1f} | {', '.join(f'{t:.1f}' for t in keras_runs)} |",
        "",
        f"ratio ours / keras: {ours_ms / keras_ms:.2f}"])


def main(argv):
    if len(argv) > 1:
        train.fail(f"unexpected arguments: {' '.join(argv[1:])}", 2)
    from absl import logging
    logging.set_verbosity(logging.WARNING)
    values = train.flag_values_given()
    for name in ("model", "run_name", "summary", "list_models", "export_dir"):
        values.pop(name, None)
    if FLAGS.steps is not None:
        if FLAGS.steps < 1:
            train.fail(f"--steps must be a positive integer, got {FLAGS.steps}", 2)
        values.update(epochs=1, steps_per_epoch=FLAGS.steps)
    load_tensorflow()
    from models import REGISTRY
    names = FLAGS.models or list(REGISTRY)
    unknown = [name for name in names if name not in REGISTRY]
    if unknown:
        train.fail(f"unknown model(s) {', '.join(unknown)}; choose from: {', '.join(REGISTRY)}", 2)
    try:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        rows = train_all(names, values, stamp, FLAGS.formulas)
        figures = [markdown_table(rows)]
        if FLAGS.timing_steps:
            figures.append(compare_step_time({**values, "model": "conv"}, FLAGS.warmup_steps, FLAGS.timing_steps))
        print("\n" + "\n\n".join(figures))
        title = "Every model with its codelab defaults" + (", every layer on its formula" if FLAGS.formulas else "")
        results.record(title, "\n\n".join(figures))
    except train.FlagError as error:
        train.fail(str(error), 2)
    except train.RunError as error:
        train.fail(str(error), 1)
    return 0


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser(train.PROGRAM))
