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


def load_tensorflow():
    """Imports TensorFlow and initialises its devices with the start-up noise hidden; returns the module."""
    with quiet_native_logs():
        import tensorflow as tf
        tf.config.list_physical_devices()
    return tf
