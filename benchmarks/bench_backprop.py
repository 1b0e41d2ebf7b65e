"""Benchmark (not a test): milliseconds per compiled training step with the tape's gradients and with the
hand-written backward passes, per model, timed in alternating rounds in one process so that a machine shared
with other work slows both alike.

    python benchmarks/bench_backprop.py --data_dir=../shared/mnist                     # conv_bn
    python benchmarks/bench_backprop.py --data_dir=../shared/mnist --models=conv,dense --rounds=3

Each model is built twice from the same seed; each Runner gets its own optimizer. The figure printed is the
median over rounds of each round's mean step time, and the ratio by_hand / tape.
"""
import os
import statistics
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train  # noqa: E402  (defines train.py's flags: --data_dir and --seed apply here)

flags.DEFINE_list("models", ["conv_bn"], "Models to time.")
flags.DEFINE_integer("rounds", 5, "Alternating rounds of tape, then by-hand steps.")
flags.DEFINE_integer("steps", 40, "Steps timed per round and gradient function.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import tensorflow as tf

    import datasets
    from core import backprop, data, names
    from datasets import idx
    from core.runner import Runner, tape_gradients
    from models import REGISTRY

    train_set = idx.load(datasets.prepare(FLAGS.data_dir, "mnist", download=False, progress=False), "train")
    print("| model | tape ms/step | by hand ms/step | by hand / tape |")
    print("| --- | --- | --- | --- |")
    for name in FLAGS.models:
        spec = REGISTRY[name]
        config = train.make_config({"model": name})
        batches = data.training_batches(train_set, config.batch_size, FLAGS.seed, 0).repeat()
        trainers = {}
        for how, compute_gradients in (("tape", tape_gradients), ("by_hand", backprop.gradients)):
            tf.random.set_seed(FLAGS.seed)
            model = spec.build(config.dropout)
            model.build((None, 28, 28, 1))
            optimizer = names.optimizer(config, names.learning_rate_schedule(config, 100))
            runner = Runner(model, optimizer, compute_gradients=compute_gradients)
            runner.prepare(batches.element_spec)
            trainers[how] = (runner, iter(batches))
        times = {how: [] for how in trainers}
        for _ in range(FLAGS.rounds + 1):  # the first round warms up and is not counted
            for how, (runner, iterator) in trainers.items():
                started = time.perf_counter()
                runner.train(iterator, tf.constant(FLAGS.steps))
                runner.optimizer.step.numpy()
                times[how].append((time.perf_counter() - started) / FLAGS.steps * 1000)
        tape, by_hand = (statistics.median(times[how][1:]) for how in ("tape", "by_hand"))
        print(f"| {name} | {tape:.1f} | {by_hand:.1f} | {by_hand / tape:.2f} |", flush=True)


if __name__ == "__main__":
    app.run(main)
