"""Benchmark (not a test): what each speed lever gives our training step, one lever at a time.

    python benchmarks/bench_levers.py                                   # every lever, softmax, dense5, conv, conv_bn
    python benchmarks/bench_levers.py --models=softmax --levers=input,guard --steps=300

Each lever compares a variant with the baseline (Runner.train fed by data.training_batches, 50 steps per
call, the full NaN guard, float64 metrics updated every step, no XLA) on the same model in the same process:
rounds alternate baseline and variant, the best round of each counts (the machine may be shared), and the median
of each back-to-back pair's ratio (steadier on a loaded machine).
    input      batches gathered inside the compiled loop (data.GatheredBatches) instead of tf.data
    loop1      one step per call instead of 50
    guard      no NaN guard at all (what the guard costs)
    metrics    no metric updates in the step (what the per-step float64 metrics cost)
    xla        the step compiled with XLA (Runner(jit_compile=True), as --jit_compile), fed by GatheredBatches
The fast paths, each against the default step (fused kernels on, float32) fed by GatheredBatches, as train.py:
    formulas           every layer on its formula (fused=False): the step before the fast paths
    formula_bn         BatchNorm on its formula, the rest fused
    formula_relu_bias  Dense, Conv2D and Activation on their formulas (+ b, x * [x > 0]), BatchNorm fused
    relu_after_bn      only the ReLUs that follow a BatchNorm on their formula (x * [x > 0]), the rest fused
    relu_kernel_after_bn  every ReLU that follows a BatchNorm as tf.nn.relu, merged into its kernel even where
                       that kernel is oneDNN's reference one (float32, channels not a multiple of 8)
    bfloat16_relu_after_bn  relu_after_bn under --precision=mixed_bfloat16
    bfloat16           --precision=mixed_bfloat16 on the fast paths (bfloat16 through the fused BatchNorm)
    bfloat16_formulas  --precision=mixed_bfloat16 on the formulas (BatchNorm cast up to float32 and back)
    adam_compiled      Adam's float32 updates as one XLA-compiled function, bit-equal (Adam(fused=True))
                       instead of its formula op by op
    adam_op            Adam as one tf.raw_ops.ResourceApplyAdam per variable (not bit-equal to ours: 1 - beta
                       rounded in float32 instead of Keras's Python float)
    s2d                the 6x6 stride-2 convolutions as 3x3 stride-1 convolutions over space_to_depth (exact)
    backward_data_kernel  Conv2D's input gradient by TensorFlow's backward-data kernel (Conv2DBackpropInput)
                       instead of one stride-1 convolution (core/subpixel.py); bfloat16_backward_data_kernel: the
                       same under --precision=mixed_bfloat16, to set beside `bfloat16`
    bfloat16_float32_first_layer  `bfloat16` with the first convolution (one input channel) and its BatchNorm in
                       float32; bfloat16_padded_batch_norm: `bfloat16` with each BatchNorm whose channels are not a
                       multiple of 16 fed x zero-padded to one (oneDNN's bfloat16 kernel) instead of its pixels
                       grouped; bfloat16_batch_norm_between_casts: `bfloat16` with such a BatchNorm's x cast to
                       float32 for the float32 kernel and y cast back (instead of its pixels grouped);
                       bfloat16_batch_norm_relu_apart: `bfloat16` with each grouped BatchNorm and the ReLU after it
                       called apart (instead of as one call, BatchNorm.call_with_relu)
    float32_grouped_batch_norm  the float32 step with each BatchNorm whose channels are not a multiple of 16
                       run on grouped pixels in training, as the bfloat16 step runs it (BatchNorm._fused_grouped)
Threading (inter_op / intra_op) is set before TensorFlow starts: run this script again with
--inter_op=N --intra_op=M and compare its baseline column; so with TensorFlow's oneDNN environment variables
(TF_ONEDNN_THREADPOOL_USE_CALLER_THREAD=1, TF_ONEDNN_USE_SYSTEM_ALLOCATOR=1). The figures go into RESULTS.md.
"""
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from absl import app, flags  # noqa: E402

from benchmarks import results  # noqa: E402
from benchmarks.fast_path_levers import FAST_PATH_LEVERS, STEP_LEVERS, lever_runner  # noqa: E402

LEVERS = ("input", "loop1") + STEP_LEVERS
flags.DEFINE_list("models", ["softmax", "dense5", "conv", "conv_bn"], "Models (their default batch sizes).")
flags.DEFINE_list("levers", list(LEVERS), f"Levers: {', '.join(LEVERS + FAST_PATH_LEVERS)}.")
flags.DEFINE_integer("steps", 200, "Steps per timed round.")
flags.DEFINE_integer("rounds", 3, "Timed rounds per side; the best counts.")
flags.DEFINE_integer("inter_op", 0, "tf.config.threading inter_op_parallelism_threads (0: TensorFlow's choice).")
flags.DEFINE_integer("intra_op", 0, "tf.config.threading intra_op_parallelism_threads (0: TensorFlow's choice).")
flags.DEFINE_string("data_dir", str(ROOT.parent / "shared" / "mnist"), "Directory of the four MNIST files.")
FLAGS = flags.FLAGS
LOOP = 50


class Side:
    """A runner and its batches: run(steps) trains `steps` steps in calls of `loop`."""

    def __init__(self, tf, data, train, name, lever):
        from models import REGISTRY

        self.tf = tf
        batch = REGISTRY[name].defaults["batch_size"]
        # input, loop1 and gathered (the fast paths' baseline) change the feeding, not the step
        self.runner = lever_runner(tf, name, lever if lever in STEP_LEVERS + FAST_PATH_LEVERS else None)
        self.loop = 1 if lever == "loop1" else LOOP
        if lever in ("input", "xla", "gathered") + FAST_PATH_LEVERS:
            self.source = data.GatheredBatches(train, batch, seed=1)
            self.runner.prepare(self.source.element_spec, source=self.source)
            self.batches = lambda epoch: self.source.start(epoch)
        else:
            self.batches = lambda epoch: iter(data.training_batches(train, batch, 1, epoch))
            self.runner.prepare(data.training_batches(train, batch, 1, 0).element_spec)
        self.steps_per_epoch = len(train) // batch
        self.epoch = 0
        self.iterator = self.batches(0)
        self.done = 0

    def run(self, steps):
        started = time.perf_counter()
        length = self.tf.constant(self.loop, self.tf.int32)
        for _ in range(steps // self.loop):
            if self.done + self.loop > self.steps_per_epoch:
                self.epoch += 1
                self.iterator = self.batches(self.epoch)
                self.done = 0
            self.runner.train(self.iterator, length)
            self.done += self.loop
        self.runner.learning_rate.numpy()
        return 1000 * (time.perf_counter() - started) / (steps // self.loop * self.loop)


def main(argv):
    del argv
    unknown = [lever for lever in FLAGS.levers if lever not in LEVERS + FAST_PATH_LEVERS]
    if unknown:
        raise app.UsageError(f"--levers: unknown {', '.join(unknown)}; choose from "
                             f"{', '.join(LEVERS + FAST_PATH_LEVERS)}")
    import tensorflow as tf
    if FLAGS.inter_op:
        tf.config.threading.set_inter_op_parallelism_threads(FLAGS.inter_op)
    if FLAGS.intra_op:
        tf.config.threading.set_intra_op_parallelism_threads(FLAGS.intra_op)
    import datasets
    from core import data
    from datasets import idx

    train = idx.load(datasets.prepare(FLAGS.data_dir, "mnist", download=False, progress=False), "train")
    table = ["| model | lever | baseline ms/step | with the lever | change (best rounds) | change (median of paired "
             "rounds) |", "| --- | --- | --- | --- | --- | --- |"]
    for name in FLAGS.models:
        baselines = {}
        for lever in FLAGS.levers:
            key = "gathered" if lever in FAST_PATH_LEVERS else None
            if key not in baselines:
                baselines[key] = Side(tf, data, train, name, key)
                baselines[key].run(LOOP)
            baseline = baselines[key]
            variant = Side(tf, data, train, name, lever)
            variant.run(LOOP)
            times = {"baseline": [], "variant": []}
            for index in range(FLAGS.rounds):
                order = ((baseline, "baseline"), (variant, "variant"))
                for side, key in (order if index % 2 == 0 else order[::-1]):
                    times[key].append(side.run(FLAGS.steps))
            base, mine = min(times["baseline"]), min(times["variant"])
            paired = statistics.median(v / b for v, b in zip(times["variant"], times["baseline"]))
            table.append(f"| {name} | {lever} | {base:.2f} | {mine:.2f} | {100 * (mine - base) / base:+.1f}% | "
                         f"{100 * (paired - 1):+.1f}% |")
            print(table[-1], flush=True)
    threads = f"inter_op {FLAGS.inter_op or 'default'}, intra_op {FLAGS.intra_op or 'default'}"
    body = (f"Baseline: Runner.train fed by data.training_batches (the fast-path levers: by data.GatheredBatches), "
            f"{LOOP} steps per call, full NaN guard, float64 metrics, no XLA, fused kernels on; {threads}; "
            f"{FLAGS.rounds} alternated rounds of {FLAGS.steps} steps, best of each; {results.onednn()}; "
            f"load average {os.getloadavg()[0]:.1f} at the end.\n\n" + "\n".join(table))
    print("\n" + body)
    results.record("What each speed lever gives our training step", body)


if __name__ == "__main__":
    app.run(main)
