"""serve.py's API on a real server (127.0.0.1, a free port) with a conv model trained on real MNIST: answers
agree with the SavedModel's serving_default and predict.py's picture preparation; bad requests get their 4xx
and a one-line JSON error, and the server keeps serving. The HTTP handling itself (errors, bodies, Host,
the busy limit, IPv6) is tested in-process on a server around a stub model, in a thread."""
import base64
import contextlib
import http.client
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from app import digits, export
from quick_mnist_model import mnist_test_set
from web import server as web_server

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server(serve_url):
    return serve_url


def request(url, method, path, body=None, headers=None):
    """-> (status, parsed JSON or raw bytes, headers) over a fresh HTTP/1.1 connection."""
    host, port = url.split("//")[1].rstrip("/").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        raw = response.read()
        content_type = response.getheader("Content-Type", "")
        return response.status, json.loads(raw) if content_type == "application/json" else raw, response
    finally:
        connection.close()


def predict(url, payload):
    return request(url, "POST", "/api/predict", json.dumps(payload), {"Content-Type": "application/json"})


def png_base64(pixels):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@pytest.fixture(scope="module")
def test_digits(mnist_dir):
    """The first test image of each class 0..9: (uint8 [10, 28, 28], labels [10])."""
    images, labels = mnist_test_set(mnist_dir)
    first = [int(np.flatnonzero(labels == c)[0]) for c in range(10)]
    return images[first], labels[first]


def test_server_prints_its_url_on_127_0_0_1(server):
    assert server.startswith("http://127.0.0.1:") and server.endswith("/")
    status, page, response = request(server, "GET", "/")
    assert status == 200 and b"<canvas id=\"pad\"" in page
    assert "default-src 'self'" in response.getheader("Content-Security-Policy")
    for path, kind in [("/static/app.js", "text/javascript"), ("/static/style.css", "text/css")]:
        status, body, response = request(server, "GET", path)
        assert status == 200 and response.getheader("Content-Type").startswith(kind) and len(body) > 1000
    assert b"http" not in request(server, "GET", "/static/app.js")[1]


def test_model_description_is_the_summary_of_the_export(server, conv_saved_model):
    status, model, _ = request(server, "GET", "/api/model")
    assert status == 200
    with open(os.path.join(conv_saved_model, "assets", export.LAYERS_ASSET), encoding="utf-8") as f:
        layers = json.load(f)
    assert {key: model[key] for key in layers} == layers and model["classes"] == 10 and model["notes"] == []
    assert [layer["name"] for layer in model["backprop"]["layers"]] == [layer["name"] for layer in layers["layers"]]
    assert model["backprop"]["layers"][4]["backward_formula"] == (
        "dz[N,200] = dy * [y > 0]; dw[1568,200] = xᵀ[1568,N] @ dz[N,200]; db[200] = sum_N dz; "
        "dx[N,1568] = dz @ wᵀ[200,1568]")
    assert model["teach"]["optimizer"] == "adam" and model["teach"]["learning_rate"] == 0.003
    assert [(layer["name"], layer["shape"]) for layer in model["layers"]] == [
        ("conv1", [28, 28, 12]), ("conv2", [14, 14, 24]), ("conv3", [7, 7, 32]), ("flatten", [1568]),
        ("dense1", [200]), ("logits", [10])]
    assert model["layers"][1]["formula"] == "y = relu(conv2d(x[N,28,28,12], w[6,6,12,24], stride 2, same) + b[24])"


def test_mnist_digits_as_floats_get_the_class_of_serving_default(server, conv_saved_model, test_digits):
    images, labels = test_digits
    x = images.astype(np.float32) / 255.0
    serving = tf.saved_model.load(conv_saved_model).signatures["serving_default"](image=tf.constant(x))
    for k in range(len(x)):
        status, answer, _ = predict(server, {"image": x[k].tolist()})
        assert status == 200, answer
        assert answer["class"] == int(serving["classes"][k])
        np.testing.assert_allclose(answer["probabilities"], serving["probabilities"][k].numpy(), atol=1e-4)
        np.testing.assert_allclose(answer["input"], x[k], atol=5e-5)
        shapes = [list(np.shape(layer["values"])) for layer in answer["layers"]]
        assert shapes == [layer["shape"] for layer in answer["layers"]]
        logits = np.array(answer["layers"][-1]["values"])
        np.testing.assert_allclose(np.exp(logits) / np.exp(logits).sum(), answer["probabilities"], atol=2e-3)
    assert sum(predict(server, {"image": x[k].tolist()})[1]["class"] == labels[k] for k in range(10)) >= 9


def test_mnist_digits_as_png_are_prepared_exactly_as_predict_py_does(server, conv_saved_model, test_digits,
                                                                     tmp_path):
    images, labels = test_digits
    serving = tf.saved_model.load(conv_saved_model).signatures["serving_default"]
    agree_with_floats = 0
    for k, pixels in enumerate(images):
        path = tmp_path / f"digit{k}.png"
        Image.fromarray(pixels).save(path)
        ((_, prepared),) = digits.read_inputs(str(path))
        expected = serving(image=tf.constant(prepared[None]))
        status, answer, _ = predict(server, {"png": png_base64(pixels)})
        assert status == 200, answer
        np.testing.assert_allclose(answer["input"], prepared, atol=5e-5)
        assert answer["class"] == int(expected["classes"][0])
        float_class = int(serving(image=tf.constant(pixels[None] / np.float32(255.0)))["classes"][0])
        agree_with_floats += answer["class"] == float_class
    assert agree_with_floats >= 9
    data_url = "data:image/png;base64," + png_base64(images[0])
    assert predict(server, {"png": data_url})[1]["class"] == predict(server, {"png": png_base64(images[0])})[1]["class"]


def huge_picture():
    """{"png": an 8000x6000 PNG} that compresses to a few kilobytes (a decompression bomb in small)."""
    buffer = io.BytesIO()
    Image.new("L", (8000, 6000), 255).save(buffer, format="PNG")
    return json.dumps({"png": base64.b64encode(buffer.getvalue()).decode("ascii")})


GOOD = json.dumps({"image": [[0.0] * 28] * 28})


@pytest.mark.parametrize("body, headers, status, message", [
    ("{\"image\": [[0.0, 0.1]", {}, 400, "not valid JSON"),
    (b"\xff\xfe{}", {}, 400, "not UTF-8 JSON"),
    ("[1, 2, 3]", {}, 400, "expected a JSON object with \"image\""),
    ("{\"picture\": 1}", {}, 400, "expected a JSON object with \"image\""),
    ("{\"image\": [[0.0]], \"png\": \"\"}", {}, 400, "expected a JSON object with \"image\""),
    (json.dumps({"image": [[0.0] * 27] * 28}), {}, 400, "shape [28, 27], expected [28, 28]"),
    (json.dumps({"image": [[0.0] * 28] * 28 + [[0.0]]}), {}, 400, "not a rectangular array"),
    (json.dumps({"image": [[255.0] * 28] * 28}), {}, 400, "in [0, 1]"),
    (json.dumps({"image": [["a"] * 28] * 28}), {}, 400, "not a rectangular array of numbers"),
    (json.dumps({"image": [["0.5"] * 28] * 28}), {}, 400, 'not a rectangular array of numbers (found "0.5")'),
    (json.dumps({"image": [[True] * 28] * 28}), {}, 400, "not a rectangular array of numbers (found true)"),
    (json.dumps({"image": [[0.0] * 28] * 27 + [[0.0] * 27 + [None]]}), {}, 400, "(found null)"),
    (json.dumps({"image": [[[[0.0]]] * 28] * 28}), {}, 400, "not a rectangular array of numbers"),
    (json.dumps({"image": [[{"a": 1}] * 28] * 28}), {}, 400, "not a rectangular array of numbers (found an object)"),
    (json.dumps({"image": [[0.0] * 28] * 27 + [[0.0] * 27 + [10 ** 400]]}), {}, 400, "finite and in [0, 1]"),
    ('{"image": ' + "1" * 5000 + "}", {}, 400, "not valid JSON (an integer of more than 4300 digits)"),
    ('{"image": ' + "[" * 100_000 + "]" * 100_000 + "}", {}, 400, "not valid JSON (nested too deeply)"),
    (json.dumps({"png": "not base64!"}), {}, 400, "not valid base64"),
    (json.dumps({"png": base64.b64encode(b"GIF89a nonsense").decode()}), {}, 400, "not a picture"),
    (json.dumps({"png": 7}), {}, 400, "base64 string"),
    (json.dumps({"png": png_base64(np.zeros((28, 28), np.uint8))}), {}, 400, "blank"),
    (huge_picture, {}, 413, "8,000 x 6,000 pixels is larger than 40 megapixels"),
    (GOOD, {"Content-Type": "text/plain"}, 415, "must be application/json"),
    (GOOD, {"Content-Type": "application/x-www-form-urlencoded"}, 415, "must be application/json"),
    ("{\"image\": 0.5}", {}, 400, "not a rectangular array of numbers (found 0.5)"),
], ids=lambda value: value[:40] if isinstance(value, (str, bytes)) else None)
def test_bad_requests_get_a_4xx_with_one_line_and_the_server_keeps_serving(server, body, headers, status,
                                                                          message):
    headers = {"Content-Type": "application/json", **headers}
    body = body() if callable(body) else body
    got, answer, _ = request(server, "POST", "/api/predict", body, headers)
    assert got == status, answer
    assert list(answer) == ["error"] and message in answer["error"] and "\n" not in answer["error"]
    assert "Traceback" not in answer["error"]
    assert predict(server, json.loads(GOOD))[0] == 200


def post(url, path, payload):
    return request(url, "POST", path, json.dumps(payload), {"Content-Type": "application/json"})


def test_backprop_teach_and_reset_over_http(server, test_digits):
    images, labels = test_digits
    picture = {"png": png_base64(images[4]), "session": "http-test-page"}
    status, trained, _ = post(server, "/api/predict", picture)
    assert status == 200 and trained["class"] == labels[4] == 4 and trained["taught"] == 0
    status, answer, _ = post(server, "/api/backprop", {**picture, "label": 9})
    assert status == 200 and answer["probabilities"] == trained["probabilities"] and answer["label"] == 9
    assert answer["loss"] == pytest.approx(-np.log(trained["probabilities"][9]), rel=1e-4)
    assert np.shape(answer["input_gradient"]) == (28, 28) and np.abs(answer["input_gradient"]).max() > 0
    conv1 = answer["layers"][0]
    assert np.shape(conv1["gradient"]) == (28, 28, 12) and conv1["backward_formula"].startswith("dz[N,28,28,12]")
    assert [(w["name"], np.shape(w.get("filters"))) for w in conv1["weights"]] == [("conv1/b", ()),
                                                                                 ("conv1/w", (3, 3, 12))]
    status, taught, _ = post(server, "/api/teach", {**picture, "label": 4, "steps": 5})
    assert status == 200 and taught["before"] == trained["probabilities"] and taught["taught"] == 5
    assert taught["after"][4] > taught["before"][4] and len(taught["losses"]) == 6
    assert {change["name"] for change in taught["changes"]} >= {"conv1/w", "logits/w"}
    assert post(server, "/api/predict", picture)[1]["probabilities"] == taught["after"]
    assert post(server, "/api/predict", {"png": picture["png"]})[1]["probabilities"] == trained["probabilities"]
    assert post(server, "/api/reset", {"session": picture["session"]})[:2] == (200, {"taught": 0})
    assert post(server, "/api/predict", picture)[1]["probabilities"] == trained["probabilities"]


@pytest.mark.parametrize("path, payload, message", [
    ("/api/backprop", {"image": [[0.0] * 28] * 28}, 'or "png" (base64 picture) and "label", and optionally'),
    ("/api/backprop", {"image": [[0.0] * 28] * 28, "label": -1}, '"label" must be the true class'),
    ("/api/teach", {"image": [[0.0] * 28] * 28, "label": 1, "steps": 100, "session": "page-0001"}, '"steps"'),
    ("/api/teach", {"image": [[0.0] * 28] * 28, "label": 1, "steps": 1}, '"session" is needed to teach'),
    ("/api/reset", {}, 'expected a JSON object with one key, "session"'),
    ("/api/reset", {"session": "../../etc"}, '"session" must be 8 to 64 letters'),
    ("/api/predict", {"image": [[0.0] * 28] * 28, "session": 7}, '"session" must be 8 to 64 letters'),
])
def test_bad_backprop_teach_and_reset_requests_get_400_with_one_line(server, path, payload, message):
    status, answer, _ = post(server, path, payload)
    assert status == 400 and list(answer) == ["error"] and message in answer["error"], answer
    assert "\n" not in answer["error"]


def raw_exchange(url, data):
    """Sends raw bytes on a socket and returns the status line and the JSON error of the answer."""
    host, port = url.split("//")[1].rstrip("/").split(":")
    data = data.replace(b"Host: 127.0.0.1\r\n", f"Host: 127.0.0.1:{port}\r\n".encode())
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(data)
        received = b""
        while b"\r\n\r\n" not in received or not received.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0].decode(), json.loads(body)


def test_huge_bodies_are_refused_before_they_are_read(server):
    start = time.monotonic()
    size = web_server.MAX_BODY_BYTES + 1
    status, answer = raw_exchange(server, b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                          b"Content-Type: application/json\r\n"
                                          b"Content-Length: " + str(size).encode() + b"\r\n\r\n{\"image\": [")
    assert status.startswith("HTTP/1.1 413 ")
    assert answer["error"] == f"body of {size:,} bytes is larger than the limit of 12,582,912 bytes"
    assert time.monotonic() - start < 10
    status, answer = raw_exchange(server, b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                          b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                                          b"2\r\n{}\r\n0\r\n\r\n")
    assert status == "HTTP/1.1 411 Length Required" and "Content-Length" in answer["error"]
    assert predict(server, json.loads(GOOD))[0] == 200


@pytest.mark.parametrize("method, path, status", [
    ("GET", "/api/predict", 405), ("PUT", "/api/predict", 405), ("DELETE", "/", 405), ("GET", "/api/teach", 405),
    ("GET", "/api/backprop", 405), ("GET", "/api/reset", 405), ("POST", "/api/teaching", 404),
    ("GET", "/static/../server.py", 404), ("GET", "/../../etc/passwd", 404), ("POST", "/api/model", 404),
])
def test_wrong_paths_and_methods(server, method, path, status):
    got, answer, _ = request(server, method, path, GOOD if method == "POST" else None,
                             {"Content-Type": "application/json"})
    assert got == status and list(answer) == ["error"]


def run_serve(*args, timeout=120):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, str(REPO / "serve.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def with_description(conv_saved_model, directory, change):
    """A copy of the export in `directory` whose layers.json is change(description) (a JSON value)."""
    shutil.copytree(conv_saved_model, directory)
    description_file = directory / "assets" / export.LAYERS_ASSET
    description_file.write_text(json.dumps(change(json.loads(description_file.read_text()))))
    return directory


def without(mapping, key):
    return {k: v for k, v in mapping.items() if k != key}


def test_models_the_page_cannot_use_are_refused_in_one_line(conv_saved_model, tmp_path):
    other = with_description(conv_saved_model, tmp_path / "two", lambda d: dict(d, input_shape=[28, 28, 2]))
    older = tmp_path / "older"
    shutil.copytree(conv_saved_model, older)
    (older / "assets" / export.LAYERS_ASSET).unlink()
    damaged = [
        (lambda d: d["layers"], "damaged: the description is a JSON list, not an object"),
        (lambda d: without(d, "layers"), "damaged: the description has no 'layers' (list)"),
        (lambda d: dict(d, layers=[d["layers"][0], without(d["layers"][1], "formula")]),
         "damaged: layer 2 has no 'formula' (str)"),
        (lambda d: dict(d, layers=[d["layers"][0], "conv2"]), "damaged: layer 2 is a JSON str, not an object"),
        (lambda d: dict(d, layers=[dict(d["layers"][0], output="activation_9")]),
         "layer 1 names output 'activation_9' of shape [28, 28, 12], the activations signature has no such output"),
        (lambda d: dict(d, layers=[dict(d["layers"][0], shape=[28, 28, 13])]),
         "layer 1 names output 'activation_1' of shape [28, 28, 13], the activations signature has shape "
         "[28, 28, 12]"),
    ]
    for k, (change, message) in enumerate(damaged):
        path = with_description(conv_saved_model, tmp_path / f"damaged{k}", change)
        with pytest.raises(web_server.ModelError, match=re.escape(message)):
            web_server.Inspector(path)
    for path, message in [(older, "no layer description (assets/layers.json); export the model again"),
                          (tmp_path, "not a SavedModel (no saved_model.pb)"),
                          (tmp_path / "missing", "no such directory")]:
        with pytest.raises(web_server.ModelError, match=re.escape(message)):
            web_server.Inspector(path)
    cases = [
        ([f"--model_dir={other}"], 1, "takes inputs of shape [28, 28, 2]; the page shows grey [H, W, 1] or "
                                      "colour [H, W, 3] images"),
        ([f"--model_dir={conv_saved_model}", "--host="], 2, "--host=: no address; give 127.0.0.1"),
        ([f"--model_dir={conv_saved_model}", "--host=  "], 2, "--host= : no address; give 127.0.0.1"),
        ([], 2, "--model_dir"),
        ([f"--model_dir={conv_saved_model}", "--port=70000"], 2, "port"),
        ([f"--model_dir={conv_saved_model}", "extra.png"], 2, "unexpected arguments"),
    ]
    for args, code, message in cases:
        result = run_serve(*args)
        assert result.returncode == code, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("serve.py: error: ") and message in lines[0], lines
        assert result.stdout == ""


def test_a_port_in_use_is_one_line(conv_saved_model):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = run_serve(f"--model_dir={conv_saved_model}", f"--port={taken.getsockname()[1]}")
    assert result.returncode == 1
    assert result.stderr.strip().startswith("serve.py: error: cannot listen on 127.0.0.1:")
    assert len(result.stderr.strip().splitlines()) == 1


class StubInspector:
    """A stand-in for the model: answers class 3, and with `hold` set waits (at most 20 s) until it is
    released, to keep a prediction in progress."""

    about = {"model": "stub", "input_shape": [28, 28, 1], "layers": []}

    def __init__(self, hold=False):
        self.started, self.released = threading.Event(), threading.Event()
        if not hold:
            self.released.set()

    def predict(self, request):
        self.started.set()
        assert self.released.wait(20)
        return {"class": 3, "probabilities": [0.1] * 10, "layers": []}


@contextlib.contextmanager
def stub_server(inspector=None, host="127.0.0.1", **options):
    """web.server.Server around a StubInspector, serving from a thread: yields the server."""
    server = web_server.Server(inspector or StubInspector(), host, 0, **options)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def exchange(server, data, seconds=5):
    """Sends raw bytes on one connection and reads until the server closes it (or `seconds` of silence):
    -> [(status line, {header: value}, JSON body)] for each answer received, and whether the server closed."""
    host, port = server.server_address[:2]
    received, closed = b"", False
    with socket.create_connection((host, port), timeout=seconds) as s:
        s.sendall(data)
        with contextlib.suppress(TimeoutError):
            while chunk := s.recv(65536):
                received += chunk
            closed = True
    answers = []
    while received:
        head, _, received = received.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:])
        size = int(headers["Content-Length"])
        answers.append((lines[0], headers, json.loads(received[:size])))
        received = received[size:]
    return answers, closed


def test_predictions_beyond_max_busy_get_503_with_retry_after():
    inspector = StubInspector(hold=True)
    with stub_server(inspector, max_busy=1) as server:
        first = {}
        thread = threading.Thread(target=lambda: first.update(answer=predict(server.url, json.loads(GOOD))))
        thread.start()
        assert inspector.started.wait(20)
        status, answer, response = predict(server.url, json.loads(GOOD))
        assert status == 503 and response.getheader("Retry-After") == "1"
        assert answer == {"error": "busy with as many requests as it runs at once (1); try again in a second"}
        assert response.getheader("X-Content-Type-Options") == "nosniff"
        inspector.released.set()
        thread.join(20)
        assert first["answer"][0] == 200 and first["answer"][1]["class"] == 3
        assert predict(server.url, json.loads(GOOD))[0] == 200


def host_line(server):
    return f"Host: 127.0.0.1:{server.server_address[1]}\r\n".encode()


@pytest.mark.parametrize("method, path, status", [
    ("POST", "/nowhere", 404), ("PUT", "/api/predict", 405), ("OPTIONS", "/", 405), ("DELETE", "/", 405),
    ("GET", "/api/model", 200),
])
def test_a_body_no_route_reads_is_never_parsed_as_the_next_request(method, path, status):
    with stub_server() as server:
        smuggled = b"GET /api/predict HTTP/1.1\r\n" + host_line(server) + b"\r\n"
        answers, closed = exchange(server, f"{method} {path} HTTP/1.1\r\n".encode() + host_line(server)
                                   + f"Content-Length: {len(smuggled)}\r\n\r\n".encode() + smuggled)
        assert [status_line.split()[1] for status_line, _, _ in answers] == [str(status)] and closed
        assert answers[0][1]["Connection"] == "close"
        answers, closed = exchange(server, b"GET /api/model HTTP/1.1\r\n" + host_line(server)
                                   + b"Content-Length: 0\r\n\r\nGET /nowhere HTTP/1.1\r\n" + host_line(server)
                                   + b"Connection: close\r\n\r\n")
        assert [status_line.split()[1] for status_line, _, _ in answers] == ["200", "404"] and closed


@pytest.mark.parametrize("request_bytes, status, message", [
    (b"GARBAGE\r\n\r\n", 400, "Bad request syntax ('GARBAGE')"),
    (b"GET / HTTP/1.x\r\n\r\n", 400, "Bad request version ('HTTP/1.x')"),
    (b"GET /" + b"a" * 65532, 414, "Request-URI Too Long"),
    (b"GET / HTTP/1.1\r\nX: " + b"a" * 65534, 431, "Line too long"),
    (b"BREW / HTTP/1.1\r\nHOST\r\n\r\n", 501, "Unsupported method ('BREW')"),
    (b"GET / HTTP/2.0\r\n\r\n", 505, "Invalid HTTP version (2.0)"),
], ids=["bad request line", "bad version", "URI too long", "header too long", "unknown method", "HTTP/2"])
def test_the_standard_librarys_refusals_are_json_with_the_security_headers(request_bytes, status, message):
    with stub_server() as server:
        answers, closed = exchange(server, request_bytes.replace(b"HOST\r\n", host_line(server)))
    ((status_line, headers, answer),) = answers
    assert status_line.startswith(f"HTTP/1.1 {status} ") and closed
    assert headers["Content-Type"] == "application/json" and answer == {"error": message}
    assert all(headers[name] == value for name, value in web_server.SECURITY_HEADERS.items())


@pytest.mark.parametrize("lengths", [["+{n}"], ["{n}", "{n}"], ["{n}", "{m}"], ["{n}_"], ["1_{n}"], [" {n} 0"],
                                     ["0x10"], ["9" * 5000]], ids=lambda lengths: ",".join(lengths)[:20])
def test_only_one_content_length_of_digits_is_accepted(lengths):
    body = GOOD.encode()
    with stub_server() as server:
        fields = b"".join(f"Content-Length: {value.format(n=len(body), m=len(body) - 1)}\r\n".encode()
                          for value in lengths)
        answers, closed = exchange(server, b"POST /api/predict HTTP/1.1\r\n" + host_line(server)
                                   + b"Content-Type: application/json\r\n" + fields + b"\r\n" + body)
    ((status_line, headers, answer),) = answers
    expected = "413" if len(lengths[0]) == 5000 else "400"
    assert status_line.split()[1] == expected and closed, answer
    assert "Content-Length" in answer["error"] or "limit of 12,582,912 bytes" in answer["error"]


def test_a_loopback_server_answers_only_loopback_host_names():
    with stub_server() as server:
        port = server.server_address[1]
        for host, status in [(f"127.0.0.1:{port}", 200), (f"localhost:{port}", 200), (f"LOCALHOST:{port}", 200),
                             (f"127.1.2.3:{port}", 200), (f"[::1]:{port}", 200),
                             (f"rebinding.example:{port}", 421), (f"localhost.example.com:{port}", 421),
                             ("localhost", 421), ("localhost:1", 421), (f"127.0.0.1:{port}0", 421),
                             (f"10.0.0.1:{port}", 421), ("", 421)]:
            answers, _ = exchange(server, f"GET /api/model HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
                                  .encode())
            ((status_line, headers, answer),) = answers
            assert status_line.split()[1] == str(status), (host, answer)
            if status == 421:
                assert answer["error"] == f"Host {host!r} is not this server's; open http://127.0.0.1:{port}/"
                assert headers["Content-Security-Policy"] == web_server.SECURITY_HEADERS["Content-Security-Policy"]
        for request_bytes in [b"GET /api/model HTTP/1.1\r\nConnection: close\r\n\r\n",
                              b"GET /api/model HTTP/1.1\r\n" + host_line(server) + host_line(server)
                              + b"Connection: close\r\n\r\n"]:
            ((status_line, _, _),), _ = exchange(server, request_bytes)
            assert status_line.split()[1] == "421"


def test_ipv6_loopback():
    with stub_server(host="::1") as server:
        assert server.url == f"http://[::1]:{server.server_address[1]}/" and server.loopback
        connection = http.client.HTTPConnection("::1", server.server_address[1], timeout=10)
        try:
            connection.request("GET", "/api/model")
            response = connection.getresponse()
            assert response.status == 200 and json.loads(response.read())["model"] == "stub"
        finally:
            connection.close()


def test_the_url_printed_for_every_interface_is_the_loopbacks():
    assert web_server.page_url(("0.0.0.0", 8000)) == "http://127.0.0.1:8000/"
    assert web_server.page_url(("::", 8000, 0, 0)) == "http://[::1]:8000/"
    assert web_server.page_url(("192.168.1.5", 8000)) == "http://192.168.1.5:8000/"
    assert web_server.page_url(("fe80::1", 80, 0, 0)) == "http://[fe80::1]:80/"
