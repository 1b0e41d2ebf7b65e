"""How fast does the input pipeline deliver training batches, and is it ever the bottleneck?

    TF_CPP_MIN_LOG_LEVEL=2 /work/venv/bin/python benchmarks/bench_pipeline.py [--models softmax,dense,conv]

1. Pipeline alone: load() (reads, decodes and caches the IDX files), then training_batches(batch 128)
   with an empty consumer; epoch 0 warms up (threads, autotuning), the next epochs are timed.
2. If core.trainer and models/ are importable: each model's Trainer.train_step on one fixed batch
   held in memory (the step's own consumption rate, no pipeline), then the same step fed by the
   pipeline. The ratio pipeline / step should be >= 10 for the pipeline never to be the bottleneck.
Not a test: numbers depend on the machine and on its load (2 shared cores here).
"""
import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tensorflow as tf  # noqa: E402

from core import data  # noqa: E402

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "mnist"


def time_epochs(train, batch_size, seed, epochs):
    """[(epoch, images, seconds)] for epochs 0..epochs-1 with an empty consumer."""
    results = []
    for epoch in range(epochs):
        started = time.perf_counter()
        images = 0
        for batch, _ in data.training_batches(train, batch_size, seed=seed, epoch=epoch):
            images += int(batch.shape[0])
        results.append((epoch, images, time.perf_counter() - started))
    return results


def step_rates(name, train, batch_size, steps):
    """(step alone, step fed by the pipeline) in images/second for model `name`."""
    import models
    from core.optimizers import SGD, Adam
    from core.trainer import Trainer

    spec = models.get(name)
    tf.random.set_seed(0)
    optimizer_class = Adam if spec.defaults["optimizer"] == "adam" else SGD
    trainer = Trainer(spec.build(spec.defaults["dropout"]), optimizer_class(spec.defaults["learning_rate"]),
                      progress=False)
    trainer.build((None, 28, 28, 1))
    images, labels = next(iter(data.training_batches(train, batch_size, seed=0, epoch=0)))
    for _ in range(5):  # trace and warm up
        trainer.train_step(images, labels)
    started = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(images, labels)
    alone = steps * batch_size / (time.perf_counter() - started)

    fed = data.training_batches(train, batch_size, seed=0, epoch=1).take(steps)
    started = time.perf_counter()
    count = 0
    for images, labels in fed:
        trainer.train_step(images, labels)
        count += int(images.shape[0])
    return alone, count / (time.perf_counter() - started)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=str(SHARED_MNIST) if SHARED_MNIST.is_dir() else None)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=4, help="epoch 0 warms up; the rest are timed")
    parser.add_argument("--models", default="softmax,dense,conv", help="comma-separated; empty to skip")
    parser.add_argument("--steps", type=int, default=300, help="training steps timed per model")
    args = parser.parse_args()

    started = time.perf_counter()
    data_dir = data.prepare(args.data_dir)
    print(f"prepare + validate {data_dir}: {time.perf_counter() - started:.2f} s")
    started = time.perf_counter()
    train = data.load(data_dir, "train")
    print(f"load('train') (read, decode, fill the cache): {time.perf_counter() - started:.2f} s")
    results = time_epochs(train, args.batch_size, seed=1, epochs=args.epochs)
    for epoch, images, seconds in results:
        note = " (warm-up, not counted)" if epoch == 0 and len(results) > 1 else ""
        print(f"epoch {epoch}: {images} images in {seconds:.2f} s = {images / seconds:,.0f} images/s{note}")
    timed = results[1:] or results
    pipeline = sum(images for _, images, _ in timed) / sum(seconds for _, _, seconds in timed)
    print(f"pipeline (batch {args.batch_size}, empty consumer, cached epochs): {pipeline:,.0f} images/s")

    names = [name for name in args.models.split(",") if name]
    for name in names:
        try:
            alone, fed = step_rates(name, train, args.batch_size, args.steps)
        except Exception as error:  # the trainer or the model zoo may not exist yet
            print(f"{name}: training step not measured ({type(error).__name__}: {error})")
            continue
        print(f"{name}: train_step alone {alone:,.0f} images/s, fed by the pipeline {fed:,.0f} images/s, "
              f"pipeline / step = {pipeline / alone:.1f}x")


if __name__ == "__main__":
    main()
