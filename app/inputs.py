"""What predict.py classifies: a model directory -> its SavedModel, input files -> checked pixel arrays of the
model's image shape, BATCH images at a time -> one printed line each. Imports no TensorFlow (the model is loaded
by app.export when the inputs are read and checked).

    images = read_input("digits.npy")                 # [(name, x, is_picture)]: x checked pixels, memory-mapped
    names, batch = fit_to_model(*images[0], (28, 28, 1))   # batch [N, 28, 28, 1], a view of x
    x = as_model_input(batch[:BATCH])                 # float32 in [0, 1]
    print(describe(names[0], 7, probabilities, top_k=3))   # "digits.npy:1: 7  (7: 0.9812  1: 0.0121  9: 0.0040)"
"""
import os
import sys

from app import digits
from core.native_logs import load_tensorflow, quiet_native_logs

__all__ = ["BATCH", "InputError", "find_saved_model", "load_classifier", "classify", "read_input", "checked_array",
           "fit_to_model", "as_model_input", "describe"]

PROGRAM = "predict.py"
BATCH = 1000  # images per call of the model
CHECK_CHUNK = 1 << 22  # array elements checked at a time


class InputError(Exception):
    """A model directory that cannot be used (exit code 1)."""


def note(message):
    """`predict.py: note: message` on stderr (the input is used)."""
    print(f"{PROGRAM}: note: {' '.join(str(message).split())}", file=sys.stderr)


def find_saved_model(model_dir):
    """The SavedModel directory in `model_dir`: itself, or its highest numbered version (TensorFlow Serving)."""
    if not os.path.isdir(model_dir):
        raise InputError(f"--model_dir {model_dir}: no such directory")
    if os.path.exists(os.path.join(model_dir, "saved_model.pb")):
        return model_dir
    versions = [int(v) for v in os.listdir(model_dir)
                if v.isdigit() and os.path.exists(os.path.join(model_dir, v, "saved_model.pb"))]
    if not versions:
        raise InputError(f"--model_dir {model_dir}: not a SavedModel (no saved_model.pb; "
                         f"export one with train.py --export_dir)")
    return os.path.join(model_dir, str(max(versions)))


def load_classifier(saved_model_dir):
    """The export's Classifier (TensorFlow starts here, its start-up noise hidden)."""
    with quiet_native_logs(replay_on_error=False):
        load_tensorflow()
        from app import export
        return export.Classifier(saved_model_dir)


def classify(classifier, images):
    """images [N, H, W, C] float32 -> (probabilities [N, K], classes [N]) through serving_default."""
    with quiet_native_logs(replay_on_error=False):
        return classifier(images)


def read_input(path):
    """[(name, x, is_picture)]: a .npy file's array (memory-mapped, checked by checked_array; refused unless a
    regular file, as a FIFO would block np.load), else digits.read_inputs' MNIST-style [28, 28]."""
    import numpy as np

    name = os.fspath(path)
    if name.lower().endswith(".npy"):
        try:
            with digits.open_regular(name):
                pass
            array = np.load(name, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise digits.DigitError(f"{name}: cannot read the array ({getattr(e, 'strerror', None) or e})") from None
        return [(name, checked_array(name, array), False)]
    return [(name, x, True) for name, x in digits.read_inputs(name)]


def checked_array(name, x):
    """x itself if it holds pixels: integers 0..255 (other than uint8: with a note that they are read as
    pixels) or finite floats in [0, 1], at least one image; else DigitError. Read CHECK_CHUNK elements at a
    time (a memory-mapped file is never read whole)."""
    import numpy as np

    if x.dtype.kind not in "uif":
        raise digits.DigitError(f"{name}: an array of {x.dtype}; expected pixels: integers 0..255 (uint8) or "
                                f"floats in [0, 1]")
    if x.size == 0:
        raise digits.DigitError(f"{name}: an empty array of shape {list(x.shape)}, no images")
    if x.dtype == np.uint8:
        return x
    flat = np.ravel(x, order="K")
    low, high, finite = np.inf, -np.inf, True
    for start in range(0, flat.size, CHECK_CHUNK):
        chunk = flat[start:start + CHECK_CHUNK]
        if x.dtype.kind == "f" and not np.isfinite(chunk).all():
            finite = False
            break
        low, high = min(low, chunk.min()), max(high, chunk.max())
    if not finite:
        raise digits.DigitError(f"{name}: the array has NaN or infinite values")
    if x.dtype.kind == "f" and (low < 0 or high > 1):
        raise digits.DigitError(f"{name}: {x.dtype} values must be in [0, 1], found [{low:g}, {high:g}] "
                                f"(divide 0..255 pixels by 255)")
    if x.dtype.kind in "ui" and (low < 0 or high > 255):
        raise digits.DigitError(f"{name}: {x.dtype} values must be pixels 0..255, found [{low}, {high}]")
    if x.dtype.kind in "ui":
        note(f"{name}: {x.dtype} values read as pixels 0..255 (divided by 255)")
    return x


def fit_to_model(name, x, is_picture, image_shape):
    """(names, batch [N, H, W, C]) for a model of `image_shape` (H, W, C): a view of x (a memory-mapped array
    stays on disk; as_model_input converts slices of it); DigitError when x does not fit."""
    shape, dims = "x".join(map(str, image_shape)), ", ".join(map(str, image_shape))
    if is_picture:
        if tuple(image_shape) != (digits.IMAGE_SIZE, digits.IMAGE_SIZE, 1):
            raise digits.DigitError(f"{name}: picture preprocessing is for 28x28 grey digits; this model takes "
                                    f"{shape} images: give them as a .npy array [N, {dims}]")
        return [name], x.reshape((1,) + tuple(image_shape))
    grey = image_shape[2] == 1
    if x.shape in (tuple(image_shape), tuple(image_shape[:2]) if grey else None):
        return [name], x.reshape((1,) + tuple(image_shape))
    if x.ndim in (3, 4) and x.shape[1:] in (tuple(image_shape), tuple(image_shape[:2]) if grey else None):
        return [f"{name}:{i}" for i in range(1, len(x) + 1)], x.reshape((len(x),) + tuple(image_shape))
    raise digits.DigitError(f"{name}: an array of shape {list(x.shape)}; this model takes {shape} images "
                            f"[{dims}] or a batch [N, {dims}]")


def as_model_input(images):
    """Checked pixels (integers 0..255 or floats in [0, 1]) -> float32 in [0, 1]."""
    import numpy as np

    x = images.astype(np.float32)
    if images.dtype.kind in "ui":
        x /= np.float32(255)
    return x


def describe(name, predicted, probabilities, top_k):
    """"name: 7  (7: 0.9812  1: 0.0121  9: 0.0040)": the class, then the top_k classes by probability."""
    order = sorted(range(len(probabilities)), key=lambda c: -probabilities[c])[:top_k]
    top = "  ".join(f"{c}: {probabilities[c]:.4f}" for c in order)
    return f"{name}: {predicted}  ({top})"
