"""Benchmark (not a test): our training step against Keras `model.fit` on the same model, batches and machine.

    python benchmarks/bench_vs_keras.py                        # the table, input path, epoch ends, matmul peak
    python benchmarks/bench_vs_keras.py --time_to_accuracy --cases=conv_bn,conv_bn_mixed   # wall time to 99.4%
    python benchmarks/bench_vs_keras.py --whole_process --cases=softmax,dense5,conv,conv_bn,conv_bn_mixed
    python benchmarks/bench_vs_keras.py --cases=conv --steps=100 --rounds=2     # a quick look
    python benchmarks/bench_vs_keras.py --nojit_compile --noextras   # ours without XLA for every model

Step time: each case builds our model (trained by core.trainer.Trainer.fit, as train.py does, with the default
--steps_per_loop and the model's --jit_compile: XLA for the dense models) and its Keras twin (tests/keras_twins.py,
compiled with Keras's defaults: no XLA on a CPU, one step per call). Both first run one untimed round (tracing,
warm-up); then `--rounds` rounds alternate ours and Keras on the same batches, and the best round of each counts:
on a shared machine the best round is the least disturbed one. A round times two fit() calls of one side, of 20 and
20 + `--steps` steps (each a new epoch, the same on both sides); ms/step is the difference over `--steps`, so
fit()'s fixed cost (a new iterator, callbacks, the epoch's end) counts on neither side: the steady step time.

Ours reads its batches as train.py does (data.GatheredBatches: gathered inside the compiled loop), Keras the same
batches from data.training_batches (tf.data). Input path: our step time fed by the real pipeline against fed the
same batch every step (no input work at all); the gap is what the input costs a step (target <= 5%; the median over
rounds of each back-to-back pair's ratio); the tf.data column is our step fed by training_batches instead. Epoch
end: evaluation of the 10,000 test images, TensorBoard (scalars; histograms and images every
summaries_every_epochs-th epoch, so the mean over that cycle) and one checkpoint, against an epoch of the model's
default steps at the measured step time (target <= 10%). Our side records the last step's gradients for
TensorBoard, as train.py does. Peak: the best GFLOP/s of a large tf.matmul in float32 and bfloat16; each model's
share is its training FLOPs per second (3 x the forward pass's multiply-adds x 2) over it.
Levers: `--levers=formulas` adds a column per lever, our step with it (bench_levers.py's names: formulas puts
every layer on its formula, fused=False, as before the fast paths), alternated in the same rounds.

Whole process (`--whole_process`), as a user pays it: each side a fresh process, ours `train.py` (evaluation on the test
images, TensorBoard summaries, checkpoints and export), Keras `model.fit` with the test images as validation_data, for a
and for b epochs; repetitions alternate the sides and the order. The cost per step is t(b epochs) - t(a epochs) over the
steps of b - a epochs: those epochs with their ends, start-up cancelled. (a, b) is (1, 2), and more epochs of difference
for models whose epoch is short (WHOLE_PROCESS_EPOCHS: softmax 1, 21; dense5 1, 11; conv 1, 3), so that they take
seconds well above the start-up's jitter; `--whole_process_epochs=a,b` sets them for every case. The median over
repetitions counts, after one untimed process per side. `--whole_process_steps=N` cuts each epoch to N steps (a quick
check of the mode only: the targets need full epochs, ~900 steps of difference). Beside it: each side's share of the
matmul peak (measured first, in this process), the last epoch's seconds (training and evaluation) as each long process
reports them (ours train.py's console line, Keras a callback's), per step, so a gap between the wall difference and that
figure is work outside the epochs (checkpoint, TensorBoard), and the 1-minute load average as the timed processes
started.

Time to accuracy (`--time_to_accuracy`): each case's two sides, in this process one after the other, train with
train.py's settings for the model (learning-rate decay included; ours in the case's precision) and evaluate the test
images after each epoch until the test accuracy reaches the model's target (99.0% conv, 99.4% conv_bn;
`--accuracy_target` overrides) or `--max_epochs`: the wall time from the start of training (tracing included) to the
end of that evaluation. A Keras side shared by two cases (conv_bn and conv_bn_mixed: Keras float32) trains once.
`--accuracy_target=0.9 --accuracy_steps_per_epoch=40 --max_epochs=3` checks the mode in a minute.
The first line names the CPU, its bfloat16 flags and whether TensorFlow runs oneDNN (on by default only on CPUs with
AVX512_VNNI, AVX512_BF16, AVX_VNNI or AMX; else TF_ENABLE_ONEDNN_OPTS=1).
The figures go into this command's section of benchmarks/RESULTS.md.
"""
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from absl import app, flags  # noqa: E402

from benchmarks import results  # noqa: E402
from benchmarks.fast_path_levers import FAST_PATH_LEVERS, STEP_LEVERS, lever_runner  # noqa: E402

# (label, model, batch size, our precision, Keras's dtype policy)
CASES = {
    "softmax": ("softmax, 100", "softmax", 100, "float32", "float32"),
    "dense5": ("dense5, 100", "dense5", 100, "float32", "float32"),
    "conv": ("conv, 128", "conv", 128, "float32", "float32"),
    "conv_bn": ("conv_bn, 64 (float32)", "conv_bn", 64, "float32", "float32"),
    "conv_bn_mixed": ("conv_bn, 64, ours mixed_bfloat16 vs Keras float32", "conv_bn", 64, "mixed_bfloat16",
                      "float32"),
    "conv_bn_mixed_keras": ("conv_bn, 64, ours mixed_bfloat16 vs Keras mixed_bfloat16", "conv_bn", 64,
                            "mixed_bfloat16", "mixed_bfloat16"),
}
TARGETS = {"softmax": 0.5, "dense5": 0.5, "conv": 0.85, "conv_bn": 0.85, "conv_bn_mixed": 0.6,
           "conv_bn_mixed_keras": 0.85}
WHOLE_PROCESS_TARGETS = {"softmax": 0.40, "dense5": 0.45, "conv": 0.80, "conv_bn": 0.75, "conv_bn_mixed": 0.50}
# The epoch counts (a, b) whose difference is timed, so that b - a epochs take seconds well above a process's
# start-up jitter: softmax's epoch is ~0.2 s of steps, dense5's ~1 s, conv's 468 steps; the rest (1, 2).
WHOLE_PROCESS_EPOCHS = {"softmax": (1, 21), "dense5": (1, 11), "conv": (1, 3)}
ACCURACY_TARGETS = {"conv": 0.990, "conv_bn": 0.994}

flags.DEFINE_list("cases", list(CASES), f"Cases of the table: {', '.join(CASES)}.")
flags.DEFINE_integer("steps", 200, "Steps per timed round.")
flags.DEFINE_integer("rounds", 3, "Timed rounds per side (alternated); the best counts.")
flags.DEFINE_integer("steps_per_loop", None, "Our steps per compiled call (default: the trainer's).")
flags.DEFINE_bool("jit_compile", None, "Our step compiled with XLA or not, for every case (default: each model's "
                  "setting, as train.py). Keras keeps its default: no XLA on a CPU.")
flags.DEFINE_bool("extras", True, "Also measure the input path, the epoch-end work and the matmul peak.")
flags.DEFINE_bool("time_to_accuracy", False, "Instead of the in-process table: train each case (ours and its Keras "
                  "side, train.py's settings), evaluate after each epoch, the wall time to the test accuracy target "
                  "(99.0% conv, 99.4% conv_bn); long.")
flags.DEFINE_float("accuracy_target", None, "Time to accuracy: this target for every case instead of the model's "
                   "(a low one, with --accuracy_steps_per_epoch, checks the mode quickly).", lower_bound=0,
                   upper_bound=1)
flags.DEFINE_integer("max_epochs", 15, "Time to accuracy: give up after this many epochs.", lower_bound=1)
flags.DEFINE_integer("accuracy_steps_per_epoch", None, "Time to accuracy: steps per epoch (default: full "
                     "epochs); small values only check the mode.", lower_bound=1)
flags.DEFINE_list("levers", [], "Extra columns: our step with each lever of bench_levers.py that changes the "
                  "step (formulas, formula_bn, adam_op, s2d, guard, ...; fast_path_levers.py lists them), "
                  "alternated in the same rounds.")
flags.DEFINE_bool("whole_process", False, "Instead of the in-process table: each side a fresh process for one and "
                  "two full epochs with evaluation (ours train.py), the difference per step.")
flags.DEFINE_integer("repetitions", 3, "Whole process: alternated repetitions per side and epoch count.")
flags.DEFINE_list("whole_process_epochs", None, "Whole process: the two epoch counts a,b whose difference is timed, "
                  "for every case (default: each case's, WHOLE_PROCESS_EPOCHS, else 1,2).")
flags.DEFINE_integer("whole_process_steps", None, "Whole process: steps per epoch (default: full epochs); small "
                     "values only check that the mode runs.")
flags.DEFINE_integer("keras_process_epochs", None, "Internal: run the Keras side of --whole_process for this many "
                     "epochs of --cases' single case, then exit.")
flags.DEFINE_integer("seed", 1, "Seed of the weights and the batch order.")
flags.DEFINE_string("data_dir", str(ROOT.parent / "shared" / "mnist"), "Directory of the four MNIST files.")
FLAGS = flags.FLAGS


# ------------------------------------------------------------------------------------------ the machine

def matmul_peak(tf, dtype, n=1024, rounds=5, repeats=5):
    """Best GFLOP/s of an n x n x n tf.matmul in `dtype` (2 n^3 flops per product)."""
    a = tf.cast(tf.random.stateless_normal([n, n], seed=[1, 2]), dtype)
    b = tf.cast(tf.random.stateless_normal([n, n], seed=[3, 4]), dtype)
    product = tf.function(lambda a, b: tf.reduce_sum(tf.cast(tf.matmul(a, b)[0, :1], tf.float32)))
    product(a, b).numpy()
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(repeats):
            out = product(a, b)
        out.numpy()
        best = min(best, (time.perf_counter() - started) / repeats)
    return 2 * n ** 3 / best / 1e9


def training_flops(model, tf):
    """Flops of one example's training step: 3 x the forward pass (forward, input and weight gradients),
    counting each multiply-add as 2 flops, in the layers holding a matrix or a kernel."""
    outputs = dict(model.activations(tf.zeros([1, 28, 28, 1]), training=False))
    forward = 0
    for name, layer in zip(model.layer_names, model.layers):
        w = getattr(layer, "w", None)
        if w is None:
            continue
        size = 2 * int(tf.size(w))
        if w.shape.rank == 4:  # a convolution: one kernel product per output position
            height, width = outputs[name].shape[1:3]
            size *= height * width
        forward += size
    return 3 * forward


# ------------------------------------------------------------------------------------------ the sides

def settings(name):
    """The model's codelab defaults (batch size, optimizer, learning rate, dropout, ...)."""
    from models import REGISTRY
    return REGISTRY[name].defaults


def compiled(name):
    """Whether our step for model `name` is compiled with XLA: --jit_compile if given, else the model's default."""
    return settings(name)["jit_compile"] if FLAGS.jit_compile is None else FLAGS.jit_compile


class OneBatch:
    """A batch source (like data.GatheredBatches) that gives the same batch every step: no input work at all."""
    in_loop = True  # read inside the compiled loop, as GatheredBatches

    def __init__(self, images, labels, steps):
        self.images, self.labels, self.steps = images, labels, steps
        self.element_spec = tuple(tf_spec(t) for t in (images, labels))

    def start(self, epoch, skip=0):
        return self

    def __next__(self):
        return self.images, self.labels


def tf_spec(tensor):
    import tensorflow as tf
    return tf.TensorSpec(tensor.shape, tensor.dtype)


class Ours:
    """Our model, optimizer and Trainer, as train.py makes them, with `lever` applied (fast_path_levers.py);
    fit(batches) trains one more epoch of `batches` (a batch source such as data.GatheredBatches, or a
    tf.data.Dataset)."""

    def __init__(self, tf, name, precision, seed, lever=None):
        from core.trainer import Trainer

        runner = lever_runner(tf, name, lever, precision, compiled(name), seed)
        self.model = runner.model
        options = {} if FLAGS.steps_per_loop is None else {"steps_per_loop": FLAGS.steps_per_loop}
        self.trainer = Trainer(runner, progress=False, **options)
        self.epochs = 0

    def fit(self, batches, steps=None):
        self.epochs += 1
        self.trainer.fit(batches if hasattr(batches, "start") else (lambda epoch: batches), self.epochs,
                         steps_per_epoch=steps)
        self.trainer.runner.learning_rate.numpy()  # the last call has finished


class Theirs:
    """The Keras twin compiled with Keras's defaults; fit() trains one more epoch on the given batches."""

    def __init__(self, name, policy, seed):
        import keras
        from keras_twins import KERAS_TWINS

        defaults = settings(name)
        keras.utils.set_random_seed(seed)
        keras.mixed_precision.set_dtype_policy(policy)
        try:
            self.model = KERAS_TWINS[name]()
        finally:
            keras.mixed_precision.set_dtype_policy("float32")
        optimizer = {"adam": keras.optimizers.Adam, "sgd": keras.optimizers.SGD}[defaults["optimizer"]](
            defaults["learning_rate"])
        self.model.compile(optimizer=optimizer, metrics=["accuracy"],
                           loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        self.epochs = 0

    def fit(self, batches):
        self.epochs += 1
        self.model.fit(batches, epochs=1, verbose=0, shuffle=False)
        int(self.model.optimizer.iterations.numpy())


def timed(side, *batches):
    started = time.perf_counter()
    side.fit(*batches)
    return time.perf_counter() - started


def step_times(tf, data, train, case, seed, steps, rounds):
    """{"ours": [ms/step per round], "keras": [...]}: alternated rounds after one untimed round each. Ours reads
    data.GatheredBatches (as train.py does), Keras the same batches from data.training_batches."""
    _, name, batch, precision, policy = case
    ours, theirs = Ours(tf, name, precision, seed), Theirs(name, policy, seed)
    source = data.GatheredBatches(train, batch, seed)
    feeds = {"ours": lambda n: (source, n),
             "keras": lambda n: (data.training_batches(train, batch, seed, theirs.epochs).take(n),)}
    sides = {"ours": ours, "keras": theirs}
    for lever in FLAGS.levers:
        sides[lever] = Ours(tf, name, precision, seed, lever)
        feeds[lever] = feeds["ours"]
    times = {key: [] for key in sides}
    keys = list(sides)
    for index in range(rounds + 1):
        for key in keys if index % 2 else keys[::-1]:
            times[key].append(marginal_ms(sides[key], feeds[key], steps))
    return {key: values[1:] for key, values in times.items()}, ours, source


SHORT = 20


def marginal_ms(side, feed, steps):
    """ms per step without fit()'s fixed cost (iterator, callbacks, epoch end): (t(SHORT + steps) - t(SHORT)) /
    steps, from two fits of the same side, each a new epoch of the same batches on both sides."""
    short = timed(side, *feed(SHORT))
    long = timed(side, *feed(SHORT + steps))
    return 1000 * (long - short) / steps


def input_cost(tf, data, train, ours, source, batch, seed, steps, rounds):
    """({feed: best ms/step of alternated rounds}, the input cost), for our step fed by {"gathered":
    data.GatheredBatches, "tf.data": data.training_batches, "one batch": the same batch every step}. The cost
    is the median over rounds of gathered / one batch - 1, each pair measured back to back: a difference of a
    few per cent, which the best rounds of two feeds, taken from different moments, do not resolve here."""
    still = OneBatch(*next(iter(data.training_batches(train, batch, seed, 0))), SHORT + steps)
    feeds = {"gathered": lambda n: (source, n), "one batch": lambda n: (still, n),
             "tf.data": lambda n: (data.training_batches(train, batch, seed, ours.epochs).take(n),)}
    times = {key: [] for key in feeds}
    for feed in feeds.values():  # untimed: the first call with a new kind of feed traces the loop for it
        timed(ours, *feed(SHORT))
    for _ in range(rounds):
        for key, feed in feeds.items():
            times[key].append(marginal_ms(ours, feed, steps))
    cost = statistics.median(real / still - 1 for real, still in zip(times["gathered"], times["one batch"]))
    return {key: min(values) for key, values in times.items()}, cost


def epoch_end_seconds(tf, data, name, ours, test, rounds):
    """{"evaluation", "tensorboard", "checkpoint"}: seconds of each part of an epoch's end at train.py's
    defaults (evaluation of `test`, TensorBoard scalars each epoch, histograms and images every
    summaries_every_epochs-th, one checkpoint), the mean over that cycle of epochs, best of rounds."""
    from app.summaries import TensorBoard
    from core.checkpoint import Checkpointer

    trainer = ours.trainer
    every = settings(name)["summaries_every_epochs"]
    images, labels = next(iter(data.evaluation_batches(test)))
    with tempfile.TemporaryDirectory() as logdir:
        board = TensorBoard(logdir, images, labels, hparams={"model": name}, summaries_every_epochs=every,
                            gradients=True)
        board.on_train_begin(trainer)
        checkpointer = Checkpointer(os.path.join(logdir, "checkpoints"), keep=3, model=ours.model,
                                    optimizer=trainer.optimizer)
        step = int(trainer.optimizer.step.numpy())
        validation = data.evaluation_batches(test)  # made once, as train.py does: its batches are cached
        cycles = []  # per round: {part: seconds summed over one cycle of `every` epoch ends}
        for index in range((rounds + 1) * every):
            if index % every == 0:
                cycles.append({"evaluation": 0.0, "tensorboard": 0.0, "checkpoint": 0.0})
            started = time.perf_counter()
            figures = trainer.evaluate(validation)
            evaluated = time.perf_counter()
            board.on_epoch_end(index + 1, step + index, {"loss": 0.1, "accuracy": 0.9, "learning_rate": 0.01,
                                                         "val_loss": figures["loss"],
                                                         "val_accuracy": figures["accuracy"]})
            written = time.perf_counter()
            checkpointer.save()
            saved = time.perf_counter()
            for key, seconds in (("evaluation", evaluated - started), ("tensorboard", written - evaluated),
                                 ("checkpoint", saved - written)):
                cycles[-1][key] += seconds
        board.on_train_end(trainer, trainer.history)
    return {key: min(cycle[key] for cycle in cycles[1:]) / every for key in cycles[0]}  # the first: warm-up


# ------------------------------------------------------------------------------------ time to accuracy

def time_to_accuracy(tf, data, train, test, side, case, target, max_epochs, steps_per_epoch, seed):
    """[(seconds, test accuracy)] after each epoch of one side ("ours" or "keras") training `case` with train.py's
    settings for the model (batch size, optimizer, learning-rate decay, dropout; ours in the case's precision,
    Keras in its dtype policy), until the test accuracy reaches `target` or after `max_epochs` epochs. Seconds
    are wall time from the start of training (tracing included) to the end of that epoch's evaluation of the test
    images; each side evaluates with its own fit (ours Trainer.fit's validation_data, Keras's validation_data)."""
    import keras

    from core import names, optimizers
    from core.config import TrainingConfig
    from core.trainer import Callback, Runner, Trainer
    from models import REGISTRY

    _, name, batch, precision, policy = CASES[case]
    config = TrainingConfig(**REGISTRY[name].settings)
    steps = steps_per_epoch or len(train) // batch
    schedule = names.learning_rate_schedule(config, steps)
    validation = data.evaluation_batches(test)
    epochs = []
    if side == "ours":
        class Record(Callback):
            def on_epoch_end(self, epoch, step, logs):
                epochs.append((time.perf_counter() - started, logs["val_accuracy"]))
                trainer.stop_training = logs["val_accuracy"] >= target

        tf.random.set_seed(seed)
        model = REGISTRY[name].build(config.dropout)
        optimizer = {"adam": optimizers.Adam, "sgd": optimizers.SGD}[config.optimizer](schedule)
        trainer = Trainer(Runner(model, optimizer, precision=precision, jit_compile=compiled(name)),
                          callbacks=[Record()], progress=False)
        started = time.perf_counter()
        trainer.fit(data.GatheredBatches(train, batch, seed), max_epochs, validation_data=validation,
                    steps_per_epoch=steps_per_epoch)
        return epochs

    class Rate(keras.optimizers.schedules.LearningRateSchedule):
        def __call__(self, step):  # Keras asks for the rate of update k + 1 with its k updates done, as ours
            return schedule(step)

    theirs = Theirs(name, policy, seed)
    theirs.model.compile(optimizer={"adam": keras.optimizers.Adam, "sgd": keras.optimizers.SGD}[config.optimizer](
        Rate()), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    started = time.perf_counter()
    for epoch in range(max_epochs):  # one fit per epoch: each epoch's batches as ours (data.training_batches)
        batches = data.training_batches(train, batch, seed, epoch)
        history = theirs.model.fit(batches.take(steps) if steps_per_epoch else batches, validation_data=validation,
                                   initial_epoch=epoch, epochs=epoch + 1, verbose=0, shuffle=False)
        epochs.append((time.perf_counter() - started, history.history["val_accuracy"][-1]))
        if epochs[-1][1] >= target:
            break
    return epochs


def accuracy_table(tf, data, train, test):
    """Markdown rows of --time_to_accuracy: for each case, ours and its Keras side (each Keras side trained once)."""
    rows = ["| model, batch | target | ours: seconds (epochs) | Keras: seconds (epochs) | ours / Keras | "
            "test accuracy after each epoch (ours; Keras) | seconds at each epoch end (ours; Keras) |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    keras_runs = {}
    for key in FLAGS.cases:
        _, name, _, _, policy = CASES[key]
        target = FLAGS.accuracy_target or ACCURACY_TARGETS[name]
        runs = {"ours": time_to_accuracy(tf, data, train, test, "ours", key, target, FLAGS.max_epochs,
                                         FLAGS.accuracy_steps_per_epoch, FLAGS.seed)}
        if (name, policy) not in keras_runs:
            keras_runs[name, policy] = time_to_accuracy(tf, data, train, test, "keras", key, target,
                                                        FLAGS.max_epochs, FLAGS.accuracy_steps_per_epoch, FLAGS.seed)
        runs["keras"] = keras_runs[name, policy]
        reached = {side: next(((s, n + 1) for n, (s, a) in enumerate(run) if a >= target), None)
                   for side, run in runs.items()}
        cells = [f"{reached[side][0]:.0f} s ({reached[side][1]})" if reached[side]
                 else f"not reached in {len(runs[side])} epochs" for side in ("ours", "keras")]
        ratio = f"{reached['ours'][0] / reached['keras'][0]:.2f}" if reached["ours"] and reached["keras"] else "-"
        accuracies = "; ".join(", ".join(f"{100 * a:.2f}" for _, a in runs[side]) for side in ("ours", "keras"))
        seconds = "; ".join(", ".join(f"{s:.0f}" for s, _ in runs[side]) for side in ("ours", "keras"))
        rows.append(f"| {CASES[key][0]} | {100 * target:.2f}% | {cells[0]} | {cells[1]} | {ratio} | {accuracies} | "
                    f"{seconds} |")
        print(rows[-1], flush=True)
    return rows


# ------------------------------------------------------------------------------------------- whole process

def keras_process(case, epochs, steps_per_epoch):
    """The Keras side of --whole_process, in its own process: model.fit for `epochs` epochs with the test images as
    validation_data, as a user of Keras trains; prints each epoch's seconds."""
    import keras

    import datasets
    from core import data
    from datasets import idx

    _, name, batch, _, policy = CASES[case]
    data_dir = datasets.prepare(FLAGS.data_dir, "mnist", download=False, progress=False)
    train, test = idx.load(data_dir, "train"), idx.load(data_dir, "test")
    theirs = Theirs(name, policy, FLAGS.seed)
    batches = data.training_batches(train, batch, FLAGS.seed, 0)
    if steps_per_epoch:
        batches = batches.take(steps_per_epoch)

    class EpochSeconds(keras.callbacks.Callback):
        """Prints each epoch's seconds (training and validation), as train.py's console line ends."""

        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            print(f"epoch {epoch + 1}/{epochs}  {time.perf_counter() - self.started:.2f} s", flush=True)

    theirs.model.fit(batches, epochs=epochs, validation_data=data.evaluation_batches(test), verbose=0,
                     shuffle=False, callbacks=[EpochSeconds()])


LOADS = []  # the 1-minute load average as each timed process starts
EPOCH_LINE = re.compile(r"^epoch (\d+)/\d+ .*?([\d.]+) s$")  # both sides' console line of an epoch's end


def process_seconds(side, case, epochs, steps_per_epoch, logdir):
    """(wall seconds, [seconds of each epoch, training and evaluation, as the process reports them]) of one fresh
    process training `case` for `epochs` epochs: ours train.py, or Keras's fit."""
    _, name, batch, precision, _ = CASES[case]
    steps = [f"--steps_per_epoch={steps_per_epoch}"] if steps_per_epoch else []
    if side == "ours":
        command = [sys.executable, str(ROOT / "train.py"), f"--model={name}", f"--epochs={epochs}",
                   f"--batch_size={batch}", f"--precision={precision}", f"--seed={FLAGS.seed}",
                   f"--data_dir={FLAGS.data_dir}", f"--logdir={logdir}", "--noprogress"] + steps
    else:
        command = [sys.executable, str(Path(__file__).resolve()), f"--cases={case}",
                   f"--keras_process_epochs={epochs}", f"--data_dir={FLAGS.data_dir}", f"--seed={FLAGS.seed}"]
        command += [f"--whole_process_steps={steps_per_epoch}"] if steps_per_epoch else []
    LOADS.append(os.getloadavg()[0])
    started = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=3600)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{side} {case} ({epochs} epochs) failed with exit code {done.returncode}: "
                         f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ''}")
    return seconds, [float(match[2]) for match in map(EPOCH_LINE.match, done.stdout.splitlines()) if match]


def whole_process_epochs(case):
    """(a, b): the epoch counts whose wall times' difference --whole_process takes for `case`."""
    if FLAGS.whole_process_epochs:
        return tuple(int(epochs) for epochs in FLAGS.whole_process_epochs)
    return WHOLE_PROCESS_EPOCHS.get(case, (1, 2))


def whole_process(case, train_count):
    """{side: [ms per step, one per repetition]}: (t(b epochs) - t(a epochs)) / steps of b - a epochs, each side a
    fresh process, the sides and epoch counts alternated ((a, b) = whole_process_epochs(case))."""
    batch = CASES[case][2]
    short, long = whole_process_epochs(case)
    steps = (FLAGS.whole_process_steps or train_count // batch) * (long - short)
    seconds = {(side, epochs): [] for side in ("ours", "keras") for epochs in (short, long)}
    last_epochs = {"ours": [], "keras": []}  # each long process's last epoch, as it reports it
    order = list(seconds)
    with tempfile.TemporaryDirectory() as logdir:
        for side in ("ours", "keras"):  # untimed: the first process reads TensorFlow and the data from disk
            process_seconds(side, case, 1, FLAGS.whole_process_steps or 1, logdir)
        for repetition in range(FLAGS.repetitions):
            for side, epochs in (order if repetition % 2 == 0 else order[::-1]):
                wall, epoch_seconds = process_seconds(side, case, epochs, FLAGS.whole_process_steps, logdir)
                seconds[side, epochs].append(wall)
                if epochs == long:
                    last_epochs[side] += epoch_seconds[-1:]
    return {side: [1000 * (two - one) / steps for one, two in zip(seconds[side, short], seconds[side, long])]
            for side in ("ours", "keras")}, seconds, steps, last_epochs


def peak_share(tf, name, batch, dtype, ms_per_step, peaks):
    """The step's training FLOPs per second over the `dtype` matmul peak (peaks: {dtype: GFLOP/s})."""
    from models import REGISTRY
    tf.random.set_seed(FLAGS.seed)  # the weights are drawn (op determinism asks for a seed); only shapes count
    model = REGISTRY[name].build(settings(name)["dropout"])
    model.build((None, 28, 28, 1))
    return training_flops(model, tf) * batch / (ms_per_step / 1000) / 1e9 / peaks[dtype]


def peak_line(tf):
    """({dtype: GFLOP/s}, the line that says them): the matmul peak in float32 and bfloat16."""
    peaks = {dtype: matmul_peak(tf, getattr(tf, dtype)) for dtype in ("float32", "bfloat16")}
    return peaks, (f"matmul peak (1024x1024x1024, best of 5): float32 {peaks['float32']:.1f} GFLOP/s, bfloat16 "
                   f"{peaks['bfloat16']:.1f} GFLOP/s (bfloat16 / float32 = {peaks['bfloat16'] / peaks['float32']:.2f})"
                   f"; load average {results.load()}")


def whole_process_table(tf, lines, train_count):
    peaks, line = peak_line(tf)
    print(line, flush=True)
    table = ["| model, batch | epochs a, b | steps of difference | ours ms/step (median) | Keras ms/step (median) | "
             "ours / Keras | target | share of matmul peak (ours; Keras) | ours per repetition | Keras per repetition "
             "| seconds, a and b epochs (ours; Keras) | last epoch as each process reports it: ms/step, training "
             "and evaluation (ours; Keras) | load average during the processes |",
             "| --- " * 13 + "|"]
    for key in FLAGS.cases:
        _, name, batch, precision, policy = CASES[key]
        LOADS.clear()
        per_step, seconds, steps, last_epochs = whole_process(key, train_count)
        short, long = whole_process_epochs(key)
        epoch_steps = steps // (long - short)
        reported = "; ".join(f"{1000 * statistics.median(last_epochs[side]) / epoch_steps:.2f}"
                             if last_epochs[side] else "-" for side in ("ours", "keras"))
        mine, theirs = statistics.median(per_step["ours"]), statistics.median(per_step["keras"])
        dtypes = ["float32" if setting == "float32" else "bfloat16" for setting in (precision, policy)]
        shares = "; ".join(f"{100 * peak_share(tf, name, batch, dtype, ms, peaks):.0f}%"
                           for dtype, ms in zip(dtypes, (mine, theirs)))
        spans = "; ".join(", ".join(f"{statistics.median(values):.1f}" for (who, _), values in seconds.items()
                                    if who == side) for side in ("ours", "keras"))
        table.append(f"| {CASES[key][0]} | {short}, {long} | {steps} | {mine:.2f} | {theirs:.2f} | "
                     f"{mine / theirs:.2f} | <= {WHOLE_PROCESS_TARGETS.get(key, TARGETS[key])} | {shares} | "
                     f"{', '.join(f'{t:.2f}' for t in per_step['ours'])} | "
                     f"{', '.join(f'{t:.2f}' for t in per_step['keras'])} | {spans} | {reported} | "
                     f"{min(LOADS):.1f} to {max(LOADS):.1f} |")
        print(table[-1], flush=True)
    return lines + ["\n".join(table), f"{FLAGS.repetitions} alternated repetitions per side; the median counts."]


# ------------------------------------------------------------------------------------------------ main

def main(argv):
    del argv
    import tensorflow as tf
    from absl import logging
    import datasets
    from core import data
    from datasets import idx

    logging.set_verbosity(logging.WARNING)
    unknown = [case for case in FLAGS.cases if case not in CASES]
    if unknown:
        raise app.UsageError(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    levers = FAST_PATH_LEVERS + STEP_LEVERS
    unknown = [lever for lever in FLAGS.levers if lever not in levers]
    if unknown:
        raise app.UsageError(f"--levers: unknown {', '.join(unknown)}; choose from {', '.join(levers)}")
    given = FLAGS.whole_process_epochs
    if given is not None and (len(given) != 2 or not all(e.isdigit() and int(e) > 0 for e in given)
                              or int(given[0]) >= int(given[1])):
        raise app.UsageError(f"--whole_process_epochs takes two epoch counts a < b, got "
                             f"{','.join(FLAGS.whole_process_epochs)}")
    if FLAGS.keras_process_epochs:
        return keras_process(FLAGS.cases[0], FLAGS.keras_process_epochs, FLAGS.whole_process_steps)
    tf.config.experimental.enable_op_determinism()
    data_dir = datasets.prepare(FLAGS.data_dir, "mnist", download=False, progress=False)
    train, test = idx.load(data_dir, "train"), idx.load(data_dir, "test")
    cpu, bf16 = results.cpu_flags()
    load_before = os.getloadavg()[0]
    lines = [f"CPU: {cpu}; flags: " + ", ".join(f"{flag} {'yes' if on else 'no'}" for flag, on in bf16.items())
             + f"; {results.onednn()}; TensorFlow {tf.__version__}; load average {results.load()} at the start"]
    print(lines[0], flush=True)
    if FLAGS.whole_process:
        body = whole_process_table(tf, lines, len(train))
        body.append(f"Load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end.")
        print("\n" + "\n\n".join(body[1:]))
        results.record("Whole process: ours train.py against Keras model.fit, each a fresh process", "\n\n".join(body))
        return
    if FLAGS.time_to_accuracy:
        missing = [key for key in FLAGS.cases if CASES[key][1] not in ACCURACY_TARGETS and not FLAGS.accuracy_target]
        if missing:
            raise app.UsageError(f"no accuracy target for {', '.join(missing)}: pass --accuracy_target")
        rows = accuracy_table(tf, data, train, test)
        body = lines + ["\n".join(rows), f"Load average {results.load()} at the end; each side trained once, in "
                        f"this process, the cases one after another (seed {FLAGS.seed})."]
        print("\n" + "\n\n".join(body[1:]))
        results.record("Time to test accuracy: ours against Keras, same model, settings and batches",
                       "\n\n".join(body))
        return

    peaks = {}
    if FLAGS.extras:
        peaks, line = peak_line(tf)
        lines.append(line)
        print(lines[-1], flush=True)

    levers = "".join(f" ours {lever} ms/step | {lever} / Keras |" for lever in FLAGS.levers)
    table = [f"| model, batch | ours XLA | ours ms/step | Keras ms/step | ours / Keras |{levers} target | "
             "rounds ours | rounds Keras |", "| --- " * (8 + 2 * len(FLAGS.levers)) + "|"]
    extras = ["| model, batch | ms/step: gathered in the loop | tf.data | one cached batch | input cost (median) | "
              "epoch end s (evaluation, TensorBoard, checkpoint) | epoch s | epoch end share | share of matmul peak |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key in FLAGS.cases:
        case = CASES[key]
        label, name, batch, precision, _ = case
        times, ours, source = step_times(tf, data, train, case, FLAGS.seed, FLAGS.steps, FLAGS.rounds)
        mine, theirs = min(times["ours"]), min(times["keras"])
        columns = "".join(f" {min(times[lever]):.2f} | {min(times[lever]) / theirs:.2f} |" for lever in FLAGS.levers)
        table.append(f"| {label} | {'yes' if compiled(name) else 'no'} | {mine:.2f} | {theirs:.2f} | "
                     f"{mine / theirs:.2f} |{columns} <= {TARGETS[key]} | "
                     f"{', '.join(f'{t:.2f}' for t in times['ours'])} | "
                     f"{', '.join(f'{t:.2f}' for t in times['keras'])} |")
        print(table[-1], flush=True)
        if FLAGS.extras and key in ("softmax", "dense5", "conv", "conv_bn", "conv_bn_mixed"):
            feeds, cost = input_cost(tf, data, train, ours, source, batch, FLAGS.seed, FLAGS.steps, FLAGS.rounds)
            real, still = feeds["gathered"], feeds["one batch"]
            parts = epoch_end_seconds(tf, data, name, ours, test, FLAGS.rounds)
            end = sum(parts.values())
            epoch = (settings(name)["steps_per_epoch"] or len(train) // batch) * real / 1000
            peak = peaks["bfloat16" if precision != "float32" else "float32"]
            share = training_flops(ours.model, tf) * batch / (real / 1000) / 1e9 / peak
            extras.append(f"| {label} | {real:.2f} | {feeds['tf.data']:.2f} | {still:.2f} | "
                          f"{100 * cost:+.1f}% | "
                          f"{end:.2f} ({', '.join(f'{parts[k]:.2f}' for k in parts)}) | {epoch:.1f} | "
                          f"{100 * end / (end + epoch):.1f}% | {100 * share:.1f}% |")
            print(extras[-1], flush=True)

    body = ["\n".join(lines), "\n".join(table)]
    if FLAGS.extras:
        body.append("\n".join(extras))
    body.append(f"Load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; "
                f"{FLAGS.rounds} alternated rounds of {FLAGS.steps} steps per side, the best counts.")
    print("\n" + "\n\n".join(body[1:]))
    results.record("Ours against Keras model.fit, same model, batches and machine", "\n\n".join(body))


if __name__ == "__main__":
    app.run(main)
