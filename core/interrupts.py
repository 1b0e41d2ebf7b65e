"""Ending a run cleanly on Ctrl-C (SIGINT) or SIGTERM (what `kill`, Docker and cluster schedulers send).

    raise_on_signals()                  # at start-up: either signal raises Interrupt (a KeyboardInterrupt)
    with StopOnSignal() as stop:        # while training: the first signal asks the trainer to stop
        Trainer(..., callbacks=[stop]).fit(...)
    if stop.signum: ...                 # it stopped early; its checkpoint is at the step it reached

While a StopOnSignal is active, the first SIGINT or SIGTERM sets the trainer's `stop_training`: the loop
ends after its current step and saves a checkpoint there, so the run resumes exactly where it stopped. A
second signal raises Interrupt at once (the last committed checkpoint stays, saves being atomic).
The exit code of a run ended by signal s is 128 + s, as a shell reports it: 130 for SIGINT, 143 for SIGTERM.

The second signal always ends the process. Python runs a signal handler in the main thread between two
bytecodes, so its Interrupt can be lost: raised inside a __del__ it is printed as "Exception ignored" and
swallowed, and while the main thread is inside one long native call (a step) the handler does not run at
all, and two signals run it once. So from raise_on_signals() on, and while a StopOnSignal is active, a
watchdog thread counts the signals themselves (written by the C-level handler to a wakeup pipe): at the
second it waits FINAL_GRACE_SECONDS for the process to end by the Interrupt, then prints one line and ends
it with os._exit(128 + signum).
"""
import os
import signal
import sys
import threading

__all__ = ["Interrupt", "raise_on_signals", "StopOnSignal", "SIGNALS", "FINAL_GRACE_SECONDS"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)
# After a second signal, how long the Interrupt may take to end the process before it is ended at once.
FINAL_GRACE_SECONDS = 3.0


class Interrupt(KeyboardInterrupt):
    """Raised by a SIGINT or SIGTERM handler; `signum`, its `name` ('SIGTERM') and `exit_code` (128 + signum)."""

    def __init__(self, signum=signal.SIGINT):
        self.signum = int(signum)
        super().__init__(self.name)

    @property
    def name(self):
        return signal.Signals(self.signum).name

    @property
    def exit_code(self):
        return 128 + self.signum


def _raise(signum, frame):
    raise Interrupt(signum)


class _Watchdog:
    """Counts SIGINT and SIGTERM from a wakeup pipe in a thread of its own; at the second one, ends the
    process (exit 128 + signum) unless it ends by itself, or the watchdog is stopped, within `grace` seconds."""

    def __init__(self, grace):
        self.grace = grace
        self.stopped = threading.Event()
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.write_fd, False)
        self.previous_fd = signal.set_wakeup_fd(self.write_fd, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, name="second-signal-watchdog", daemon=True).start()

    def _watch(self):
        count = 0
        with open(self.read_fd, "rb", buffering=0) as pipe:
            while data := pipe.read(64):  # b"" once stop() closed the writing end
                for signum in data:
                    if signum in SIGNALS and not self.stopped.is_set():
                        count += 1
                        if count == 2 and not self.stopped.wait(self.grace):
                            _exit_now(signum)

    def stop(self):
        """Stops counting; the wakeup descriptor goes back to what it was."""
        self.stopped.set()
        signal.set_wakeup_fd(self.previous_fd)
        os.close(self.write_fd)


def _exit_now(signum):
    """One line on stderr, then the process ends at once with 128 + signum."""
    name = signal.Signals(signum).name
    program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    os.write(2, f"{program}: error: interrupted again ({name}): stopped at once; checkpoints already written "
                f"are kept\n".encode())
    os._exit(128 + signum)


_process_watchdog = None


def raise_on_signals():
    """From now on SIGINT and SIGTERM raise Interrupt in the main thread (SIGTERM would otherwise end the
    process at once, with no message and no cleanup), and the second signal of the process's life always ends
    it: for a program's start, whose first signal leads to its end."""
    global _process_watchdog
    for signum in SIGNALS:
        signal.signal(signum, _raise)
    if _process_watchdog is None:
        _process_watchdog = _Watchdog(FINAL_GRACE_SECONDS)


class StopOnSignal:
    """Trainer callback and context manager: while active, the first SIGINT/SIGTERM asks the trainer to stop
    after its current step (`signum` records it); a second one raises Interrupt. A signal that arrives before
    training begins (restoring, tracing) is kept and applied in on_train_begin."""

    def __init__(self):
        self.signum = None
        self.trainer = None
        self._previous = {}
        self._watchdog = None

    @property
    def name(self):
        return signal.Signals(self.signum).name if self.signum else None

    @property
    def exit_code(self):
        return 128 + self.signum if self.signum else 0

    def __enter__(self):
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        self._watchdog = None if _process_watchdog else _Watchdog(FINAL_GRACE_SECONDS)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise Interrupt(signum)
        self.signum = signum
        if self.trainer is not None:
            self.trainer.stop_training = True

    def on_train_begin(self, trainer):
        self.trainer = trainer
        if self.signum is not None:
            trainer.stop_training = True
