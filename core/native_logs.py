"""Hiding what TensorFlow's C++ runtime writes to file descriptor 2 while it starts (oneDNN notice, CUDA probing
on a machine without GPU): TF_CPP_MIN_LOG_LEVEL does not reach those lines. Shared by train.py and predict.py."""
import contextlib
import os
import sys
import tempfile


@contextlib.contextmanager
def quiet_native_logs(replay_on_error=True):
    """Points file descriptor 2 at a temporary file for the duration of the block. If the block raises, the hidden
    text is written out before the error propagates (`replay_on_error`) or dropped (the caller reports the error
    in one line of its own)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        except BaseException as error:
            os.dup2(saved, 2)
            if replay_on_error and not isinstance(error, KeyboardInterrupt):  # Ctrl-C: the caller's one line
                captured.seek(0)
                sys.stderr.write(captured.read().decode("utf-8", "replace"))
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


@contextlib.contextmanager
def without_keras_preload():
    """TensorFlow's __init__ imports keras.src.optimizers, and with it all of Keras and matplotlib (1.5 s of a 5 s
    start on a 2-core CPU), only to register Keras's optimizers for loading Keras's own SavedModels. Nothing here
    uses Keras, so while TensorFlow loads that import fails (a None in sys.modules raises ImportError, which
    TensorFlow's __init__ ignores); afterwards `import keras` works as usual, in full."""
    blocked = "tensorflow" not in sys.modules and "keras" not in sys.modules
    if blocked:
        sys.modules["keras.src.optimizers"] = None
    try:
        yield
    finally:
        if blocked and sys.modules.get("keras.src.optimizers", "") is None:
            del sys.modules["keras.src.optimizers"]


def load_tensorflow():
    """Imports TensorFlow (without its Keras preload) and initialises its devices with the start-up noise hidden;
    returns the module."""
    with quiet_native_logs(), without_keras_preload():
        import tensorflow as tf
        tf.config.list_physical_devices()
    return tf
