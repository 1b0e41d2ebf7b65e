"""Classify your own digits with a model exported by train.py.

  python predict.py --model_dir runs/conv/saved_model seven.png photo_of_a_3.jpg digits.json
  python predict.py --model_dir runs/conv/saved_model --inputs=a.png,b.jpg --save_preview=seen.png --top_k=3
  python predict.py --model_dir runs/colour/saved_model images.npy      # a model of other images: raw arrays

Inputs: pictures of one digit (PNG, JPEG, ... any size, dark on light or light on dark), converted the way MNIST
was made (app/digits.py), or the codelab's digits.json (one {"image": 28x28 floats in [0, 1]} per line); that
preprocessing is for models of 28x28 grey digits. For any model: .npy arrays of one image [H, W, C] or a batch
[N, H, W, C] of the model's image shape: uint8 0..255, other integers 0..255 (read as pixels, with a note),
or floats in [0, 1]. Every input is checked before the model sees it (type, NaN, range, shape); a .npy file is
memory-mapped and classified BATCH images at a time, so its size does not bound what fits in memory.
Prints one line per image:  <input>: <class>  (<class>: <probability>  ...top_k...)
Errors are one line each on stderr, naming the input: exit code 1 for an input or model that cannot be used
(the other inputs are still classified), 2 for bad flags (unknown flag, missing --model_dir, no inputs, --top_k
outside 1..10).
"""
import os
import sys

from absl import app, flags

from app import digits
from core import cli
from core.native_logs import quiet_native_logs

FLAGS = flags.FLAGS
flags.DEFINE_string("model_dir", None, "SavedModel directory written by train.py (<run dir>/saved_model, or "
                    "--export_dir), or a TensorFlow Serving model directory of numbered versions (highest used).")
flags.DEFINE_list("inputs", [], "Comma-separated input files, classified before the positional ones: images "
                  "(PNG, JPEG, ...) or digits.json files (.json/.jsonl/.ndjson).")
flags.DEFINE_string("save_preview", None, "Write a PNG of what the model saw: the 28x28 inputs, 4x bigger, "
                    "white on black, each captioned with its predicted class.")
flags.DEFINE_integer("top_k", 3, "How many classes (with probabilities) to print per digit.", lower_bound=1,
                     upper_bound=10)
flags.mark_flag_as_required("model_dir")

PROGRAM = "predict.py"
BATCH = 1000  # images per call of the model
CHECK_CHUNK = 1 << 22  # array elements checked at a time


class UsageError(Exception):
    """Bad command line (exit code 2)."""


class InputError(Exception):
    """A model directory that cannot be used (exit code 1)."""


def error(message):
    cli.error(PROGRAM, message)


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


def run(paths):
    """Classifies every input, BATCH images at a time; returns the exit code (0, or 1 if any input or the model
    failed)."""
    if not paths:
        raise UsageError("no inputs: give image or digits.json files as arguments or with --inputs")
    saved_model_dir = find_saved_model(FLAGS.model_dir)
    inputs, failed = [], False
    for path in paths:
        try:
            inputs += read_input(path)
        except digits.DigitError as e:
            error(e)
            failed = True
        except Exception as e:  # whatever one input does (RecursionError, MemoryError, ...), the others still run
            reason = f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e).strip() else type(e).__name__
            error(f"{path}: cannot use this input ({reason})")
            failed = True
    if not inputs:
        return 1
    try:
        classifier = load_classifier(saved_model_dir)
    except Exception as e:
        error(e)
        return 1
    digit_model = tuple(classifier.image_shape) == (digits.IMAGE_SIZE, digits.IMAGE_SIZE, 1)
    classified, shown, shown_classes = 0, [], []
    for name, x, is_picture in inputs:
        try:
            names, batch = fit_to_model(name, x, is_picture, classifier.image_shape)
            for start in range(0, len(batch), BATCH):
                images = as_model_input(batch[start:start + BATCH])
                probabilities, classes = classify(classifier, images)
                for image_name, predicted, p in zip(names[start:start + BATCH], classes, probabilities):
                    print(describe(image_name, int(predicted), [float(v) for v in p], FLAGS.top_k))
                sys.stdout.flush()
                classified += len(images)
                if FLAGS.save_preview and digit_model:
                    shown += list(images)
                    shown_classes += [int(c) for c in classes]
        except digits.DigitError as e:
            error(e)
            failed = True
        except Exception as e:  # the model failing on one input: the others are still classified
            reason = f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e).strip() else type(e).__name__
            error(f"{name}: cannot classify this input ({reason})")
            failed = True
    if not classified:
        return 1
    if FLAGS.save_preview and not digit_model:
        error(f"--save_preview {FLAGS.save_preview}: previews show 28x28 grey digits; this model takes "
              f"{'x'.join(map(str, classifier.image_shape))} images")
        return 1
    if FLAGS.save_preview:
        try:
            digits.preview(shown, [f"{c}" for c in shown_classes]).save(FLAGS.save_preview, format="PNG")
        except (OSError, ValueError) as e:
            error(f"--save_preview {FLAGS.save_preview}: cannot write ({getattr(e, 'strerror', None) or e})")
            return 1
    return 1 if failed else 0


def main(argv):
    try:
        return run(list(FLAGS.inputs) + argv[1:])
    except UsageError as e:
        error(e)
        return 2
    except (InputError, digits.DigitError) as e:
        error(e)
        return 1
    except Exception as e:
        error(f"{type(e).__name__}: {e}")
        return 1


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser(PROGRAM))
