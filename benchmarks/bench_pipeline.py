"""How fast does the input pipeline deliver training batches, and is it ever the bottleneck?

    TF_CPP_MIN_LOG_LEVEL=2 /work/venv/bin/python benchmarks/bench_pipeline.py [--models softmax,dense,conv]

1. load() (reads, decodes and keeps the IDX files in memory), timed once.
2. Pipeline alone, training_batches(B) with an empty consumer, for every batch size B the models use:
   - from a Python for-loop (`for images, labels in dataset: pass`), the way Trainer.fit consumes it;
   - in-graph (one tf.function iterates the whole epoch), the pipeline's own ceiling.
   Epoch 0 warms up (threads, autotuning); the next epochs are timed.
3. For each model (its default batch size): Runner.train_step (compiled alone) on one fixed batch held in memory
   (the step's own consumption rate, no pipeline), and the same step fed by the pipeline from a Python
   loop, one train_step call per batch, as Trainer.fit does with steps_per_loop=1 (without its progress bar and logging);
   alternating, best of 3 rounds of 1 s each.
   The ratio pipeline (Python loop, mean of the timed epochs) / step alone (best round) should be >= 10
   for the pipeline never to be the bottleneck.
Not a test: numbers depend on the machine and on its load (2 shared cores here). The figures also go into
this command's section of benchmarks/RESULTS.md.
"""
import argparse
import itertools
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tensorflow as tf  # noqa: E402

import datasets  # noqa: E402
import models  # noqa: E402
from benchmarks import results  # noqa: E402
from core import data  # noqa: E402
from core.optimizers import SGD, Adam  # noqa: E402
from core.trainer import Runner, Trainer  # noqa: E402
from datasets import idx  # noqa: E402

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "mnist"


@tf.function
def consume_in_graph(dataset):
    """Iterates a whole epoch inside one graph; returns the number of images."""
    count = tf.constant(0)
    for images, _ in dataset:
        count += tf.shape(images)[0]
    return count


def consume_in_python(dataset):
    count = 0
    for images, _ in dataset:
        count += int(images.shape[0])
    return count


def pipeline_rate(train, batch_size, epochs, consume):
    """Images/second over epochs 1..epochs-1 (epoch 0 warms up) with an empty consumer."""
    images = 0
    seconds = 0.0
    for epoch in range(epochs):
        started = time.perf_counter()
        count = int(consume(data.training_batches(train, batch_size, seed=1, epoch=epoch)))
        if epoch > 0:
            images += count
            seconds += time.perf_counter() - started
    return images / seconds


def fed_batches(train, batch_size):
    """Epochs 1, 2, ... of training batches, one after the other."""
    epoch = 1
    while True:
        yield from data.training_batches(train, batch_size, seed=0, epoch=epoch)
        epoch += 1


def images_per_second(batches, train_step, seconds):
    """Calls train_step on batches for `seconds`; images/second."""
    count = 0
    started = time.perf_counter()
    for images, labels in batches:
        train_step(images, labels)
        count += int(images.shape[0])
        if time.perf_counter() - started >= seconds:
            break
    return count / (time.perf_counter() - started)


def step_rates(name, train, seconds, rounds):
    """(batch size, step alone, step fed by the pipeline) in images/second for model `name`.

    Alone and fed alternate for `rounds` rounds of `seconds` each; the best round of each counts
    (the machine is shared: the best round is the least disturbed one).
    """
    spec = models.get(name)
    batch_size = spec.defaults["batch_size"]
    tf.random.set_seed(0)
    optimizer_class = Adam if spec.defaults["optimizer"] == "adam" else SGD
    model = spec.build(spec.defaults["dropout"])
    trainer = Trainer(Runner(model, optimizer_class(spec.defaults["learning_rate"])), progress=False)
    trainer.build((None, 28, 28, 1))
    train_step = tf.function(lambda images, labels: trainer.runner.train_step((images, labels)))
    batch = next(iter(data.training_batches(train, batch_size, seed=0, epoch=0)))
    for _ in range(5):  # trace and warm up
        train_step(*batch)
    fed = fed_batches(train, batch_size)
    alone_rates, fed_rates = [], []
    for _ in range(rounds):
        alone_rates.append(images_per_second(itertools.repeat(batch), train_step, seconds))
        fed_rates.append(images_per_second(fed, train_step, seconds))
    return batch_size, max(alone_rates), max(fed_rates)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=str(SHARED_MNIST) if SHARED_MNIST.is_dir() else None)
    parser.add_argument("--epochs", type=int, default=4, help="epoch 0 warms up; the rest are timed")
    parser.add_argument("--models", default=",".join(models.REGISTRY), help="comma-separated; empty to skip")
    parser.add_argument("--seconds", type=float, default=1.0, help="time per step measurement round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating alone/fed rounds; the best counts")
    args = parser.parse_args()
    names = [name for name in args.models.split(",") if name]

    lines = []

    def report(line):
        print(line, flush=True)
        lines.append(f"- {line}")

    started = time.perf_counter()
    data_dir = datasets.prepare(args.data_dir)
    report(f"prepare + validate: {time.perf_counter() - started:.2f} s")
    started = time.perf_counter()
    train = idx.load(data_dir, "train")
    report(f"load('train') (read, decode, keep in memory): {time.perf_counter() - started:.2f} s")

    pipeline = {}
    for batch_size in sorted({models.get(name).defaults["batch_size"] for name in names} or {128}):
        python = pipeline_rate(train, batch_size, args.epochs, consume_in_python)
        graph = pipeline_rate(train, batch_size, args.epochs, consume_in_graph)
        pipeline[batch_size] = python
        report(f"pipeline, batch {batch_size}, empty consumer: {python:,.0f} images/s from a Python loop, "
               f"{graph:,.0f} images/s in-graph")

    for name in names:
        batch_size, alone, fed = step_rates(name, train, args.seconds, args.rounds)
        report(f"{name} (batch {batch_size}): train_step alone {alone:,.0f} images/s, fed by the pipeline "
               f"{fed:,.0f} images/s ({fed / alone:.0%}), pipeline / step = {pipeline[batch_size] / alone:.1f}x")
    results.record("Input pipeline against the training step", "\n".join(lines))


if __name__ == "__main__":
    main()
