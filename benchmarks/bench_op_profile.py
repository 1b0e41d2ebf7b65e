"""Benchmark (not a test): where a training step's time goes, op type by op type, ours against Keras.

    python benchmarks/bench_op_profile.py                          # conv, conv_bn, dense5, softmax
    python benchmarks/bench_op_profile.py --cases=conv --steps=20

Each case builds our side and Keras's exactly as benchmarks/bench_vs_keras.py does (same model, batch, seed;
ours gathered in the compiled loop, Keras's model.fit on tf.data), but our step runs op by op even for the
models that default to XLA: an XLA cluster's kernels have no op types in the profile (`--jit_compile` shows
that). Both train a few untimed steps, then run `--steps` steps each under TensorFlow's profiler, `--rounds`
times alternated, and each op type's self time (what its kernel ran, on every thread) is summed per step in
each side's round of least wall time. The sums are CPU milliseconds per step: with two cores they may exceed
the wall time, and they leave out the time no op runs. The table shows why a ratio is what it is: when the
same kernels (the convolutions) take nearly all of both sides' time, no loop or Python overhead is left to win.
The figures go into this command's section of benchmarks/RESULTS.md.
"""
import collections
import glob
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from absl import app, flags  # noqa: E402

from benchmarks import bench_vs_keras, results  # noqa: E402

# Op types that are convolution kernels (forward, and the two gradients).
CONVOLUTIONS = ("Conv2D", "_FusedConv2D", "Conv2DBackpropFilter", "Conv2DBackpropInput")
SHOWN = 12  # op types per table, the largest on either side; the rest are summed as "other"

# The flags of bench_vs_keras.py (--cases, --steps, --rounds, --seed, --data_dir), with defaults for profiling.
FLAGS = flags.FLAGS
FLAGS.set_default("cases", ["conv", "conv_bn", "dense5", "softmax"])
FLAGS.set_default("steps", 30)
FLAGS.set_default("jit_compile", False)  # an XLA-compiled step runs as one cluster, which has no op types


def op_self_times(tf, fit, steps):
    """({op type: CPU ms per step}, wall ms per step) of fit(steps) run under the profiler."""
    from tensorflow.python.profiler.internal import _pywrap_profiler_plugin as profiler_plugin

    logdir = tempfile.mkdtemp()
    try:
        tf.profiler.experimental.start(logdir)
        started = time.perf_counter()
        fit(steps)
        wall = time.perf_counter() - started
        tf.profiler.experimental.stop()
        planes = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
        data, ok = profiler_plugin.xspace_to_tools_data(planes, "framework_op_stats", {})
        if not ok:
            raise RuntimeError(f"the profiler wrote no op statistics into {logdir}")
    finally:
        shutil.rmtree(logdir, ignore_errors=True)
    table = json.loads(data)
    table = table[0] if isinstance(table, list) else table
    columns = [column["id"] for column in table["cols"]]
    per_type = collections.Counter()
    for row in table["rows"]:
        cells = dict(zip(columns, [cell.get("v") if cell else None for cell in row["c"]]))
        if cells["type"] != "IDLE":
            per_type[cells["type"]] += cells["total_self_time"] / 1000 / steps  # microseconds in the profile
    return per_type, 1000 * wall / steps


def profile_case(tf, data, train, key, steps):
    """{"ours": (per_type, wall), "keras": (...)} for one case of bench_vs_keras.CASES: the profiled round of
    least wall time of each side, rounds alternated."""
    _, name, batch, precision, policy = bench_vs_keras.CASES[key]
    ours = bench_vs_keras.Ours(tf, name, precision, FLAGS.seed)
    theirs = bench_vs_keras.Theirs(name, policy, FLAGS.seed)
    source = data.GatheredBatches(train, batch, FLAGS.seed)
    fits = {"ours": lambda n: ours.fit(source, n),
            "keras": lambda n: theirs.fit(data.training_batches(train, batch, FLAGS.seed,
                                                               theirs.epochs).take(n))}
    for fit in fits.values():
        fit(20)  # traced and warm
    rounds = {"ours": [], "keras": []}
    for index in range(FLAGS.rounds):
        for side in ("ours", "keras") if index % 2 else ("keras", "ours"):
            rounds[side].append(op_self_times(tf, fits[side], steps))
    return {side: min(profiles, key=lambda profile: profile[1]) for side, profiles in rounds.items()}


def table_lines(label, profiles):
    """The markdown rows of one case: the largest op types, the rest, the totals and the convolutions' share."""
    (ours, ours_wall), (keras, keras_wall) = profiles["ours"], profiles["keras"]
    types = sorted(set(ours) | set(keras), key=lambda t: -max(ours[t], keras[t]))
    shown, rest = types[:SHOWN], types[SHOWN:]
    lines = [f"**{label}**: wall ms/step while profiled: ours {ours_wall:.2f}, Keras {keras_wall:.2f}", "",
             "| op type | ours CPU ms/step | Keras CPU ms/step |", "| --- | --- | --- |"]
    lines += [f"| {t} | {ours[t]:.3f} | {keras[t]:.3f} |" for t in shown]
    lines.append(f"| other ({len(rest)} types) | {sum(ours[t] for t in rest):.3f} | "
                 f"{sum(keras[t] for t in rest):.3f} |")
    total_ours, total_keras = sum(ours.values()), sum(keras.values())
    lines.append(f"| **all ops** | **{total_ours:.2f}** | **{total_keras:.2f}** |")
    conv_ours, conv_keras = (sum(side[t] for t in CONVOLUTIONS) for side in (ours, keras))
    if conv_ours or conv_keras:
        lines.append(f"| convolutions' share | {100 * conv_ours / total_ours:.0f}% | "
                     f"{100 * conv_keras / total_keras:.0f}% |")
    return lines


def main(argv):
    del argv
    import tensorflow as tf
    from absl import logging
    import datasets
    from core import data
    from datasets import idx

    logging.set_verbosity(logging.WARNING)
    unknown = [case for case in FLAGS.cases if case not in bench_vs_keras.CASES]
    if unknown:
        raise app.UsageError(f"unknown case(s) {', '.join(unknown)}; choose from "
                             f"{', '.join(bench_vs_keras.CASES)}")
    tf.config.experimental.enable_op_determinism()
    data_dir = datasets.prepare(FLAGS.data_dir, "mnist", download=False, progress=False)
    train = idx.load(data_dir, "train")
    sections = []
    for key in FLAGS.cases:
        label = bench_vs_keras.CASES[key][0]
        sections.append("\n".join(table_lines(label, profile_case(tf, data, train, key, FLAGS.steps))))
        print(sections[-1] + "\n", flush=True)
    sections.append(f"{FLAGS.rounds} alternated rounds of {FLAGS.steps} profiled steps per side after 20 untimed "
                    f"ones; each side's round of least wall time. CPU ms: each op type's kernel time summed over "
                    f"threads (up to the number of cores times the wall time), idle time left out.")
    results.record("Where a step's time goes, by op type: ours against Keras", "\n\n".join(sections))


if __name__ == "__main__":
    app.run(main)
