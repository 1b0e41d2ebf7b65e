"""Benchmark (not a test): a convolution's input gradient by TensorFlow's backward-data kernel against one stride-1
convolution over the sub-pixel kernel (core/subpixel.py), per layer geometry, float32 and bfloat16.

    python benchmarks/bench_subpixel.py
    python benchmarks/bench_subpixel.py --batch=128 --rounds=3

Each geometry is a layer of the codelab's convnets (conv and conv_bn share theirs) or a stride-1 layer; each side is
timed alone in a compiled loop of `--repeats` runs, the best of `--rounds` alternated rounds. The ratio sub-pixel /
kernel is what core.subpixel.pays decides on: Conv2D takes the sub-pixel path only where the kernel is at least
three whole strides wide. The figures go into benchmarks/RESULTS.md.
"""
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from absl import app, flags  # noqa: E402

from benchmarks import results  # noqa: E402

flags.DEFINE_integer("batch", 64, "Batch size of every geometry.")
flags.DEFINE_integer("repeats", 30, "Runs per timed loop.")
flags.DEFINE_integer("rounds", 5, "Alternated rounds per side; the best counts.")
FLAGS = flags.FLAGS

# (where it is, x [H, W, C], kernel size, stride, filters)
GEOMETRIES = (("conv, conv_bn: conv2", (28, 28, 12), 6, 2, 24),
              ("conv, conv_bn: conv3", (14, 14, 24), 6, 2, 32),
              ("conv_bn_big: conv2", (28, 28, 24), 5, 2, 48),
              ("conv_bn_big: conv3", (14, 14, 48), 4, 2, 64),
              ("conv_small: conv2", (28, 28, 6), 5, 2, 12),
              ("conv_small: conv3", (14, 14, 12), 4, 2, 24),
              ("a stride-1 layer", (28, 28, 12), 3, 1, 24))


def best_ms(tf, kernel, repeats):
    """One compiled loop of `repeats` runs of kernel(); returns a callable timing it in ms per run."""
    @tf.function
    def loop():
        total = tf.constant(0.0)
        for _ in tf.range(repeats):
            total += tf.cast(kernel(total)[0, 0, 0, 0], tf.float32)
        return total

    loop().numpy()

    def timed():
        started = time.perf_counter()
        loop().numpy()
        return (time.perf_counter() - started) / repeats * 1000

    return timed


def main(argv):
    del argv
    from core.native_logs import load_tensorflow
    tf = load_tensorflow()
    from core import subpixel

    rows = ["| layer | x, kernel, stride | dtype | backward-data kernel ms | sub-pixel ms | sub-pixel / kernel | "
            "Conv2D takes |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for where, (h, w, c), k, s, f in GEOMETRIES:
        x_shape = (FLAGS.batch, h, w, c)
        z_shape = tf.nn.conv2d(tf.zeros(x_shape), tf.zeros((k, k, c, f)), s, "SAME").shape
        rng = tf.random.Generator.from_seed(1)
        for dtype in (tf.float32, tf.bfloat16):
            kernel, dz = tf.cast(rng.normal((k, k, c, f)), dtype), tf.cast(rng.normal(z_shape), dtype)
            sides = {
                "kernel": best_ms(tf, lambda t: tf.compat.v1.nn.conv2d_backprop_input(
                    x_shape, kernel, dz + tf.cast(t * 0, dtype), (1, s, s, 1), "SAME"), FLAGS.repeats),
                "sub-pixel": best_ms(tf, lambda t: subpixel.input_gradient(
                    dz + tf.cast(t * 0, dtype), kernel, (h, w), s, "SAME"), FLAGS.repeats)}
            times = {side: [] for side in sides}
            for _ in range(FLAGS.rounds):
                for side, timed in sides.items():
                    times[side].append(timed())
            ours, theirs = min(times["sub-pixel"]), min(times["kernel"])
            takes = "sub-pixel" if subpixel.pays((k, k), (s, s)) else "the kernel"
            rows.append(f"| {where} | {h}x{w}x{c}, {k}x{k}, {s} | {dtype.name} | {theirs:.3f} | {ours:.3f} | "
                        f"{ours / theirs:.2f} | {takes} |")
            print(rows[-1], flush=True)
    body = "\n".join(rows) + (
        f"\n\nBatch {FLAGS.batch}; each side alone in a compiled loop of {FLAGS.repeats} runs, the best of "
        f"{FLAGS.rounds} alternated rounds; {results.onednn()}; load average {results.load()} at the end. The two "
        "agree to float32 rounding (tests/test_fast_paths.py).")
    results.record("A convolution's input gradient: backward-data kernel against one stride-1 convolution", body)


if __name__ == "__main__":
    app.run(main)
