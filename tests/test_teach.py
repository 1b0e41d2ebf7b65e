"""The export's backprop signature and serve.py's teaching, in-process: the hand-written backward passes give the
tape's gradients on real test digits; teaching with the true label raises its probability; reset restores the
trained model bit for bit; copies are bounded; the page works for models of other input shapes, and an export
made before the backprop signature still serves the forward page."""
import hashlib
import io
import base64
import json
import os
import re

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from app import backprop_signature, digits, export
from core import data, layers, losses, optimizers
from core.trainer import Runner, Trainer
from models import REGISTRY
from quick_mnist_model import mnist_test_set
from web import server as web_server


@pytest.fixture(scope="module")
def digits20(mnist_dir):
    """The first 20 test images (float32 [20, 28, 28, 1] in [0, 1]) and their labels."""
    images, labels = mnist_test_set(mnist_dir)
    return images[:20, :, :, None].astype(np.float32) / np.float32(255), labels[:20].astype(np.int64)


@pytest.fixture(scope="module")
def inspector(conv_saved_model):
    return web_server.Inspector(conv_saved_model)


def python_model(loaded):
    """conftest's conv network rebuilt in Python with the export's weights (teach_state lists them in layer order)."""
    model = REGISTRY["conv"].build(0.0)
    model.build((None, 28, 28, 1))
    trainable = [v for _, _, named in backprop_signature.trainable_by_layer(model) for _, v in named]
    for variable, saved in zip(trainable, loaded.teach_state):
        variable.assign(saved)
    return model, trainable


def relative_error(ours, tape):
    return float(np.abs(np.asarray(ours) - np.asarray(tape)).max() / np.abs(tape).max())


def test_the_backprop_signature_equals_the_tape_on_20_test_digits(conv_saved_model, digits20):
    x, labels = digits20
    loaded = tf.saved_model.load(conv_saved_model)
    model, trainable = python_model(loaded)
    description = json.load(open(os.path.join(conv_saved_model, "assets", backprop_signature.BACKPROP_ASSET)))
    for wrong in (0, 3):   # the true labels, then wrong ones (larger gradients)
        y = (labels + wrong) % 10
        ours = loaded.signatures["backprop"](image=tf.constant(x), label=tf.constant(y))
        images = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(images)
            outputs = [output for _, output in model.activations(images, training=False)]
            loss = losses.softmax_cross_entropy(outputs[-1], y)
        expected = tape.gradient(loss, [images, *outputs, *trainable])
        assert abs(float(ours["loss"]) - float(loss)) <= 1e-6 * max(1.0, float(loss))
        errors = {"input": relative_error(ours["input_gradient"], expected[0])}
        for i, layer in enumerate(description["layers"]):
            np.testing.assert_allclose(ours[f"activation_{i + 1}"], outputs[i], rtol=1e-5, atol=1e-5)
            errors[layer["name"]] = relative_error(ours[layer["gradient"]], expected[1 + i])
        for j, variable in enumerate(v for layer in description["layers"] for v in layer["variables"]):
            errors[variable["name"]] = relative_error(ours[variable["gradient"]], expected[1 + len(outputs) + j])
        assert max(errors.values()) < 1e-5, errors


def test_teaching_with_the_true_label_raises_its_probability_and_reset_restores_the_trained_model(
        inspector, conv_saved_model, digits20):
    x, labels = digits20
    on_disk = _digest(conv_saved_model)
    raised = 0
    for k in range(20):
        request = {"image": x[k].tolist(), "session": f"digit-{k:04d}"}
        trained = inspector.predict(request)["probabilities"]
        taught = inspector.teach({**request, "label": int(labels[k]), "steps": 1})
        assert taught["before"] == trained and taught["taught"] == 1
        raised += taught["after"][labels[k]] > taught["before"][labels[k]]
        assert inspector.predict(request)["probabilities"] == taught["after"]
        assert inspector.reset({"session": request["session"]}) == {"taught": 0}
        again = inspector.predict(request)
        assert again["probabilities"] == trained and again["taught"] == 0
    assert raised >= 18
    assert _digest(conv_saved_model) == on_disk


def _digest(directory):
    """sha256 of every file's path and bytes under `directory`."""
    digest = hashlib.sha256()
    for root, _, files in sorted(os.walk(directory)):
        for name in sorted(files):
            digest.update(name.encode())
            with open(os.path.join(root, name), "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


def test_copies_are_one_per_page_bounded_and_dropped_when_idle(inspector, digits20, monkeypatch):
    x, labels = digits20
    image = x[0].tolist()
    trained = inspector.predict({"image": image})["probabilities"]
    pages = [f"page-{k:04d}" for k in range(web_server.MAX_SESSIONS + 1)]
    for page in pages:
        assert inspector.teach({"image": image, "session": page, "label": 3, "steps": 2})["taught"] == 2
    oldest = inspector.predict({"image": image, "session": pages[0]})
    assert oldest["taught"] == 0 and oldest["probabilities"] == trained   # made room for the newest page
    newest = inspector.predict({"image": image, "session": pages[-1]})
    assert newest["taught"] == 2 and newest["probabilities"][3] > trained[3]
    assert inspector.predict({"image": image})["probabilities"] == trained
    monkeypatch.setattr(web_server, "SESSION_IDLE_SECONDS", -1.0)
    gone = inspector.predict({"image": image, "session": pages[-1]})
    assert gone["taught"] == 0 and gone["probabilities"] == trained


@pytest.mark.parametrize("request_, message", [
    ({"label": 10, "steps": 1}, '"label" must be the true class, an integer from 0 to 9'),
    ({"label": True, "steps": 1}, '"label" must be the true class'),
    ({"label": 1, "steps": 0}, '"steps" must be an integer from 1 to 20'),
    ({"label": 1, "steps": 21}, '"steps" must be an integer from 1 to 20'),
    ({"label": 1, "steps": 2.0}, '"steps" must be an integer from 1 to 20'),
    ({"label": 1}, 'or "png" (base64 picture) and "label" and "steps", and optionally "session"'),
    ({"label": 1, "steps": 1, "session": "x"}, '"session" must be 8 to 64 letters'),
    ({"label": 1, "steps": 1, "session": None}, '"session" is needed to teach'),
])
def test_bad_teaching_requests_are_one_line(inspector, request_, message):
    request_ = {"image": [[0.0] * 28] * 28, "session": "page-bad0", **request_}
    if request_["session"] is None:
        del request_["session"]
    with pytest.raises(web_server.BadRequest, match=re.escape(message)) as caught:
        inspector.teach(request_)
    assert caught.value.status == 400 and "\n" not in str(caught.value)


def colour_set(count, seed):
    """uint8 images [count, 32, 32, 3] in 5 classes, class k a colour plus noise (as tests/test_other_datasets.py)."""
    colours = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40], [40, 200, 200]])
    labels = np.arange(count) % 5
    noise = np.random.default_rng(seed).integers(0, 56, size=(count, 32, 32, 3))
    return (colours[labels][:, None, None, :] + noise).astype(np.uint8), labels


def run_directory(model, path, optimizer="adam", learning_rate=0.003):
    """A run directory as train.py leaves it, for serve.py: config.json and saved_model/."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"optimizer": optimizer, "learning_rate": learning_rate}))
    return export.export_saved_model(model, path / "saved_model")


def png_base64(pixels):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def test_a_colour_model_takes_a_photo_and_learns_from_it(tmp_path):
    tf.random.set_seed(1)
    model = REGISTRY["conv"].build(0.0, num_classes=5)
    images, labels = colour_set(96, 1)
    batches = tf.data.Dataset.from_tensor_slices((images.astype(np.float32) / 255, labels.astype(np.int32))).batch(32)
    Trainer(Runner(model, optimizers.Adam(0.003)), progress=False).fit(batches, epochs=1)
    inspector = web_server.Inspector(run_directory(model, tmp_path / "colour"))
    assert inspector.about["input_shape"] == [32, 32, 3] and inspector.about["classes"] == 5
    photo = np.zeros((96, 64, 3), np.uint8)     # 96 high: its centre 64x64 is red | blue, the yellow bands go
    photo[:, :, :] = [230, 230, 0]
    photo[16:80, :32], photo[16:80, 32:] = [255, 0, 0], [0, 0, 255]
    request = {"png": png_base64(photo), "session": "colour-page"}
    answer = inspector.backprop({**request, "label": 2})
    assert np.shape(answer["input"]) == (32, 32, 3) and np.shape(answer["input_gradient"]) == (32, 32, 3)
    assert len(answer["probabilities"]) == 5 and [np.shape(layer["gradient"]) for layer in answer["layers"]] == [
        tuple(layer["shape"]) for layer in inspector.description["layers"]]
    seen = np.array(answer["input"])
    np.testing.assert_allclose(seen[1:-1, :15], np.broadcast_to([1.0, 0.0, 0.0], (30, 15, 3)), atol=1e-4)
    np.testing.assert_allclose(seen[1:-1, 17:], np.broadcast_to([0.0, 0.0, 1.0], (30, 15, 3)), atol=1e-4)
    taught = inspector.teach({**request, "label": 2, "steps": 3})
    assert taught["after"][2] > taught["before"][2]


def test_a_grey_model_of_another_size_is_drawn_on_and_downsampled(tmp_path, digits20):
    model = layers.Sequential([layers.Flatten(), layers.Dense(10)], name="small")
    model.build((None, 16, 16, 1))
    inspector = web_server.Inspector(run_directory(model, tmp_path / "small", "sgd", 0.1))
    drawing = (255 - np.kron((digits20[0][0, :, :, 0] * 255).astype(np.uint8), np.ones((10, 10), np.uint8)))
    answer = inspector.backprop({"png": png_base64(drawing), "label": 7})
    mnist = digits.to_mnist(255 - drawing)
    expected = np.asarray(Image.fromarray(mnist, "F").resize((16, 16), Image.BILINEAR))
    np.testing.assert_allclose(answer["input"], expected, atol=1e-4)
    assert "SGD with the run's learning rate 0.1" in inspector.about["teach"]["text"]
    taught = inspector.teach({"png": png_base64(drawing), "label": 7, "steps": 1, "session": "small-page"})
    assert taught["after"][7] > taught["before"][7]


def test_an_export_without_the_backprop_signature_still_serves_the_forward_page(tmp_path, monkeypatch):
    model = layers.Sequential([layers.Flatten(), layers.Dense(10)], name="older")
    model.build((None, 28, 28, 1))
    monkeypatch.setattr(backprop_signature, "attach", lambda module, model, assets: {})
    inspector = web_server.Inspector(run_directory(model, tmp_path / "older"))
    assert inspector.about["backprop"] is None and inspector.about["teach"] is None
    assert inspector.about["notes"] == ["The backprop and teaching panels need a re-export: this SavedModel has no "
                                        "backprop signature (train.py of this version writes it)."]
    assert len(inspector.predict({"image": [[0.5] * 28] * 28})["probabilities"]) == 10
    for route, extra in [(inspector.backprop, {"label": 1}), (inspector.teach, {"label": 1, "steps": 1})]:
        with pytest.raises(web_server.BadRequest, match="need a re-export") as caught:
            route({"image": [[0.5] * 28] * 28, "session": "older-page", **extra})
        assert caught.value.status == 409
