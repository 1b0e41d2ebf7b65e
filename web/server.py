"""A local HTTP server around an exported SavedModel's `activations` and `backprop` signatures, and its page.

    GET  /                 the page (static/index.html, app.js, style.css: everything served from here)
    GET  /api/model        layers.json {"model", "input_shape", "layers": [{"name", "type", "formula", "shape",
                           ...}]} plus "classes", "backprop" (backprop.json: the loss formula and each layer's
                           backward formula and variables, or null), "teach" ({"optimizer", "learning_rate",
                           "max_steps", "text"} or null) and "notes" (one line for each panel the export lacks)
    POST /api/predict      Content-Type: application/json, with the picture as one of
                             "image": H x W (x C) floats in [0, 1]  already the model's input, used as is
                             "png": base64 PNG or JPEG bytes        a picture: for a 28x28x1 model prepared
                                                                    exactly as predict.py does (app.digits:
                                                                    bounding box into 20x20, centre of mass,
                                                                    white on black); another 1-channel size is
                                                                    prepared so, then resized to the model's;
                                                                    a colour model gets the photo's centre,
                                                                    resized
                           and optionally "session" (8..64 letters, digits, - or _: the page's copy of the model)
                           -> {"class", "probabilities": [K], "input": H x W (grey) or H x W x 3 (colour),
                               "layers": [{"name", "type", "formula", "shape", "shape_text", "values"}], "taught"}
                              values: [H, W, C] nested lists for feature maps, a list for vectors; probabilities
                              unrounded (float32 values), so two answers can be compared bit for bit.
    POST /api/backprop     the picture, "label" (the true class, 0..K-1) and optionally "session"
                           -> predict's answer plus {"label", "loss", "loss_formula", "input_gradient": dL/dx
                              (the shape of "input"),
                              and in each layer "backward_formula", "gradient": dL/dy, "weights": [{"name",
                              "shape", "norm": |dL/dv|, "filters": [kh, kw, F] for a convolution's kernel
                              (summed over its input channels)}]}; gradients to 4 significant digits of the
                              array's largest value
    POST /api/teach        the picture, "label", "steps" (1..MAX_TEACH_STEPS) and "session": `steps` optimizer
                           steps on this picture and label, applied to the session's copy of the model
                           -> {"before", "after": probabilities, "losses": [loss before each step, then after],
                               "class", "taught": steps so far, "changes": [{"layer", "name", "shape", "norm":
                               |dv|, "relative": |dv| / |v|, "largest": max |dv|}]}
    POST /api/reset        {"session"}: drops the session's copy -> {"taught": 0}

Teaching changes only a copy of the variables held in this process for one page (a "session"): at most
MAX_SESSIONS copies, each dropped after SESSION_IDLE_SECONDS without a request (or, when a new page needs room,
the least recently used); the SavedModel on disk never changes. The copy (weights, Adam's moments, its step) is
swapped into the one loaded model when its page asks. The steps use the run's optimizer and learning rate, read
from the config.json that train.py writes beside saved_model/.

Every answer, errors included, is JSON (or a static file) with SECURITY_HEADERS. A bad request gets a 4xx
status and {"error": "<one line>"}: 400 malformed JSON (or nested deeper than the API's 3 levels, or an integer
too long to convert), wrong keys, wrong shape, pixels that are not numbers (strings, booleans) or outside
[0, 1], not an image, a blank picture, a label or step count out of range, a Content-Length that is not one
string of digits, and the standard library's 400s; 404 unknown path; 405 wrong method; 409 backprop or
teaching asked of an export that cannot do it; 411 no Content-Length; 413 body larger than MAX_BODY_BYTES or
picture larger than MAX_PICTURE_PIXELS; 414/431 request line or header too long; 415 not JSON; 421 a Host
header that is not this computer's (below); 501 unknown method; 503 (with Retry-After) when `max_busy`
requests are already being prepared or run; 505 HTTP/2 or later. A request body the route does not read
closes the connection after the answer, so that it is never parsed as the next request.

The standard library's ThreadingHTTPServer is enough for one person's browser on 127.0.0.1; the model runs
one request at a time (a lock), the parsing and the picture preparation in parallel, at most `max_busy`
(MAX_BUSY) of them at once. On a loopback address the server answers only requests whose Host header names
the loopback (localhost, 127.x.y.z or [::1], with the server's port): a web page cannot reach it through a
DNS name that resolves to 127.0.0.1 (DNS rebinding). An address with ':' is IPv6 (`::1`).
"""
import base64
import binascii
import io
import ipaddress
import json
import math
import os
import re
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from app import digits

MAX_BODY_BYTES = 12 * 1024 * 1024
MAX_PICTURE_PIXELS = 40_000_000
MAX_BUSY = 4            # requests preparing a picture or running the model at once; more are answered 503
RETRY_AFTER_SECONDS = 1
DECIMALS = 4
SIGNIFICANT = 4         # gradients: digits kept below each array's largest value
MAX_TEACH_STEPS = 20
MAX_SESSIONS = 4        # copies of the model being taught, one per page
SESSION_IDLE_SECONDS = 15 * 60
OPTIMIZERS = {"adam": "Adam", "sgd": "SGD"}
SESSION = re.compile(r"[A-Za-z0-9_-]{8,64}")
STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
STATIC_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
                               "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
# layers.json: the keys of the description and of each layer the page reads, with their JSON types.
DESCRIPTION_FIELDS = {"model": str, "input_shape": list, "layers": list}
LAYER_FIELDS = {"name": str, "type": str, "formula": str, "shape": list, "shape_text": str, "output": str}
SWAPPED_OUT = object()  # Inspector._owner after the session whose variables the model holds was dropped
POST_ROUTES = {"/api/predict": "predict", "/api/backprop": "backprop", "/api/teach": "teach", "/api/reset": "reset"}
LOOPBACK_HOST = re.compile(r"(localhost|127\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}|\[::1\])(?::([0-9]{1,5}))?")


class ModelError(Exception):
    """A model directory the page cannot use (one-line message)."""


class BadRequest(Exception):
    """A request the API refuses: an HTTP status, a one-line message and any headers of the answer."""

    def __init__(self, status, message, headers=()):
        super().__init__(message)
        self.status = status
        self.headers = dict(headers)


class Inspector:
    """An exported model for the page: its `activations` signature and layers.json, and, when the export has them,
    its `backprop` signature and teach functions with assets/backprop.json. `predict`, `backprop`, `teach` and
    `reset` take a checked request (dict) and return the API's answer; one request runs the model at a time."""

    def __init__(self, saved_model_dir):
        path = os.fspath(saved_model_dir)
        if not os.path.isdir(path):
            raise ModelError(f"{path}: no such directory")
        if not os.path.exists(os.path.join(path, "saved_model.pb")):
            raise ModelError(f"{path}: not a SavedModel (no saved_model.pb); train.py writes one to "
                             f"<run dir>/saved_model")
        from app import backprop_signature, export
        description = os.path.join(path, "assets", export.LAYERS_ASSET)
        if not os.path.exists(description):
            raise ModelError(f"{path}: no layer description (assets/{export.LAYERS_ASSET}); export the model "
                             f"again with this version of train.py")
        self.description = _read_json(description)
        _check_fields(self.description, DESCRIPTION_FIELDS, description, "the description")
        for i, layer in enumerate(self.description["layers"], start=1):
            _check_fields(layer, LAYER_FIELDS, description, f"layer {i}")
        shape = self.description["input_shape"]
        if not (len(shape) == 3 and all(type(n) is int and n > 0 for n in shape) and shape[2] in (1, 3)):
            raise ModelError(f"{path}: the model takes inputs of shape {shape}; the page shows grey [H, W, 1] "
                             f"or colour [H, W, 3] images")
        if not self.description["layers"]:
            raise ModelError(f"{description}: damaged: no layers; export the model again with this version of "
                             f"train.py")
        import tensorflow as tf
        try:
            loaded = tf.saved_model.load(path)
        except Exception as e:
            raise ModelError(f"{path}: cannot load the SavedModel ({_first_line(e)})") from None
        if "activations" not in loaded.signatures:
            raise ModelError(f"{path}: no activations signature; export the model again with this version "
                             f"of train.py")
        outputs = loaded.signatures["activations"].structured_outputs
        for i, layer in enumerate(self.description["layers"], start=1):
            spec = outputs.get(layer["output"])
            if spec is None or spec.shape[1:].as_list() != layer["shape"]:
                found = "no such output" if spec is None else f"shape {spec.shape[1:].as_list()}"
                raise ModelError(f"{description}: layer {i} names output {layer['output']!r} of shape "
                                 f"{layer['shape']}, the activations signature has {found}; export the model "
                                 f"again with this version of train.py")
        self.shape = tuple(shape)
        self.classes = int(self.description["layers"][-1]["shape"][-1])
        self.notes = []
        self.backprop_description = self._backprop_description(loaded, path, backprop_signature.BACKPROP_ASSET)
        self.teaching = self._teaching(loaded, path) if self.backprop_description else None
        self._loaded = loaded
        self._signature = loaded.signatures["activations"]
        self._lock = threading.Lock()
        self._tf = tf
        self._sessions = {}          # session -> {"state": [arrays], "taught": steps, "used": monotonic time}
        self._owner = None           # whose variables the model holds: None = the trained ones, SWAPPED_OUT =
                                     # a dropped session's
        if self.teaching:
            self._variables = list(loaded.teach_state)
            self._original = [v.numpy() for v in self._variables]
            loaded.teach_learning_rate.assign(self.teaching["learning_rate"])
            self._teach = getattr(loaded, f"teach_{self.teaching['optimizer']}")
        self.path = path

    def _backprop_description(self, loaded, path, asset):
        """backprop.json, or None with a note when the export predates the backprop signature."""
        file = os.path.join(path, "assets", asset)
        if "backprop" not in loaded.signatures or not os.path.exists(file):
            self.notes.append("The backprop and teaching panels need a re-export: this SavedModel has no backprop "
                              "signature (train.py of this version writes it).")
            return None
        found = _read_json(file)
        if not (isinstance(found, dict) and isinstance(found.get("layers"), list)
                and len(found["layers"]) == len(self.description["layers"])):
            raise ModelError(f"{file}: damaged: not one entry per layer; export the model again with this version "
                             f"of train.py")
        return found

    def _teaching(self, loaded, path):
        """The run's optimizer and learning rate from config.json beside the SavedModel (train.py's run
        directory), or None with a note."""
        config = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
        try:
            with open(config, encoding="utf-8") as f:
                settings = json.load(f)
            optimizer, rate = settings["optimizer"], settings["learning_rate"]
        except (OSError, ValueError, RecursionError, TypeError, KeyError):
            self.notes.append(f"Teaching needs the run's optimizer settings: {config}, which train.py writes "
                              f"beside saved_model/, is missing or unreadable.")
            return None
        if optimizer not in OPTIMIZERS or type(rate) not in (int, float) or not 0 < rate < math.inf \
                or not hasattr(loaded, f"teach_{optimizer}"):
            self.notes.append(f"Teaching needs the run's optimizer settings: {config} names optimizer "
                              f"{optimizer!r} at learning rate {rate!r}, which the export cannot apply.")
            return None
        decayed = " (its starting rate: the run's decay is not applied)" if settings.get("lr_decay") else ""
        return {"optimizer": optimizer, "learning_rate": float(rate), "max_steps": MAX_TEACH_STEPS,
                "text": f"{OPTIMIZERS[optimizer]} with the run's learning rate {rate:g}{decayed}, on a copy of "
                        f"the weights kept for this page; the SavedModel on disk never changes"}

    @property
    def about(self):
        """GET /api/model's answer."""
        return {**self.description, "classes": self.classes, "backprop": self.backprop_description,
                "teach": self.teaching, "notes": self.notes}

    def predict(self, request):
        """POST /api/predict: the activations signature on the session's copy of the model."""
        x = model_input(request, self.shape, ())
        session = session_of(request)
        with self._lock:
            taught = self._use(session)
            outputs = self._run(self._signature, image=x[None])
        layers = [dict(layer, values=_rounded(outputs[layer["output"]][0])) for layer in self.description["layers"]]
        return {"class": int(outputs["classes"][0]), "probabilities": _exact(outputs["probabilities"][0]),
                "input": _rounded(_picture_shape(x)), "layers": layers, "taught": taught}

    def backprop(self, request):
        """POST /api/backprop: the backprop signature on the session's copy of the model."""
        x = model_input(request, self.shape, ("label",))
        label = label_of(request, self.classes)
        session = session_of(request)
        if self.backprop_description is None:
            raise BadRequest(HTTPStatus.CONFLICT, self.notes[0])
        with self._lock:
            taught = self._use(session)
            outputs = self._run(self._loaded.signatures["backprop"], image=x[None],
                                label=np.array([label], np.int64))
        layers = []
        for layer, backward in zip(self.description["layers"], self.backprop_description["layers"]):
            weights = []
            for variable in backward["variables"]:
                g = outputs[variable["gradient"]]
                weight = {"name": variable["name"], "shape": list(g.shape), "norm": float(np.linalg.norm(g.astype(np.float64)))}
                if g.ndim == 4:
                    weight["filters"] = _significant(g.sum(axis=2))
                weights.append(weight)
            layers.append(dict(layer, values=_rounded(outputs[layer["output"]][0]),
                               backward_formula=backward["backward_formula"],
                               gradient=_significant(outputs[backward["gradient"]][0]), weights=weights))
        return {"class": int(outputs["classes"][0]), "probabilities": _exact(outputs["probabilities"][0]),
                "label": label, "loss": float(outputs["loss"]),
                "loss_formula": self.backprop_description["loss_formula"], "input": _rounded(_picture_shape(x)),
                "input_gradient": _significant(_picture_shape(outputs["input_gradient"][0])), "layers": layers,
                "taught": taught}

    def teach(self, request):
        """POST /api/teach: `steps` optimizer steps on the session's copy; the probabilities before and after."""
        x = model_input(request, self.shape, ("label", "steps"))
        label = label_of(request, self.classes)
        steps = request.get("steps")
        if type(steps) is not int or not 1 <= steps <= MAX_TEACH_STEPS:
            raise BadRequest(HTTPStatus.BAD_REQUEST, f'"steps" must be an integer from 1 to {MAX_TEACH_STEPS}')
        session = session_of(request)
        if session is None:
            raise BadRequest(HTTPStatus.BAD_REQUEST, '"session" is needed to teach: the page\'s copy of the model')
        if self.teaching is None:
            raise BadRequest(HTTPStatus.CONFLICT, self.notes[0])
        images, labels = self._tf.constant(x[None]), self._tf.constant([label], self._tf.int64)
        with self._lock:
            self._use(session, create=True)
            before = self._run(self._signature, image=x[None])["probabilities"][0]
            weights = [v.numpy() for v in self._variables[:self._trainable_count]]
            losses = [float(self._teach(images, labels)) for _ in range(steps)]
            outputs = self._run(self._signature, image=x[None])
            after = [v.numpy() for v in self._variables[:self._trainable_count]]
            entry = self._sessions[session]
            entry["state"] = [v.numpy() for v in self._variables]
            entry["taught"] += steps
            taught = entry["taught"]
        losses.append(max(0.0, float(-np.log(np.maximum(outputs["probabilities"][0][label], np.finfo(np.float32).tiny)))))
        changes = []
        names = [(layer["name"], variable["name"]) for layer in self.backprop_description["layers"]
                 for variable in layer["variables"]]
        for (layer, name), old, new in zip(names, weights, after):
            delta = new - old
            norm = float(np.linalg.norm(delta.astype(np.float64)))
            changes.append({"layer": layer, "name": name, "shape": list(old.shape), "norm": norm,
                            "relative": norm / max(float(np.linalg.norm(old.astype(np.float64))), 1e-12),
                            "largest": float(np.abs(delta).max())})
        return {"before": _exact(before), "after": _exact(outputs["probabilities"][0]), "label": label,
                "class": int(outputs["classes"][0]), "losses": losses, "steps": steps, "taught": taught,
                "changes": changes}

    def reset(self, request):
        """POST /api/reset: drops the session's copy; the next request of its page sees the trained model."""
        if not isinstance(request, dict) or set(request) != {"session"}:
            raise BadRequest(HTTPStatus.BAD_REQUEST, 'expected a JSON object with one key, "session"')
        session = session_of(request)
        with self._lock:
            self._drop(session)
        return {"taught": 0}

    def _drop(self, session):
        """Forgets a session's copy (holding the lock); the model's variables are swapped at the next request."""
        self._sessions.pop(session, None)
        if self._owner == session:
            self._owner = SWAPPED_OUT

    @property
    def _trainable_count(self):
        return sum(len(layer["variables"]) for layer in self.backprop_description["layers"])

    def _use(self, session, create=False):
        """Puts the session's copy of the variables into the model (the trained ones for a page that has taught
        nothing), making the copy if `create`; drops idle copies first. Returns the steps it was taught. Holds
        the lock."""
        now = time.monotonic()
        for other, entry in list(self._sessions.items()):
            if now - entry["used"] > SESSION_IDLE_SECONDS:
                self._drop(other)
        if create and session not in self._sessions:
            while len(self._sessions) >= MAX_SESSIONS:
                self._drop(min(self._sessions, key=lambda k: self._sessions[k]["used"]))
            self._sessions[session] = {"state": self._original, "taught": 0, "used": now}
        entry = self._sessions.get(session)
        if entry is not None:
            entry["used"] = now
        owner = session if entry is not None else None
        if self.teaching and owner != self._owner:
            for variable, value in zip(self._variables, entry["state"] if entry else self._original):
                variable.assign(value)
        self._owner = owner
        return entry["taught"] if entry else 0

    def _run(self, function, **inputs):
        """A signature of the model on numpy inputs -> {name: numpy array}."""
        outputs = function(**{k: self._tf.constant(v) for k, v in inputs.items()})
        return {k: v.numpy() for k, v in outputs.items()}


def _picture_shape(x):
    """[H, W, 1] -> [H, W] (a grey picture, as the API has always answered); [H, W, 3] as it is."""
    return x[..., 0] if x.shape[-1] == 1 else x


def _first_line(error):
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _read_json(file):
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise ModelError(f"{file}: cannot read ({getattr(e, 'strerror', None) or e})") from None


def _check_fields(value, fields, description, what):
    """ModelError unless `value` is a JSON object with each key of `fields` of its type (a damaged layers.json)."""
    if not isinstance(value, dict):
        raise ModelError(f"{description}: damaged: {what} is a JSON {type(value).__name__}, not an object; "
                         f"export the model again with this version of train.py")
    for key, kind in fields.items():
        if not isinstance(value.get(key), kind):
            raise ModelError(f"{description}: damaged: {what} has no {key!r} ({kind.__name__}); export the "
                             f"model again with this version of train.py")


def _rounded(array):
    """numpy array -> nested lists of floats rounded to DECIMALS places (a shorter JSON answer)."""
    return np.round(np.asarray(array, dtype=np.float64), DECIMALS).tolist()


def _significant(array):
    """numpy array -> nested lists of floats rounded to SIGNIFICANT digits of its largest |value| (gradients
    are often far below 1e-4)."""
    array = np.asarray(array, dtype=np.float64)
    top = np.abs(array).max() if array.size else 0.0
    if not top > 0 or not np.isfinite(top):
        return np.nan_to_num(array, nan=0.0, posinf=0.0, neginf=0.0).tolist()
    return np.round(array, SIGNIFICANT - 1 - int(math.floor(math.log10(top)))).tolist()


def _exact(array):
    """float32 values -> a list of floats, each exactly the float32 value (bit-for-bit comparable)."""
    return [float(v) for v in np.asarray(array, dtype=np.float32)]


def parse_json(body, content_type):
    """A request body -> its JSON value; BadRequest for another Content-Type or malformed JSON."""
    if (content_type or "").split(";")[0].strip().lower() != "application/json":
        raise BadRequest(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                         f"Content-Type must be application/json, got {content_type or 'none'!r}")
    try:
        return json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadRequest(HTTPStatus.BAD_REQUEST, "body is not UTF-8 JSON") from None
    except json.JSONDecodeError as e:
        raise BadRequest(HTTPStatus.BAD_REQUEST, f"body is not valid JSON ({e.msg} at position {e.pos})") from None
    except ValueError:
        raise BadRequest(HTTPStatus.BAD_REQUEST, f"body is not valid JSON (an integer of more than "
                                                 f"{sys.get_int_max_str_digits()} digits)") from None
    except RecursionError:
        raise BadRequest(HTTPStatus.BAD_REQUEST, "body is not valid JSON (nested too deeply)") from None


def model_input(request, shape, more):
    """The picture of a request with the keys `more` (and optionally "session") -> the model's input x [H, W, C]
    float32 in [0, 1]; BadRequest otherwise."""
    height, width, channels = shape
    keys = set(request) - {"session", *more} if isinstance(request, dict) else None
    if keys not in ({"image"}, {"png"}) or not all(key in request for key in more):
        wanted = "".join(f' and "{key}"' for key in more)
        size = f"{height}x{width}" if channels == 1 else f"{height}x{width}x{channels}"
        raise BadRequest(HTTPStatus.BAD_REQUEST, f'expected a JSON object with "image" ({size} floats in [0, 1]) '
                                                 f'or "png" (base64 picture){wanted}, and optionally "session"')
    if "image" in request:
        return _checked_image(request["image"], shape)
    return _picture(request["png"], shape)


def label_of(request, classes):
    label = request.get("label")
    if type(label) is not int or not 0 <= label < classes:
        raise BadRequest(HTTPStatus.BAD_REQUEST, f'"label" must be the true class, an integer from 0 to '
                                                 f'{classes - 1}')
    return label


def session_of(request):
    """The request's "session" (the page's copy of the model), or None."""
    session = request.get("session")
    if session is not None and not (type(session) is str and SESSION.fullmatch(session)):
        raise BadRequest(HTTPStatus.BAD_REQUEST, '"session" must be 8 to 64 letters, digits, "-" or "_"')
    return session


def _checked_image(value, shape):
    """{"image": ...}: H x W (grey), H x W x C or H*W*C finite JSON numbers in [0, 1], the model's input as is."""
    height, width, channels = shape
    found, numbers = _array(value)
    accepted = [[height, width, channels], [height * width * channels]] + ([[height, width]] if channels == 1 else [])
    if found not in accepted:
        raise BadRequest(HTTPStatus.BAD_REQUEST, f'"image" has shape {found}, expected {accepted[-1]}')
    try:
        x = np.asarray(numbers, dtype=np.float32)
    except OverflowError:
        x = np.full(1, np.inf, np.float32)
    if not np.isfinite(x).all() or x.min() < 0.0 or x.max() > 1.0:
        raise BadRequest(HTTPStatus.BAD_REQUEST, '"image" values must be finite and in [0, 1] '
                                                 '(divide 0..255 pixels by 255)')
    return x.reshape(shape)


def _array(value, max_rank=3):
    """Nested JSON lists of numbers -> (shape, the numbers flattened), walked one level at a time to at most
    `max_rank` levels; BadRequest for ragged lists, deeper nesting, or an element that is not an int or a float
    (a string, a boolean, null, an object)."""
    shape, items = [], [value]
    while items and all(type(item) is list for item in items):
        if len(shape) == max_rank or len({len(item) for item in items}) > 1:
            raise BadRequest(HTTPStatus.BAD_REQUEST, '"image" is not a rectangular array of numbers')
        shape.append(len(items[0]))
        items = [element for item in items for element in item]
    wrong = [item for item in items if type(item) not in (int, float)][:1] or ([] if shape else [value])
    if wrong:
        found = {list: "a list among numbers", dict: "an object"}.get(type(wrong[0])) or json.dumps(wrong[0])[:20]
        raise BadRequest(HTTPStatus.BAD_REQUEST, f'"image" is not a rectangular array of numbers (found {found})')
    return shape, items


def _picture(value, shape):
    """{"png": base64} (a data: URL prefix is allowed) -> the model's input: a grey model's picture prepared as
    predict.py prepares a file (MNIST's way, 28x28), then resized to the model's size if it differs; a colour
    model's photo cropped to the model's aspect ratio around its centre and resized."""
    if not isinstance(value, str):
        raise BadRequest(HTTPStatus.BAD_REQUEST, '"png" must be a base64 string')
    if value.startswith("data:"):
        value = value.partition(",")[2]
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(HTTPStatus.BAD_REQUEST, '"png" is not valid base64') from None
    height, width, channels = shape
    try:
        if channels == 3:
            return _colour(io.BytesIO(raw), (width, height))
        x = digits.prepare(io.BytesIO(raw), "png", max_pixels=MAX_PICTURE_PIXELS)
    except digits.NotAPicture:
        raise BadRequest(HTTPStatus.BAD_REQUEST, '"png" is not a picture (send PNG or JPEG bytes)') from None
    except digits.PictureTooLarge as e:
        raise BadRequest(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, str(e)) from None
    except digits.DigitError as e:
        raise BadRequest(HTTPStatus.BAD_REQUEST, str(e)) from None
    if (height, width) != x.shape:
        from PIL import Image
        x = np.clip(np.asarray(Image.fromarray(x, "F").resize((width, height), Image.BILINEAR)), 0.0, 1.0)
    return x.reshape(shape).astype(np.float32)


def _colour(source, size):
    """A photo -> [H, W, 3] float32 in [0, 1]: its centre, cropped to the aspect ratio of `size` (W, H) and
    resized with anti-aliasing; transparent pixels on white; refused from the header above MAX_PICTURE_PIXELS."""
    from PIL import Image, ImageOps, UnidentifiedImageError
    try:
        with Image.open(source) as image:
            if image.width * image.height > MAX_PICTURE_PIXELS:
                image.draft("RGB", (image.width // 8 or 1, image.height // 8 or 1))
            if image.width * image.height > MAX_PICTURE_PIXELS:
                raise digits.PictureTooLarge(f"png: picture of {image.width:,} x {image.height:,} pixels is larger "
                                             f"than {MAX_PICTURE_PIXELS / 1_000_000:g} megapixels; scale it down "
                                             f"first")
            image.load()
            ImageOps.exif_transpose(image, in_place=True)
            rgba = image.convert("RGBA")
    except digits.DigitError:
        raise
    except UnidentifiedImageError:
        raise digits.NotAPicture("png: not a picture") from None
    except Exception as e:
        raise digits.DigitError(f"png: cannot read image ({_first_line(e)})") from None
    if min(rgba.size) == 0:
        raise digits.DigitError("png: the picture has no pixels")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, rgba).convert("RGB")
    return np.asarray(ImageOps.fit(rgb, size, Image.BILINEAR), dtype=np.float32) / np.float32(255)


def page_url(address):
    """A bound (host, port, ...) -> the page's URL; for every interface (0.0.0.0, ::), the loopback's."""
    host, port = address[:2]
    if ipaddress.ip_address(host).is_unspecified:
        host = "::1" if ":" in host else "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}/"


def is_loopback_host(host, port):
    """Whether a Host header names this computer's loopback at `port`: localhost, 127.x.y.z or [::1], with the
    port (80 if none is given)."""
    match = LOOPBACK_HOST.fullmatch(host.strip().lower())
    return match is not None and int(match[2] or 80) == port


class Handler(BaseHTTPRequestHandler):
    """The routes of the module docstring; every answer carries its Content-Length (keep-alive)."""

    server_version = "tf-by-hand"
    protocol_version = "HTTP/1.1"
    timeout = 60    # seconds a silent connection may hold its thread

    def handle_one_request(self):
        """One request; an unexpected exception is answered with a one-line 500, then re-raised for
        Server.handle_error (a client that went away is not an error)."""
        self._body_read = False
        try:
            super().handle_one_request()
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception as e:
            self.close_connection = True
            try:
                self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(e).__name__}: {e}")
            except OSError:
                pass
            raise

    def parse_request(self):
        """The standard library's parsing, then, on a loopback server, the Host check (421 otherwise)."""
        if not super().parse_request():
            return False
        if self.server.loopback:
            hosts = self.headers.get_all("Host") or []
            if len(hosts) != 1 or not is_loopback_host(hosts[0], self.server.server_address[1]):
                named = repr(", ".join(hosts)) if hosts else "(none)"
                self._error(HTTPStatus.MISDIRECTED_REQUEST,
                            f"Host {named} is not this server's; open {self.server.url}")
                return False
        return True

    def send_error(self, code, message=None, explain=None):
        """The standard library's refusals (400 bad request line, 414, 431, 501, 505) as JSON with the security
        headers, like every answer; the connection closes (where the next request would start is unknown)."""
        self.log_error("code %d, message %s", code, message)
        self.close_connection = True
        self.request_version = self.protocol_version
        self._error(code, message or HTTPStatus(code).phrase)

    def do_GET(self):
        path = self.path.split("?")[0]
        if path in STATIC_FILES:
            name, content_type = STATIC_FILES[path]
            with open(os.path.join(STATIC_DIR, name), "rb") as f:
                self._send(HTTPStatus.OK, f.read(), content_type)
        elif path == "/api/model":
            self._json(HTTPStatus.OK, self.server.inspector.about)
        elif path == "/favicon.ico":
            self._send(HTTPStatus.NO_CONTENT, b"", "image/x-icon")
        elif path in POST_ROUTES:
            self._error(HTTPStatus.METHOD_NOT_ALLOWED, f"use POST for {path}")
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no such page: {path}")

    do_HEAD = do_GET

    def do_POST(self):
        try:
            route = POST_ROUTES.get(self.path.split("?")[0])
            if route is None:
                raise BadRequest(HTTPStatus.NOT_FOUND, f"no such API: {self.path}")
            body = self._body()
            if not self.server.busy.acquire(blocking=False):
                raise BadRequest(HTTPStatus.SERVICE_UNAVAILABLE,
                                 f"busy with as many requests as it runs at once ({self.server.max_busy}); "
                                 f"try again in a second",
                                 {"Retry-After": str(RETRY_AFTER_SECONDS)})
            try:
                request = parse_json(body, self.headers.get("Content-Type"))
                answer = getattr(self.server.inspector, route)(request)
            finally:
                self.server.busy.release()
            self._json(HTTPStatus.OK, answer)
        except BadRequest as e:
            self._error(e.status, str(e), e.headers)

    def _refuse_method(self):
        self._error(HTTPStatus.METHOD_NOT_ALLOWED, f"method {self.command} not allowed")

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse_method

    def _content_length(self):
        """The request's Content-Length: None if absent, else its one value, all ASCII digits; BadRequest for
        two values or another spelling ("+11", "1_1", " 1 1")."""
        values = self.headers.get_all("Content-Length") or []
        if not values:
            return None
        digits = values[0].strip(" \t")
        if len(values) > 1 or not (digits.isascii() and digits.isdigit()):
            raise BadRequest(HTTPStatus.BAD_REQUEST, f"bad Content-Length {', '.join(values)!r}: send one, "
                                                     f"in digits")
        if len(digits.lstrip("0")) > len(str(MAX_BODY_BYTES)):
            raise BadRequest(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"Content-Length of {len(digits):,} digits is "
                                                                  f"larger than the limit of {MAX_BODY_BYTES:,} bytes")
        return int(digits)

    def _body(self):
        """The request body (at most MAX_BODY_BYTES, announced by Content-Length); a refused body is not read
        and the connection is closed after the answer."""
        size = self._content_length()
        if self.headers.get("Transfer-Encoding") or size is None:
            raise BadRequest(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length")
        if size > MAX_BODY_BYTES:
            raise BadRequest(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                             f"body of {size:,} bytes is larger than the limit of {MAX_BODY_BYTES:,} bytes")
        self._body_read = True
        return self.rfile.read(size)

    def _has_unread_body(self):
        """Whether the request announced a body that no one has read (then the answer closes the connection)."""
        if self._body_read or not hasattr(self, "headers"):
            return False
        try:
            return bool(self.headers.get("Transfer-Encoding") or self._content_length())
        except BadRequest:
            return True

    def _json(self, status, value, headers=()):
        self._send(status, json.dumps(value, allow_nan=False).encode("utf-8"), "application/json", headers)

    def _error(self, status, message, headers=()):
        self._json(status, {"error": " ".join(str(message).split())}, headers)

    def _send(self, status, body, content_type, headers=()):
        if self._has_unread_body():
            self.close_connection = True
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in {**SECURITY_HEADERS, **dict(headers)}.items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format, *args):
        if self.server.verbose:
            super().log_message(format, *args)


class Server(ThreadingHTTPServer):
    """ThreadingHTTPServer holding the Inspector; an unexpected error in a request is answered with a one-line
    500 and printed as one line, never a traceback, and the server keeps serving."""

    daemon_threads = True

    def __init__(self, inspector, host="127.0.0.1", port=0, verbose=False, max_busy=MAX_BUSY):
        self.inspector = inspector
        self.verbose = verbose
        self.max_busy = max_busy
        self.busy = threading.BoundedSemaphore(max_busy)
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), Handler)
        self.loopback = ipaddress.ip_address(self.server_address[0]).is_loopback

    @property
    def url(self):
        return page_url(self.server_address)

    def handle_error(self, request, client_address):
        error = sys.exc_info()[1]
        print(f"serve.py: error: request from {client_address[0]}: {type(error).__name__}: "
              f"{' '.join(str(error).split())}", file=sys.stderr)


def make_server(saved_model_dir, host="127.0.0.1", port=0, verbose=False, max_busy=MAX_BUSY):
    """Loads the model (ModelError if the page cannot use it) and binds the server (OSError if the port is
    taken); serve with `.serve_forever()`, find it at `.url`; `.loopback` says whether only this computer can
    reach it."""
    return Server(Inspector(saved_model_dir), host, port, verbose, max_busy)
