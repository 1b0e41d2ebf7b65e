"""A callback the resume tests share: stop a run (or crash it) at a given log point."""
from core.trainer import Callback


class StopAt(Callback):
    """At the log point of `step`: ask the trainer to stop, or crash (any exception out of fit)."""

    def __init__(self, step, crash=False):
        self.step, self.crash, self.trainer = step, crash, None

    def on_train_begin(self, trainer):
        self.trainer = trainer

    def on_log(self, step, logs):
        if step == self.step:
            if self.crash:
                raise KeyboardInterrupt("simulated crash")
            self.trainer.stop_training = True
