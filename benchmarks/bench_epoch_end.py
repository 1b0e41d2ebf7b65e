"""Benchmark (not a test): where a real train.py run spends its time outside the training steps, in seconds.

    python benchmarks/bench_epoch_end.py                                   # conv_bn, batch 64, 2 full epochs
    python benchmarks/bench_epoch_end.py --model=conv_bn --precision=mixed_bfloat16
    python benchmarks/bench_epoch_end.py --steps_per_epoch=50              # a quick look (the ends are the same)

Runs train.py's command in this process (its flags: --model, --epochs, --precision, --steps_per_epoch; the rest at
train.py's defaults, TensorBoard on) and times each piece by wrapping its function: the start (importing
TensorFlow, loading the data, tracing the train and evaluation loops, the graph and hparams summaries), each
epoch's training calls and its end (the evaluation of the test images, the checkpoint, the console line, the
TensorBoard callback and inside it the gradient norms, the model's activations, the histograms, the pictures and
the writers' flush), and the finish (the final test evaluation, the PNG pictures, the SavedModel export). Nested
pieces are indented; a piece's seconds include its nested ones. The epoch ends after the first are what a longer
run pays every epoch (the first also fills the evaluation's cache and runs each eager op once).

Traces: every tf.function trace (TensorFlow's concrete-function creation, counted by name) after the start is
listed: a trace at an epoch end is paid again every epoch, and the table says so.
The table goes into this command's section of benchmarks/RESULTS.md, with the CPU, its flags and oneDNN's state.
"""
import collections
import contextlib
import functools
import os
import sys
import tempfile
import time
from pathlib import Path

STARTED = time.perf_counter()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from absl import flags  # noqa: E402

FLAGS = flags.FlagValues()  # apart from absl's global flags, which train.py defines when imported
flags.DEFINE_string("model", "conv_bn", "Model to train (train.py's --model).", flag_values=FLAGS)
flags.DEFINE_integer("epochs", 2, "Epochs to train (the second end is the one a run repeats).", lower_bound=2,
                     flag_values=FLAGS)
flags.DEFINE_enum("precision", "float32", ["float32", "mixed_bfloat16"], "train.py's --precision.",
                  flag_values=FLAGS)
flags.DEFINE_integer("steps_per_epoch", None, "Steps per epoch (default: the model's, a full epoch).",
                     lower_bound=1, flag_values=FLAGS)
flags.DEFINE_string("data_dir", str(ROOT.parent / "shared" / "mnist"), "Directory of the four MNIST files.",
                    flag_values=FLAGS)


class Clock:
    """Seconds per (phase, piece): the phase is "start", "epoch k" (its training calls), "end k" (what follows
    them) or "finish"; pieces nest (a piece called inside another is shown under it)."""

    def __init__(self):
        self.phase = "start"
        self.ended = 0
        self.seconds = collections.defaultdict(float)
        self.calls = collections.Counter()
        self.depth = {}
        self.stack = []
        self.order = []
        self.traces = collections.Counter()  # (phase, function name) -> traces
        self.steps = collections.Counter()  # phase -> training steps

    @contextlib.contextmanager
    def piece(self, label):
        self.depth.setdefault(label, len(self.stack))
        if label not in self.order:
            self.order.append(label)
        self.stack.append(label)
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[self.phase, label] += time.perf_counter() - started
            self.calls[self.phase, label] += 1
            self.stack.pop()

    def wrap(self, owner, name, label, phase=None):
        """Replaces owner.name by the same function timed as `label`; `phase` (a callable) sets the phase first.
        A name the code does not have (it moved) leaves its row out of the table."""
        function = getattr(owner, name, None)
        if function is None:
            return

        @functools.wraps(function)
        def timed(*args, **kwargs):
            if phase is not None:
                phase()
            with self.piece(label):
                return function(*args, **kwargs)
        setattr(owner, name, timed)


def instrument(clock):
    """Wraps the functions a train.py run calls, and TensorFlow's tracing, with `clock`."""
    from tensorflow.python.eager.polymorphic_function import tracing_compilation

    import app.run
    from app import console, export, summaries
    from core import checkpoint, runner, trainer

    def training():
        if not clock.phase.startswith("epoch"):
            clock.phase = f"epoch {clock.ended + 1}"

    def ending():
        clock.ended += 1
        clock.phase = f"end {clock.ended}"

    def finishing():
        clock.phase = "finish"

    create = tracing_compilation._create_concrete_function

    def counted(function_type, type_context, func_graph, tracing_options):
        clock.traces[clock.phase, tracing_options.name] += 1
        return create(function_type, type_context, func_graph, tracing_options)
    tracing_compilation._create_concrete_function = counted

    clock.wrap(app.run, "load_data", "load the data")
    clock.wrap(runner.Runner, "prepare", "trace the train and evaluation loops")
    made = trainer.Trainer.__init__

    def init(self, *args, **kwargs):
        made(self, *args, **kwargs)
        traced = self.runner.train

        class Timed:  # the tf.function, timed when called, itself for everything else (get_concrete_function)
            def __call__(self, iterator, num_steps):
                training()
                clock.steps[clock.phase] += int(num_steps)
                with clock.piece("training calls"):
                    return traced(iterator, num_steps)

            def __getattr__(self, name):
                return getattr(traced, name)
        self.runner.train = Timed()
    trainer.Trainer.__init__ = init
    clock.wrap(trainer.Trainer, "_end_epoch", "epoch record and evaluation", ending)
    clock.wrap(trainer.Trainer, "evaluate", "evaluate the test images")
    clock.wrap(trainer.Trainer, "save", "checkpoint")
    clock.wrap(checkpoint.Checkpointer, "save", "write the checkpoint")
    clock.wrap(console.EpochReport, "on_epoch_end", "console line")
    clock.wrap(summaries.TensorBoard, "on_train_begin", "TensorBoard: graph and hparams")
    clock.wrap(summaries.TensorBoard, "on_epoch_end", "TensorBoard epoch end")
    clock.wrap(summaries, "layer_norms", "gradient norms")
    clock.wrap(summaries, "write_histograms", "histograms")
    clock.wrap(summaries.TensorBoard, "_pictures", "prediction pictures")
    clock.wrap(summaries.TensorBoard, "_write_hparam_metrics", "hparams metrics")
    clock.wrap(summaries.TensorBoard, "_flush", "flush the writers")
    clock.wrap(summaries.TensorBoard, "on_train_end", "TensorBoard: PNG pictures", finishing)
    clock.wrap(export, "export_saved_model", "SavedModel export")
    activations = summaries.TensorBoard.write_model_summaries

    def write_model_summaries(self, step, histograms_and_images=True):
        model = self.model
        model_activations = model.activations

        def timed_activations(*args, **kwargs):
            with clock.piece("activations of the sample images"):
                return model_activations(*args, **kwargs)
        model.activations = timed_activations
        try:
            with clock.piece("model summaries"):
                return activations(self, step, histograms_and_images)
        finally:
            del model.activations
    summaries.TensorBoard.write_model_summaries = write_model_summaries


def table(clock, total, imports, epochs):
    """Markdown rows: each piece's seconds in each phase."""
    phases = ["start"] + [p for k in range(1, epochs + 1) for p in (f"epoch {k}", f"end {k}")] + ["finish"]
    rows = ["| piece | " + " | ".join(phases) + " |", "| --- " * (len(phases) + 1) + "|"]
    rows.append("| import TensorFlow and the app | " + " | ".join(
        [f"{imports:.2f}"] + [""] * (len(phases) - 1)) + " |")
    for label in clock.order:
        cells = [f"{clock.seconds[phase, label]:.3f}" if (phase, label) in clock.seconds else ""
                 for phase in phases]
        rows.append(f"| {'&nbsp;' * 4 * clock.depth[label]}{label} | " + " | ".join(cells) + " |")
    spans = {phase: sum(s for (p, label), s in clock.seconds.items() if p == phase and clock.depth[label] == 0)
             for phase in phases}
    rows.append("| all timed pieces | " + " | ".join(f"{spans[p] + (imports if p == 'start' else 0):.2f}"
                                                     for p in phases) + " |")
    rows.append(f"| whole process (wall) | {total:.2f} |" + " |" * (len(phases) - 1))
    return rows


def summary(clock, imports, epochs):
    """One paragraph: the start-up, the first epoch's extra over the last, and the last epoch's end per step."""
    def span(phase):
        return sum(s for (p, label), s in clock.seconds.items() if p == phase and clock.depth[label] == 0)
    last, steps = f"epoch {epochs}", clock.steps[f"epoch {epochs}"]
    training, end = span(last), span(f"end {epochs}")
    return (f"Start-up (cancels in a whole-process difference): {imports + span('start'):.1f} s, of which import "
            f"{imports:.1f} s and tracing {clock.seconds['start', 'trace the train and evaluation loops']:.1f} s. "
            f"The first epoch's extra over epoch {epochs} (cancels too): {span('epoch 1') - training:.1f} s of "
            f"training, {span('end 1') - end:.2f} s at its end. Epoch {epochs}: {training:.2f} s of training "
            f"({1000 * training / steps:.2f} ms/step over {steps} steps in {clock.calls[last, 'training calls']} "
            f"calls) and {end:.2f} s at its end: {1000 * end / steps:.2f} ms per step of the epoch, "
            f"{100 * end / training:.1f}% of its training.")


def main():
    from core import cli as parsing
    parsing.parse("bench_epoch_end.py", sys.argv, FLAGS)
    import tensorflow  # noqa: F401 (its import is part of the start)
    import train
    from core import cli
    imports = time.perf_counter() - STARTED
    from benchmarks import results

    clock = Clock()
    instrument(clock)
    flag_values = flags.FlagValues()
    train.define_flags(flag_values)
    with tempfile.TemporaryDirectory() as logdir:
        args = ["train.py", f"--model={FLAGS.model}", f"--epochs={FLAGS.epochs}", f"--precision={FLAGS.precision}",
                f"--data_dir={FLAGS.data_dir}", f"--logdir={logdir}", "--noprogress"]
        args += [f"--steps_per_epoch={FLAGS.steps_per_epoch}"] if FLAGS.steps_per_epoch else []
        code = train.command(cli.parse("train.py", args, flag_values), flag_values)
    total = time.perf_counter() - STARTED
    if code:
        raise SystemExit(f"train.py ended with exit code {code}")
    rows = table(clock, total, imports, FLAGS.epochs)
    late = [(phase, name, count) for (phase, name), count in sorted(clock.traces.items()) if phase != "start"]
    traces = ("Traces after the start: " + "; ".join(f"{name} x{count} ({phase})" for phase, name, count in late)
              if late else "Traces after the start: none (no tf.function retraces at an epoch end).")
    body = "\n\n".join(["\n".join(rows), summary(clock, imports, FLAGS.epochs), traces])
    print(f"\nMachine: {results.machine()}\n\n{body}")  # record() writes the machine beside the section
    results.record(f"Where a train.py run of {FLAGS.model} ({FLAGS.precision}) spends its time, seconds per phase",
                   body)


if __name__ == "__main__":
    main()
