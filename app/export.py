"""SavedModel export: a small serving module around a trained model, loadable with TensorFlow alone.

Two serving signatures, because a SavedModel signature has one dtype per input; both take the input `image`
(any rank, checked at run time to be the model's image shape [N, H, W, C], or [N, H, W] for grey images: for
MNIST [N, 28, 28] or [N, 28, 28, 1], white ink on black) and return
    probabilities [N, K] float32 = softmax(logits)      (K classes: 10 for MNIST)
    classes       [N]    int64   = argmax(logits)
  serving_default  image float32, pixels in [0, 1]  (anything outside [0, 1], or NaN, is an InvalidArgument
                   error: 0..255 floats would otherwise give confident nonsense)
  serving_uint8    image uint8, pixels 0..255, x = image / 255 correctly rounded, exactly as the data pipeline
  activations      what serving_default takes and returns, plus every layer's output, to look inside the
                   network (serve.py's page): input [N, H, W, C] as the first layer sees it, and
                   activation_1 .. activation_L in layer order (the last is the logits). The asset
                   assets/layers.json names them: {"model", "input_shape", "layers": [{"name", "type",
                   "formula", "shape", "shape_text", "output": "activation_<i>"}]}, as --summary prints them.
  backprop         image and label -> the loss, every layer's output and dL/d(output), dL/dx and the weight
                   gradients, by the hand-written backward passes; with the functions that teach the model one
                   picture: app/backprop_signature.py.

The input is named `image` like the codelab's digits.json key, so TensorFlow Serving's REST body
{"instances": [{"image": <28x28 floats>}, ...]} (or {"instances": [<28x28 floats>, ...]}) works as is.
Classes come from the logits, as the trainer's accuracy does, so the exported model scores exactly the same.
The image shape (H, W, C) is saved with the model as the variable `image_shape` (Classifier.image_shape).
"""
import contextlib
import fcntl
import json
import os
import secrets
import shutil
import tempfile

import numpy as np
import tensorflow as tf

from core import activations
from core.module import shape_str

PIXEL_VALUES = np.arange(256, dtype=np.float32) / np.float32(255.0)
SIGNATURES = ("serving_default", "serving_uint8")
LAYERS_ASSET = "layers.json"
# Marks a directory written by export_saved_model: only such a directory is ever replaced by a new export.
MARKER = ".tf_by_hand_export"
MARKER_TEXT = "A SavedModel written by TF by hand's export; the next export to this directory replaces it.\n"


class ExportError(Exception):
    """The export directory cannot be written, or a directory holds no usable SavedModel (one-line message)."""


def expected_shape(image_shape):
    """'[N, 28, 28] or [N, 28, 28, 1]' for grey images (H, W, 1); '[N, 32, 32, 3]' for (32, 32, 3)."""
    height, width, channels = image_shape
    grey = f"[N, {height}, {width}] or " if channels == 1 else ""
    return f"{grey}[N, {height}, {width}, {channels}]"


def _as_images(image, image_shape):
    """image [N, H, W, C] (or [N, H, W] if C = 1) of any dtype -> [N, H, W, C], with a run-time shape check."""
    height, width, channels = image_shape
    shape = tf.shape(image)
    dims = tf.concat([shape, tf.fill([5], -1)], axis=0)
    same = tf.logical_and(tf.equal(dims[1], height), tf.equal(dims[2], width))
    ok = tf.logical_and(same, tf.logical_or(
        tf.logical_and(tf.equal(tf.rank(image), 3), channels == 1),
        tf.logical_and(tf.equal(tf.rank(image), 4), tf.equal(dims[3], channels))))
    check = tf.debugging.Assert(ok, [f"image must be {expected_shape(image_shape)}; got shape", shape])
    with tf.control_dependencies([check]):
        return tf.reshape(image, [-1, height, width, channels])


def _checked_pixels(x):
    """x float32 with a run-time check that every pixel is in [0, 1] (NaN fails it)."""
    in_range = tf.reduce_all(tf.logical_and(x >= 0.0, x <= 1.0))
    check = tf.debugging.Assert(in_range, [
        "serving_default takes float32 pixels in [0, 1] (send uint8 0..255 to serving_uint8); got min",
        tf.reduce_min(x), "max", tf.reduce_max(x)])
    with tf.control_dependencies([check]):
        return tf.identity(x)


class ServingModule(tf.Module):
    """Holds the trained, built `model` (so its variables are saved), its image shape and the serving functions.

    The serving functions are pure data flow (no Python `if` or `for` on tensors), so they are traced with
    autograph=False: AutoGraph would read the functions' source files again at export, the end of a long run, and
    a file edited since the run started would be converted from the wrong lines.
    """

    def __init__(self, model, layers_file=None, name="serving"):
        super().__init__(name=name)
        self.model = model
        self.shape = tuple(int(n) for n in model.input_shape[1:])
        self.image_shape = tf.Variable(self.shape, trainable=False, dtype=tf.int32, name="image_shape")
        if layers_file is not None:
            self.layers = tf.saved_model.Asset(layers_file)

    def classify(self, x):
        """x [N, H, W, C] float32 in [0, 1] -> {"probabilities": [N, K], "classes": [N]} (inference mode)."""
        logits = self.model(x, training=False)
        return {"probabilities": activations.softmax(logits),
                "classes": tf.argmax(logits, axis=-1, output_type=tf.int64)}

    @tf.function(input_signature=[tf.TensorSpec(shape=None, dtype=tf.float32, name="image")], autograph=False)
    def serve_float(self, image):
        """serving_default: image float32 [N, H, W, C] (or [N, H, W] if C = 1), pixels in [0, 1]."""
        return self.classify(_checked_pixels(_as_images(image, self.shape)))

    @tf.function(input_signature=[tf.TensorSpec(shape=None, dtype=tf.float32, name="image")], autograph=False)
    def serve_activations(self, image):
        """activations: serving_default's outputs plus `input` and every layer's output `activation_<i>`."""
        x = _checked_pixels(_as_images(image, self.shape))
        outputs = self.model.activations(x, training=False)
        logits = outputs[-1][1]
        result = {"probabilities": activations.softmax(logits),
                  "classes": tf.argmax(logits, axis=-1, output_type=tf.int64), "input": x}
        for i, (_, y) in enumerate(outputs, start=1):
            result[f"activation_{i}"] = y
        return result

    @tf.function(input_signature=[tf.TensorSpec(shape=None, dtype=tf.uint8, name="image")], autograph=False)
    def serve_uint8(self, image):
        """serving_uint8: image uint8 [N, H, W, C] (or [N, H, W] if C = 1), pixels 0..255; x = image / 255.

        The division is a lookup in the 256 correctly rounded values v / 255: written as `/ 255.0` inside a
        tf.function, Grappler turns it into `* (1 / 255)`, which is 1 ulp off for 126 of the 256 values, and
        the model would no longer see exactly what the data pipeline (and numpy) computes.
        """
        pixels = tf.cast(_as_images(image, self.shape), tf.int32)
        return self.classify(tf.gather(tf.constant(PIXEL_VALUES), pixels))


def describe_layers(model):
    """The built Sequential `model` -> the contents of layers.json (see the module docstring); shapes
    without the batch axis."""
    layers, shape = [], model.input_shape
    for i, (name, layer) in enumerate(zip(model.layer_names, model.layers), start=1):
        out = layer.output_shape(shape)
        layers.append({"name": name, "type": type(layer).__name__, "formula": layer.formula(shape),
                       "shape": list(out[1:]), "shape_text": shape_str(out), "output": f"activation_{i}"})
        shape = out
    return {"model": model.name, "input_shape": list(model.input_shape[1:]), "layers": layers}


def export_saved_model(model, export_dir):
    """Writes a SavedModel of ServingModule(model) to `export_dir` atomically and returns its absolute path.

    `model(x [N, H, W, C], training=False)` -> logits [N, K], built (its input_shape known). `export_dir` may
    start with ~ and may be a symlink (its target is written, the link kept). The SavedModel is written into a
    staging directory beside it (created with the umask's permissions, like any directory) and renamed into
    place, so a crash never leaves a half-written export; a previous export of this program is replaced (kept
    until the new one is in place). Anything else there (a file, a directory holding files this program did
    not write) is refused with ExportError: see check_target.
    """
    from app import backprop_signature
    if getattr(model, "input_shape", None) is None:
        raise ExportError("cannot export a model that is not built: call model.build(input_shape) first")
    export_dir = check_target(export_dir)
    parent, base = os.path.split(export_dir)
    try:
        os.makedirs(parent, exist_ok=True)
        remove_leftovers(export_dir)
        staging = _new_directory(parent, f".{base}.tmp-")
    except OSError as e:
        raise ExportError(f"cannot export to {export_dir}: {e.strerror or e}") from None
    try:
        with _marked(staging), tempfile.TemporaryDirectory() as assets:
            layers_file = os.path.join(assets, LAYERS_ASSET)
            with open(layers_file, "w", encoding="utf-8") as f:
                json.dump(describe_layers(model), f, indent=1)
            module = ServingModule(model, layers_file)
            model(tf.zeros([1, *module.shape]), training=False)
            # The tf.functions, not concrete functions traced here: the save traces them itself, in its save
            # context, where a distributed variable reads as one plain variable (a trace made outside it
            # cannot be saved under MultiWorkerMirroredStrategy).
            signatures = {"serving_default": module.serve_float, "serving_uint8": module.serve_uint8,
                          "activations": module.serve_activations,
                          **backprop_signature.attach(module, model, assets)}
            tf.saved_model.save(module, staging, signatures=signatures)
            _move_into_place(staging, export_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return export_dir


def check_target(export_dir):
    """The absolute, ~-expanded, symlink-resolved path an export to `export_dir` would write, after checking
    that it may: a missing or empty directory, or one that holds MARKER (a previous export of this program),
    under a writable parent. Otherwise ExportError (one line); nothing is written either way."""
    export_dir = os.path.realpath(os.path.expanduser(os.fspath(export_dir)))
    if os.path.exists(export_dir):
        if not os.path.isdir(export_dir):
            raise ExportError(f"cannot export to {export_dir}: it is a file")
        if os.listdir(export_dir) and not os.path.exists(os.path.join(export_dir, MARKER)):
            raise ExportError(f"cannot export to {export_dir}: the directory holds files this program did not "
                              f"write (no {MARKER}); it is left alone: choose another directory")
    ancestor = os.path.dirname(export_dir)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise ExportError(f"cannot export to {export_dir}: {ancestor} is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ExportError(f"cannot export to {export_dir}: {ancestor} is not writable")
    return export_dir


def remove_leftovers(export_dir):
    """Deletes the staging and set-aside directories (.<name>.tmp-*, .<name>.old-*) that a killed export to
    `export_dir` left beside it: only those holding MARKER and not locked by a live export."""
    parent, base = os.path.split(os.path.realpath(os.path.expanduser(os.fspath(export_dir))))
    if not os.path.isdir(parent):
        return
    for name in os.listdir(parent):
        if not name.startswith((f".{base}.tmp-", f".{base}.old-")):
            continue
        path = os.path.join(parent, name)
        try:
            fd = os.open(os.path.join(path, MARKER), os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a live export is writing it
        else:
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _marked(directory):
    """Writes MARKER into `directory` and holds an exclusive flock on it for the block (remove_leftovers
    skips a locked staging directory)."""
    fd = os.open(os.path.join(directory, MARKER), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, MARKER_TEXT.encode())
        yield
    finally:
        os.close(fd)


def _new_directory(parent, prefix):
    """Creates parent/<prefix><8 hex> with os.mkdir (mode 0777 minus the umask, unlike mkdtemp's 0700)."""
    while True:
        path = os.path.join(parent, f"{prefix}{secrets.token_hex(4)}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue


def _move_into_place(staging, export_dir):
    """rename(staging, export_dir); an existing export is first renamed aside and deleted afterwards."""
    if os.path.isdir(export_dir) and not os.listdir(export_dir):
        os.rmdir(export_dir)
    if not os.path.exists(export_dir):
        os.rename(staging, export_dir)
        return
    parent, base = os.path.split(export_dir)
    old = _new_directory(parent, f".{base}.old-")
    os.rename(export_dir, old)  # onto the empty directory just made: atomic, and the name cannot be taken
    try:
        os.rename(staging, export_dir)
    except BaseException:
        os.rename(old, export_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


class Classifier:
    """A loaded export: `classifier(images)` -> (probabilities [N, K], classes [N]) as numpy arrays.

    images: float32 [N, H, W, C] (or [N, H, W] if C = 1) in [0, 1] (serving_default) or uint8 0..255
    (serving_uint8), (H, W, C) = image_shape.
    """

    def __init__(self, saved_model_dir):
        saved_model_dir = os.fspath(saved_model_dir)
        if not os.path.exists(os.path.join(saved_model_dir, "saved_model.pb")):
            raise ExportError(f"{saved_model_dir}: not a SavedModel directory (no saved_model.pb)")
        try:
            self.loaded = tf.saved_model.load(saved_model_dir)
        except Exception as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ExportError(f"{saved_model_dir}: cannot load the SavedModel ({reason})") from None
        missing = [name for name in SIGNATURES if name not in self.loaded.signatures]
        if missing:
            raise ExportError(f"{saved_model_dir}: not a TF by hand export (no {', '.join(missing)} signature)")
        self.path = saved_model_dir
        recorded = getattr(self.loaded, "image_shape", None)  # exports made before it was recorded are MNIST's
        self.image_shape = (28, 28, 1) if recorded is None else tuple(int(n) for n in recorded.numpy())

    def __call__(self, images):
        images = tf.convert_to_tensor(images)
        if images.dtype == tf.uint8:
            outputs = self.loaded.signatures["serving_uint8"](image=images)
        else:
            outputs = self.loaded.signatures["serving_default"](image=tf.cast(images, tf.float32))
        return outputs["probabilities"].numpy(), outputs["classes"].numpy()
