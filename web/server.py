"""A local HTTP server around an exported SavedModel's `activations` signature, and the page that shows it.

    GET  /                 the page (static/index.html, app.js, style.css: everything served from here)
    GET  /api/model        {"model", "input_shape", "layers": [{"name", "type", "formula", "shape", ...}]}
    POST /api/predict      Content-Type: application/json, one of
                             {"image": 28x28 floats in [0, 1]}   already MNIST-style (white on black), used as is
                             {"png": base64 PNG or JPEG bytes}   a picture, prepared exactly as predict.py does
                                                                 (app.digits: bounding box into 20x20, centre
                                                                 of mass, white on black)
                           -> {"class", "probabilities": [10], "input": 28x28,
                               "layers": [{"name", "type", "formula", "shape", "shape_text", "values"}]}
                              values: [H, W, C] nested lists for feature maps, a list for vectors.

Every answer, errors included, is JSON (or a static file) with SECURITY_HEADERS. A bad request gets a 4xx
status and {"error": "<one line>"}: 400 malformed JSON (or nested deeper than the API's 3 levels, or an integer
too long to convert), wrong keys, wrong shape, pixels that are not numbers (strings, booleans) or outside
[0, 1], not an image, a blank picture, a Content-Length that is not one string of digits, and the standard
library's 400s; 404 unknown path; 405 wrong method; 411 no Content-Length; 413 body larger than MAX_BODY_BYTES
or picture larger than MAX_PICTURE_PIXELS; 414/431 request line or header too long; 415 not JSON; 421 a Host
header that is not this computer's (below); 501 unknown method; 503 (with Retry-After) when `max_busy`
predictions are already being prepared or run; 505 HTTP/2 or later. A request body the route does not read
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
import os
import re
import socket
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from app import digits

IMAGE_SHAPE = [28, 28, 1]
MAX_BODY_BYTES = 12 * 1024 * 1024
MAX_PICTURE_PIXELS = 40_000_000
MAX_BUSY = 4            # requests preparing a picture or running the model at once; more are answered 503
RETRY_AFTER_SECONDS = 1
DECIMALS = 4
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
    """An exported model's `activations` signature and its layers.json: `inspect(x [28, 28])` -> the API's
    answer (without "input")."""

    def __init__(self, saved_model_dir):
        path = os.fspath(saved_model_dir)
        if not os.path.isdir(path):
            raise ModelError(f"{path}: no such directory")
        if not os.path.exists(os.path.join(path, "saved_model.pb")):
            raise ModelError(f"{path}: not a SavedModel (no saved_model.pb); train.py writes one to "
                             f"<run dir>/saved_model")
        from app import export
        description = os.path.join(path, "assets", export.LAYERS_ASSET)
        if not os.path.exists(description):
            raise ModelError(f"{path}: no layer description (assets/{export.LAYERS_ASSET}); export the model "
                             f"again with this version of train.py")
        try:
            with open(description, encoding="utf-8") as f:
                self.description = json.load(f)
        except (OSError, ValueError, RecursionError) as e:
            raise ModelError(f"{description}: cannot read ({getattr(e, 'strerror', None) or e})") from None
        _check_fields(self.description, DESCRIPTION_FIELDS, description, "the description")
        for i, layer in enumerate(self.description["layers"], start=1):
            _check_fields(layer, LAYER_FIELDS, description, f"layer {i}")
        shape = self.description["input_shape"]
        if shape != IMAGE_SHAPE:
            raise ModelError(f"{path}: the model takes inputs of shape {shape}; the drawing page needs a "
                             f"model of 28x28x1 images (MNIST)")
        import tensorflow as tf
        try:
            loaded = tf.saved_model.load(path)
        except Exception as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(f"{path}: cannot load the SavedModel ({reason})") from None
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
        self._loaded = loaded
        self._signature = loaded.signatures["activations"]
        self._lock = threading.Lock()
        self._tf = tf
        self.path = path

    def inspect(self, x):
        """x [28, 28] float32 in [0, 1] -> {"class", "probabilities", "layers": [... "values"]}."""
        with self._lock:
            outputs = self._signature(image=self._tf.constant(x[None, :, :, None], self._tf.float32))
            outputs = {k: v.numpy() for k, v in outputs.items()}
        layers = [dict(layer, values=_rounded(outputs[layer["output"]][0])) for layer in self.description["layers"]]
        return {"class": int(outputs["classes"][0]),
                "probabilities": _rounded(outputs["probabilities"][0]),
                "layers": layers}


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


def image_from_request(body, content_type):
    """The body of POST /api/predict -> the model's input x [28, 28] float32 in [0, 1]; BadRequest otherwise."""
    if (content_type or "").split(";")[0].strip().lower() != "application/json":
        raise BadRequest(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                         f"Content-Type must be application/json, got {content_type or 'none'!r}")
    try:
        request = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadRequest(HTTPStatus.BAD_REQUEST, "body is not UTF-8 JSON") from None
    except json.JSONDecodeError as e:
        raise BadRequest(HTTPStatus.BAD_REQUEST, f"body is not valid JSON ({e.msg} at position {e.pos})") from None
    except ValueError:
        raise BadRequest(HTTPStatus.BAD_REQUEST, f"body is not valid JSON (an integer of more than "
                                                 f"{sys.get_int_max_str_digits()} digits)") from None
    except RecursionError:
        raise BadRequest(HTTPStatus.BAD_REQUEST, "body is not valid JSON (nested too deeply)") from None
    keys = sorted(request) if isinstance(request, dict) else None
    if keys not in (["image"], ["png"]):
        raise BadRequest(HTTPStatus.BAD_REQUEST, 'expected a JSON object with one key, "image" (28x28 floats in '
                                                 '[0, 1]) or "png" (base64 picture)')
    if keys == ["image"]:
        return _checked_image(request["image"])
    return _picture(request["png"])


def _checked_image(value):
    """{"image": ...}: 28x28 (or 28x28x1, or 784) finite JSON numbers in [0, 1], used as the model's input."""
    shape, numbers = _array(value)
    if shape not in ([28, 28], [28, 28, 1], [784]):
        raise BadRequest(HTTPStatus.BAD_REQUEST, f'"image" has shape {shape}, expected [28, 28]')
    try:
        x = np.asarray(numbers, dtype=np.float32)
    except OverflowError:
        x = np.full(1, np.inf, np.float32)
    if not np.isfinite(x).all() or x.min() < 0.0 or x.max() > 1.0:
        raise BadRequest(HTTPStatus.BAD_REQUEST, '"image" values must be finite and in [0, 1] '
                                                 '(divide 0..255 pixels by 255)')
    return x.reshape(28, 28)


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


def _picture(value):
    """{"png": base64}: decoded (a data: URL prefix is allowed) and prepared as predict.py prepares a file."""
    if not isinstance(value, str):
        raise BadRequest(HTTPStatus.BAD_REQUEST, '"png" must be a base64 string')
    if value.startswith("data:"):
        value = value.partition(",")[2]
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(HTTPStatus.BAD_REQUEST, '"png" is not valid base64') from None
    try:
        grey = digits.read_grey(io.BytesIO(raw), "png", max_pixels=MAX_PICTURE_PIXELS)
        return digits.to_mnist(grey, "png")
    except digits.NotAPicture:
        raise BadRequest(HTTPStatus.BAD_REQUEST, '"png" is not a picture (send PNG or JPEG bytes)') from None
    except digits.PictureTooLarge as e:
        raise BadRequest(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, str(e)) from None
    except digits.DigitError as e:
        raise BadRequest(HTTPStatus.BAD_REQUEST, str(e)) from None


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
            self._json(HTTPStatus.OK, self.server.inspector.description)
        elif path == "/favicon.ico":
            self._send(HTTPStatus.NO_CONTENT, b"", "image/x-icon")
        elif path == "/api/predict":
            self._error(HTTPStatus.METHOD_NOT_ALLOWED, "use POST for /api/predict")
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no such page: {path}")

    do_HEAD = do_GET

    def do_POST(self):
        try:
            if self.path.split("?")[0] != "/api/predict":
                raise BadRequest(HTTPStatus.NOT_FOUND, f"no such API: {self.path}")
            body = self._body()
            if not self.server.busy.acquire(blocking=False):
                raise BadRequest(HTTPStatus.SERVICE_UNAVAILABLE,
                                 f"busy with as many predictions as it runs at once ({self.server.max_busy}); "
                                 f"try again in a second",
                                 {"Retry-After": str(RETRY_AFTER_SECONDS)})
            try:
                x = image_from_request(body, self.headers.get("Content-Type"))
                answer = self.server.inspector.inspect(x)
            finally:
                self.server.busy.release()
            answer["input"] = _rounded(x)
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
