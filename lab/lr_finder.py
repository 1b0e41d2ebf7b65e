"""The learning-rate range test: train from the initial weights while the learning rate grows exponentially,
and read a good rate off the loss.

    result = find_lr("dense", data, settings("dense"))      # a fresh model, 300 steps, 1e-7 -> 10
    result.suggestion                                         # e.g. 0.003
    result.plot("lr_find.png")                                # loss against lr, log axis, suggestion marked

Step i (0-based) runs at lr_i = start * (end / start) ^ (i / steps), the core's ExponentialDecay with a rate
above 1. The loss of each step is smoothed, s_i = (beta s_(i-1) + (1 - beta) L_i), divided by (1 - beta^(i+1));
the test stops once s_i > 4 min(s) or a loss is not finite (it diverged). The suggestion is the rate where
the smoothed loss falls fastest against log lr, before its minimum: large enough to learn quickly, well below
the rates where training breaks down.
"""
import dataclasses
import math

import numpy as np

from core import data as batches
from core import schedules
from core.trainer import Callback, NonFiniteError, Runner, Trainer
from lab.api import REGISTRY, build, make_optimizer, steps_per_epoch

__all__ = ["find_lr", "LRFinderResult", "suggest"]

BETA = 0.9
DIVERGED = 4.0


@dataclasses.dataclass
class LRFinderResult:
    """learning_rates [n], losses [n] (each step's), smoothed [n]; suggestion: the rate to use."""
    learning_rates: np.ndarray
    losses: np.ndarray
    smoothed: np.ndarray
    suggestion: float
    diverged: bool

    def plot(self, path=None):
        """Loss against learning rate (log axis), the suggestion marked; saved to `path`, returns the Figure."""
        from app.pictures import _figure
        figure = _figure((7, 4))
        axes = figure.add_subplot(1, 1, 1)
        axes.plot(self.learning_rates, self.losses, color="0.75", linewidth=0.8, label="loss of each step")
        axes.plot(self.learning_rates, self.smoothed, color="tab:blue", linewidth=1.6, label="smoothed")
        at = int(np.argmin(np.abs(np.log(self.learning_rates) - math.log(self.suggestion))))
        axes.plot([self.suggestion], [self.smoothed[at]], "o", color="tab:red", markersize=8,
                  label=f"suggestion {self.suggestion:.2g}")
        axes.axvline(self.suggestion, color="tab:red", linewidth=0.8, linestyle="--")
        axes.set_xscale("log")
        top = min(float(np.max(self.smoothed)), DIVERGED * float(np.min(self.smoothed)), 3 * float(self.smoothed[0]))
        axes.set_ylim(0, top * 1.05)
        axes.set_xlabel("learning rate (log scale)")
        axes.set_ylabel("training loss")
        axes.set_title("learning-rate range test")
        axes.grid(alpha=0.3, which="both")
        axes.legend(loc="upper left")
        figure.tight_layout()
        if path is not None:
            figure.savefig(path, dpi=100)
        return figure

    def _repr_png_(self):
        import io
        buffer = io.BytesIO()
        self.plot().savefig(buffer, format="png", dpi=100)
        return buffer.getvalue()


def smooth(losses, beta=BETA):
    """The bias-corrected exponential moving average of `losses`."""
    smoothed, average = [], 0.0
    for i, loss in enumerate(losses):
        average = beta * average + (1 - beta) * loss
        smoothed.append(average / (1 - beta ** (i + 1)))
    return np.array(smoothed)


def suggest(learning_rates, smoothed):
    """The rate where the smoothed loss falls fastest against log lr, among the rates before its minimum
    (the first tenth skipped: the average is still settling there)."""
    lowest = int(np.argmin(smoothed))
    first = max(1, len(smoothed) // 10)
    if lowest <= first + 1:
        return float(learning_rates[lowest]) / 10
    slope = np.gradient(smoothed[first:lowest + 1], np.log(learning_rates[first:lowest + 1]))
    return float(learning_rates[first + int(np.argmin(slope))])


class _Recorder(Callback):
    """Each step's loss and rate; asks the trainer to stop when the smoothed loss diverges."""

    def __init__(self, schedule):
        self.schedule = schedule
        self.rates, self.losses = [], []
        self.trainer = None
        self.diverged = False

    def on_train_begin(self, trainer):
        self.trainer = trainer

    def on_log(self, step, logs):
        self.rates.append(float(self.schedule(step - 1).numpy()))
        self.losses.append(logs["loss"])
        smoothed = smooth(self.losses)
        if not math.isfinite(logs["loss"]) or smoothed[-1] > DIVERGED * smoothed.min():
            self.diverged = True
            self.trainer.stop_training = True


def find_lr(model, data, config, steps=300, start=1e-7, end=10.0):
    """The range test on data.train with `config`'s optimizer and batch size: `model` is a name of
    models.REGISTRY (built fresh from config.seed, as train.py would start) or a model, whose weights are
    put back afterwards. At most one epoch of `steps` steps; nothing is written. Returns an LRFinderResult."""
    network = build(model, config, data) if isinstance(model, str) and model in REGISTRY else model
    saved = [variable.numpy() for variable in network.variables]
    steps = min(steps, steps_per_epoch(config, data.train))
    schedule = schedules.ExponentialDecay(start, end / start, steps)
    recorder = _Recorder(schedule)
    trainer = Trainer(Runner(network, make_optimizer(config, schedule), jit_compile=config.jit_compile),
                      callbacks=[recorder], log_every=1, steps_per_loop=1, progress=False)
    try:
        trainer.fit(batches.GatheredBatches(data.train, config.batch_size, config.seed), 1, steps_per_epoch=steps)
    except NonFiniteError:
        recorder.diverged = True
    finally:
        for variable, value in zip(network.variables, saved):
            variable.assign(value)
    count = len(recorder.losses)
    losses = np.array(recorder.losses[:count])
    finite = np.isfinite(losses)
    rates, losses = np.array(recorder.rates[:count])[finite], losses[finite]
    smoothed = smooth(losses)
    return LRFinderResult(rates, losses, smoothed, suggest(rates, smoothed), recorder.diverged)
