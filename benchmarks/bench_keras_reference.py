"""Benchmark (not a test): train the Keras twin of a model with the same defaults, batches and learning-rate
rule as train.py, and print its test accuracy: the reference our hand-written run is compared with.

    python benchmarks/bench_keras_reference.py --models=dense_decay --seeds=1,2,3 --data_dir=../shared/mnist

Keras draws its own initial weights and dropout masks, so single runs differ from ours by seed noise;
compare medians over a few seeds. The table also goes into this command's section of benchmarks/RESULTS.md.
"""
import os
import statistics
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from benchmarks import results  # noqa: E402

flags.DEFINE_list("models", ["dense_decay"], "Models whose Keras twin is trained with the model's defaults.")
flags.DEFINE_list("seeds", ["1"], "Seeds (one run each).")
flags.DEFINE_string("data_dir", os.path.join(os.path.dirname(ROOT), "shared", "mnist"), "MNIST directory.")
FLAGS = flags.FLAGS


def keras_run(name, seed):
    """Test accuracy of the Keras twin of `name` trained with the model's defaults on our batches."""
    import keras
    from core import data
    from datasets import idx
    from keras_twins import KERAS_TWINS
    from models import REGISTRY

    defaults = REGISTRY[name].defaults
    keras.utils.set_random_seed(seed)
    model = KERAS_TWINS[name]()
    train = idx.load(FLAGS.data_dir, "train")
    test = idx.load(FLAGS.data_dir, "test")
    batch, epochs = defaults["batch_size"], defaults["epochs"]
    steps = defaults["steps_per_epoch"] or len(train) // batch
    lr, decay, k, lr_min = (defaults["learning_rate"], defaults["lr_decay"], defaults["lr_decay_steps"],
                            defaults["lr_min"])
    if decay is None:
        schedule = lr
    else:
        # lr_min + lr * decay ^ (step / k): k = one epoch (staircase) or a number of steps (smooth).
        period, staircase = (steps, True) if k == "epoch" else (k, False)
        base = keras.optimizers.schedules.ExponentialDecay(lr, period, decay, staircase=staircase)

        class Shifted(keras.optimizers.schedules.LearningRateSchedule):
            def __call__(self, step):
                return lr_min + base(step)

        schedule = Shifted()
    optimizer = (keras.optimizers.Adam(schedule) if defaults["optimizer"] == "adam"
                 else keras.optimizers.SGD(schedule))
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    for epoch in range(epochs):
        model.fit(data.training_batches(train, batch, seed, epoch).take(steps), epochs=1, verbose=0)
    _, accuracy = model.evaluate(data.evaluation_batches(test), verbose=0)
    return accuracy


def main(argv):
    del argv
    rows = []
    for name in FLAGS.models:
        accuracies = []
        for seed in (int(s) for s in FLAGS.seeds):
            started = time.monotonic()
            accuracy = keras_run(name, seed)
            accuracies.append(accuracy)
            print(f"{name} keras twin, seed {seed}: test accuracy {100 * accuracy:.2f}% "
                  f"({time.monotonic() - started:.0f} s)", flush=True)
        rows.append((name, accuracies))
    table = ["| model (Keras twin) | seeds | test accuracy per seed | median |", "| --- | --- | --- | --- |"]
    for name, accuracies in rows:
        per_seed = ", ".join(f"{100 * a:.2f}%" for a in accuracies)
        table.append(f"| {name} | {','.join(FLAGS.seeds)} | {per_seed} | {100 * statistics.median(accuracies):.2f}% |")
    print("\n" + "\n".join(table))
    results.record("Keras twins trained with our defaults on our batches", "\n".join(table))


if __name__ == "__main__":
    app.run(main)
