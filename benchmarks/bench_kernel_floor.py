"""Benchmark (not a test): the floor under a convnet's training step, its heavy kernels each timed alone.

    python benchmarks/bench_kernel_floor.py                              # conv_bn, float32 and mixed_bfloat16
    python benchmarks/bench_kernel_floor.py --cases=conv_bn --rounds=2   # a quick look

The heavy kernels of one training step: every convolution (forward, input gradient except for the first layer,
whose input is the images, as Conv2D computes it: one stride-1 convolution where core/subpixel.py's path pays, else
TensorFlow's backward-data kernel; and weight gradient), every matmul of a Dense layer (the same three), and every
BatchNorm (forward in training with its moving statistics, and its gradient, as the layer runs it: the fused
kernel, on grouped pixels in bfloat16 where its channels are not a multiple of 16, or the formula for [N, C]).
Each is timed alone with the whole machine: `--repeats` runs of that one kernel in a compiled loop, less the loop's
own cost, the best of `--rounds`. Their sum is the floor: every kernel already uses every core, so the step can only
beat the sum where two kernels overlap without slowing each other. What the floor leaves out (ReLU, dropout, the
loss, Adam, the NaN guard, the metrics, the casts of the weights) only adds to a real step.

Beside it, in the same process: our step and Keras's (bench_vs_keras.py's step times: alternated rounds, the
best counts), the floor over each, and the shares of the matmul peak the floor would reach and our step reaches
(the step's floating-point operations over its time). Floor / Keras is the least ratio to Keras these kernels
allow for the step alone, before a whole process adds its epoch ends.
"""
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from absl import app, flags  # noqa: E402

from benchmarks import bench_vs_keras, results  # noqa: E402  (its flags: --cases, --steps, --rounds, --seed, ...)

flags.DEFINE_integer("repeats", 50, "Runs of a kernel per timed loop.")
FLAGS = flags.FLAGS
FLOOR_CASES = ("conv_bn", "conv_bn_mixed", "conv")


def loop_ms(tf, kernel, repeats, rounds):
    """Best ms per run of `kernel()` (a nest of tensors) over `rounds` compiled loops of `repeats` runs each, less
    the loop's own cost per run (the same loop around a constant)."""
    def best(body):
        @tf.function
        def run():
            total = tf.constant(0.0)
            for _ in tf.range(repeats):  # each run reads one element of each output, so none is pruned
                total += tf.add_n([tf.cast(tf.reshape(t, [-1])[0], tf.float32) for t in tf.nest.flatten(body())])
            return total

        run().numpy()
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            run().numpy()
            times.append((time.perf_counter() - started) / repeats * 1000)
        return min(times)

    empty = tf.zeros([1])
    return max(best(kernel) - best(lambda: empty), 0.0)


def kernels(tf, model, precision, batch):
    """[(layer name, what, kernel)] for one training step of `model` at `batch` in `precision`: each kernel a
    callable returning the outputs of that one computation."""
    from core import subpixel
    from core.layers import BatchNorm, Conv2D, Dense
    from core.precision import compute_dtype, compute_in

    dtype = compute_dtype(precision)
    outputs = [(1, 28, 28, 1)] + [tuple(y.shape) for _, y in model.activations(tf.zeros([1, 28, 28, 1]))]
    shapes = [((batch, *x[1:]), (batch, *y[1:])) for x, y in zip(outputs, outputs[1:])]  # (x, y) of each layer
    rng = tf.random.Generator.from_seed(FLAGS.seed)

    def tensor(shape):
        return tf.cast(rng.normal(shape), dtype)

    found, first = [], True
    for name, layer, (x_shape, y_shape) in zip(model.layer_names, model.layers, shapes):
        if isinstance(layer, Conv2D):
            x, w, dy = tensor(x_shape), tensor(layer.w.shape), tensor(y_shape)
            strides = [1, *layer.strides, 1]
            found.append((name, "forward", lambda x=x, w=w, s=strides: tf.nn.conv2d(x, w, s, "SAME")))
            if not first and layer.fused and subpixel.pays(layer.kernel_size, layer.strides):
                found.append((name, "input gradient", lambda x=x, w=w, dy=dy, s=layer.strides[0]:
                              subpixel.input_gradient(dy, w, x.shape[1:3], s, "SAME")))
            elif not first:
                found.append((name, "input gradient", lambda x=x, w=w, dy=dy, s=strides: tf.raw_ops.Conv2DBackpropInput(
                    input_sizes=tf.shape(x), filter=w, out_backprop=dy, strides=s, padding="SAME")))
            found.append((name, "weight gradient", lambda x=x, w=w, dy=dy, s=strides:
                          tf.raw_ops.Conv2DBackpropFilter(input=x, filter_sizes=tf.shape(w), out_backprop=dy,
                                                          strides=s, padding="SAME")))
            first = False
        elif isinstance(layer, Dense):
            x, w, dy = tensor(x_shape), tensor(layer.w.shape), tensor(y_shape)
            found.append((name, "forward", lambda x=x, w=w: tf.matmul(x, w)))
            if not first:
                found.append((name, "input gradient", lambda w=w, dy=dy: tf.matmul(dy, w, transpose_b=True)))
            found.append((name, "weight gradient", lambda x=x, dy=dy: tf.matmul(x, dy, transpose_a=True)))
            first = False
        elif isinstance(layer, BatchNorm):
            x, dy = tensor(x_shape), tensor(y_shape)

            def forward_and_gradient(layer=layer, x=x, dy=dy):
                with tf.GradientTape() as tape:
                    tape.watch(x)
                    with compute_in(layer, dtype):
                        y = layer(x, training=True)
                return tape.gradient(y, x, output_gradients=tf.cast(dy, y.dtype))

            found.append((name, "forward and gradient", forward_and_gradient))
    return found


def floor_table(tf, key):
    """(rows, floor ms) for one case: each kernel's best ms alone."""
    from models import REGISTRY

    _, name, batch, precision, _ = bench_vs_keras.CASES[key]
    tf.random.set_seed(FLAGS.seed)
    model = REGISTRY[name].build(bench_vs_keras.settings(name)["dropout"])
    model.build((None, 28, 28, 1))
    rows, total = [], 0.0
    for layer, what, kernel in kernels(tf, model, precision, batch):
        ms = loop_ms(tf, kernel, FLAGS.repeats, FLAGS.rounds)
        total += ms
        rows.append((layer, what, ms))
        print(f"  {key} {layer} {what}: {ms:.3f} ms", flush=True)
    return rows, total, model


def main(argv):
    del argv
    import tensorflow as tf
    from absl import logging

    import datasets
    from core import data
    from datasets import idx

    logging.set_verbosity(logging.WARNING)
    cases = ([case for case in FLAGS.cases if case in FLOOR_CASES] if FLAGS["cases"].present
             else ["conv_bn", "conv_bn_mixed"])
    if not cases:
        raise app.UsageError(f"--cases: choose from {', '.join(FLOOR_CASES)}")
    tf.config.experimental.enable_op_determinism()
    data_dir = datasets.prepare(FLAGS.data_dir, "mnist", download=False, progress=False)
    train = idx.load(data_dir, "train")
    peaks, peak_text = bench_vs_keras.peak_line(tf)
    print(peak_text, flush=True)
    summary = ["| case | floor ms/step | ours ms/step | Keras ms/step | floor / ours | floor / Keras | whole-process "
               "target | floor's share of the matmul peak | ours' share |", "| --- " * 9 + "|"]
    details = []
    for key in cases:
        label, name, batch, precision, _ = bench_vs_keras.CASES[key]
        rows, floor, model = floor_table(tf, key)
        times, _, _ = bench_vs_keras.step_times(tf, data, train, bench_vs_keras.CASES[key], FLAGS.seed, FLAGS.steps,
                                                FLAGS.rounds)
        ours, theirs = min(times["ours"]), min(times["keras"])
        peak = peaks["float32" if precision == "float32" else "bfloat16"]
        gflop = bench_vs_keras.training_flops(model, tf) * batch / 1e9
        share, ours_share = gflop / (floor / 1000) / peak, gflop / (ours / 1000) / peak
        target = bench_vs_keras.WHOLE_PROCESS_TARGETS.get(key)
        summary.append(f"| {label} | {floor:.2f} | {ours:.2f} | {theirs:.2f} | {floor / ours:.2f} | "
                       f"{floor / theirs:.2f} | {'<= ' + str(target) if target else ''} | {100 * share:.0f}% of "
                       f"{peak:.0f} GFLOP/s | {100 * ours_share:.0f}% |")
        print(summary[-1], flush=True)
        rounds = {side: ", ".join(f"{t:.2f}" for t in times[side]) for side in ("ours", "keras")}
        details.append(f"**{label}**: each kernel alone, ms (the floor {floor:.2f} ms; our step {ours:.2f}, rounds "
                       f"{rounds['ours']}; Keras {theirs:.2f}, rounds {rounds['keras']})\n\n"
                       "| layer | kernel | ms |\n| --- | --- | --- |\n"
                       + "\n".join(f"| {layer} | {what} | {ms:.3f} |" for layer, what, ms in rows))
    cpu, bf16 = results.cpu_flags()
    body = [f"CPU: {cpu}; flags: " + ", ".join(f"{flag} {'yes' if on else 'no'}" for flag, on in bf16.items())
            + f"; {results.onednn()}; TensorFlow {tf.__version__}", peak_text, "\n".join(summary), *details,
            f"Each kernel: the best of {FLAGS.rounds} compiled loops of {FLAGS.repeats} runs, less the empty loop's "
            f"cost per run; the steps: {FLAGS.rounds} alternated rounds of {FLAGS.steps} steps per side, the best "
            f"counts. Load average {results.load()} at the end."]
    print("\n" + "\n\n".join(body[2:]))
    results.record("The floor under a training step: its heavy kernels each timed alone", "\n\n".join(body))


if __name__ == "__main__":
    app.run(main)
