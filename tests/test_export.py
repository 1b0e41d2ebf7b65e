"""SavedModel export: a fresh Python process with TensorFlow and numpy only loads it and scores exactly what
the trainer reported; signatures, REST-style JSON, input checks, atomic writes."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from app import export
from quick_mnist_model import mnist_test_set, train_quick_model

REPO = Path(__file__).resolve().parents[1]

FRESH_PROCESS = r"""
import gzip, json, sys
import numpy as np
import tensorflow as tf

def read_idx(path):
    raw = gzip.open(path).read()
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)

export_dir, mnist_dir, repo = sys.argv[1:4]
images = read_idx(mnist_dir + "/t10k-images-idx3-ubyte.gz")          # uint8 [10000, 28, 28]
labels = read_idx(mnist_dir + "/t10k-labels-idx1-ubyte.gz")
loaded = tf.saved_model.load(export_dir)
serve, serve_uint8 = loaded.signatures["serving_default"], loaded.signatures["serving_uint8"]

def run(signature, x):
    outputs = [signature(image=tf.constant(x[i:i + 1000])) for i in range(0, len(x), 1000)]
    return (np.concatenate([o["probabilities"].numpy() for o in outputs]),
            np.concatenate([o["classes"].numpy() for o in outputs]))

x = images.astype(np.float32) / np.float32(255.0)
probabilities, classes = run(serve, x)
variants = [run(serve, x[..., None]), run(serve_uint8, images), run(serve_uint8, images[..., None])]
specs = {}
for name, fn in loaded.signatures.items():
    specs[name] = {"inputs": [[spec.name, spec.dtype.name, spec.shape.rank]
                              for spec in fn.structured_input_signature[1].values()],
                   "outputs": {k: [v.dtype.name, v.shape.as_list()] for k, v in fn.structured_outputs.items()}}
print(json.dumps({
    "correct": int((classes == labels).sum()),
    "accuracy": float(np.mean(classes == labels)),
    "variants_identical": [bool(np.array_equal(p, probabilities) and np.array_equal(c, classes)) for p, c in variants],
    "probabilities_sum_to_1": float(np.abs(probabilities.sum(axis=1) - 1).max()),
    "shapes": [list(probabilities.shape), list(classes.shape)],
    "specs": specs,
    # modules loaded from the repository's own code (not from a virtual environment that may live inside it)
    "project_modules": sorted(m for m, mod in sys.modules.items()
                              if (getattr(mod, "__file__", None) or "").startswith(repo)
                              and not (getattr(mod, "__file__", None) or "").startswith(sys.prefix)),
}))
"""


@pytest.fixture(scope="module")
def trained(mnist_dir):
    """(model, accuracy the trainer reported on the 10,000 test images)."""
    return train_quick_model(mnist_dir)


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    model, _ = trained
    return export.export_saved_model(model, tmp_path_factory.mktemp("export") / "model")


def test_fresh_process_scores_exactly_what_the_trainer_reported(trained, exported, mnist_dir, tmp_path):
    model, reported = trained
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    result = subprocess.run([sys.executable, "-c", FRESH_PROCESS, exported, mnist_dir, str(REPO)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    served = json.loads(result.stdout.strip().splitlines()[-1])

    assert served["project_modules"] == []
    assert served["accuracy"] == reported
    assert served["correct"] == round(reported * 10000)
    assert reported > 0.9
    assert served["variants_identical"] == [True, True, True]
    assert served["shapes"] == [[10000, 10], [10000]]
    assert served["probabilities_sum_to_1"] < 1e-5
    outputs = {"probabilities": ["float32", [None, 10]], "classes": ["int64", [None]]}
    assert served["specs"]["serving_default"] == {"inputs": [["image", "float32", None]], "outputs": outputs}
    assert served["specs"]["serving_uint8"] == {"inputs": [["image", "uint8", None]], "outputs": outputs}
    assert sorted(served["specs"]) == ["activations", "backprop", "serving_default", "serving_uint8"]

    images, _ = mnist_test_set(mnist_dir)
    in_process = np.argmax(model(images[:1000, ..., None].astype(np.float32) / 255.0, training=False), axis=1)
    loaded_classes = export.Classifier(exported)(images[:1000])[1]
    np.testing.assert_array_equal(loaded_classes, in_process)


def test_tensorflow_serving_rest_bodies(exported, mnist_dir):
    """The request bodies of notes/export.md, batched the way TensorFlow Serving's row format does it
    (instances stacked along a new first axis, the dtype taken from the signature)."""
    images, labels = mnist_test_set(mnist_dir)
    loaded = tf.saved_model.load(exported)

    def predict(body):
        request = json.loads(json.dumps(body))
        signature = loaded.signatures[request.get("signature_name", "serving_default")]
        (spec,) = signature.structured_input_signature[1].values()
        rows = [i["image"] if isinstance(i, dict) else i for i in request["instances"]]
        outputs = signature(image=tf.constant(np.array(rows), dtype=spec.dtype))
        return [{"probabilities": p.tolist(), "classes": int(c)}
                for p, c in zip(outputs["probabilities"].numpy(), outputs["classes"].numpy())]

    floats = (images[:3] / 255.0).round(4)
    named = predict({"instances": [{"image": x.tolist()} for x in floats]})
    plain = predict({"instances": [x.tolist() for x in floats]})
    channel = predict({"instances": [x[..., None].tolist() for x in floats]})
    uint8 = predict({"signature_name": "serving_uint8", "instances": [{"image": x.tolist()} for x in images[:3]]})
    assert named == plain == channel
    assert [p["classes"] for p in named] == [p["classes"] for p in uint8]
    assert sum(p["classes"] == y for p, y in zip(uint8, labels[:3])) >= 2
    assert all(len(p["probabilities"]) == 10 for p in named)


@pytest.mark.parametrize("signature, image, message", [
    ("serving_default", np.full((2, 28, 28), 255.0, np.float32), "pixels in [0, 1]"),
    ("serving_default", np.full((2, 28, 28), np.nan, np.float32), "pixels in [0, 1]"),
    ("serving_default", np.zeros((2, 28, 27), np.float32), "[N, 28, 28] or [N, 28, 28, 1]"),
    ("serving_default", np.zeros((28, 28), np.float32), "[N, 28, 28] or [N, 28, 28, 1]"),
    ("serving_uint8", np.zeros((2, 28, 28, 3), np.uint8), "[N, 28, 28] or [N, 28, 28, 1]"),
    ("serving_uint8", np.zeros((784,), np.uint8), "[N, 28, 28] or [N, 28, 28, 1]"),
])
def test_bad_inputs_are_refused_with_a_clear_message(exported, signature, image, message):
    fn = tf.saved_model.load(exported).signatures[signature]
    with pytest.raises(tf.errors.InvalidArgumentError, match=message.replace("[", r"\[").replace("]", r"\]")):
        fn(image=tf.constant(image))


def test_export_replaces_atomically_and_refuses_foreign_directories(trained, tmp_path, monkeypatch):
    model, _ = trained
    target = tmp_path / "export"
    first = export.export_saved_model(model, target)
    assert first == str(target) and (target / "saved_model.pb").exists()
    marker = target / "assets" / "old-marker"
    marker.write_text("first export")
    export.export_saved_model(model, target)
    assert not marker.exists() and (target / "saved_model.pb").exists()
    assert sorted(os.listdir(tmp_path)) == ["export"]

    def crash(*args, **kwargs):
        os.makedirs(os.path.join(args[1], "variables"))
        Path(args[1], "saved_model.pb").write_bytes(b"half written")
        raise RuntimeError("disk full")

    marker.write_text("second export")
    monkeypatch.setattr(tf.saved_model, "save", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        export.export_saved_model(model, target)
    assert marker.read_text() == "second export"
    assert sorted(os.listdir(tmp_path)) == ["export"]
    monkeypatch.undo()

    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep me")
    with pytest.raises(export.ExportError, match=r"the directory holds files this program did not write \(no "
                                                 r"\.tf_by_hand_export\); it is left alone"):
        export.export_saved_model(model, foreign)
    assert os.listdir(foreign) == ["mine.txt"]
    with pytest.raises(export.ExportError, match="not a SavedModel directory"):
        export.Classifier(foreign)


def test_only_a_directory_this_program_wrote_is_replaced(trained, tmp_path):
    """A user's directory holding a saved_model.pb and their own files is refused, not wiped; a file too."""
    model, _ = trained
    users = tmp_path / "users_model"
    users.mkdir()
    (users / "saved_model.pb").write_bytes(b"their own SavedModel")
    (users / "README.txt").write_text("my notes")
    with pytest.raises(export.ExportError, match=r"users_model: the directory holds files this program did not "
                                                 r"write"):
        export.export_saved_model(model, users)
    assert sorted(os.listdir(users)) == ["README.txt", "saved_model.pb"]
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(export.ExportError, match=r"cannot export to .*a_file: it is a file$"):
        export.check_target(tmp_path / "a_file")
    with pytest.raises(export.ExportError, match=r"a_file/sub/model: .*a_file is a file$"):
        export.check_target(tmp_path / "a_file" / "sub" / "model")
    assert sorted(os.listdir(tmp_path)) == ["a_file", "users_model"]


def test_a_symlink_is_followed_home_expanded_and_the_umask_respected(trained, tmp_path, monkeypatch):
    model, _ = trained
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real" / "model", tmp_path / "link")  # dangling until the first export
    old_umask = os.umask(0o002)
    try:
        assert export.export_saved_model(model, "~/link") == str(tmp_path / "real" / "model")
        export.export_saved_model(model, "~/link")  # the second time it replaces the target, not the link
    finally:
        os.umask(old_umask)
    assert os.path.islink(tmp_path / "link") and os.readlink(tmp_path / "link") == str(tmp_path / "real" / "model")
    assert (tmp_path / "real" / "model" / export.MARKER).exists()
    assert sorted(os.listdir(tmp_path / "real")) == ["model"]
    assert (tmp_path / "real" / "model").stat().st_mode & 0o777 == 0o775  # 0777 minus the umask (mkdtemp: 0700)
    unreadable = [str(p) for p in (tmp_path / "real" / "model").rglob("*") if not p.stat().st_mode & 0o004]
    assert not unreadable  # a serving process running as another user can read every file
    export.Classifier(tmp_path / "link")


def test_leftovers_of_a_killed_export_are_removed_unless_a_live_export_holds_them(tmp_path):
    target = tmp_path / "model"
    dead, live, foreign = (tmp_path / f".model.tmp-{n}" for n in ("dead", "live", "user"))
    for directory in (dead, live):
        directory.mkdir()
        (directory / export.MARKER).write_text(export.MARKER_TEXT)
        (directory / "saved_model.pb").write_bytes(b"half")
    foreign.mkdir()  # no marker: not ours
    with export._marked(live):
        export.remove_leftovers(target)
    assert not dead.exists() and live.exists() and foreign.exists()


def test_activations_signature_returns_every_layer_as_the_model_computes_it(trained, exported, mnist_dir):
    model, _ = trained
    images, _ = mnist_test_set(mnist_dir)
    x = images[:5].astype(np.float32) / 255.0
    loaded = tf.saved_model.load(exported)
    inside = loaded.signatures["activations"](image=tf.constant(x))
    served = loaded.signatures["serving_default"](image=tf.constant(x))
    np.testing.assert_array_equal(inside["probabilities"].numpy(), served["probabilities"].numpy())
    np.testing.assert_array_equal(inside["classes"].numpy(), served["classes"].numpy())
    np.testing.assert_array_equal(inside["input"].numpy(), x[..., None])

    with open(os.path.join(exported, "assets", export.LAYERS_ASSET), encoding="utf-8") as f:
        described = json.load(f)
    expected = model.activations(x[..., None], training=False)
    assert described["input_shape"] == [28, 28, 1]
    assert [layer["name"] for layer in described["layers"]] == [name for name, _ in expected]
    summary = model.summary(print_fn=lambda line: None)
    for layer, (_, y) in zip(described["layers"], expected):
        assert list(y.shape[1:]) == layer["shape"]
        assert f"{layer['shape_text']}  " in summary and layer["formula"] in summary
        np.testing.assert_allclose(inside[layer["output"]].numpy(), y.numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"pixels in \[0, 1\]"):
        loaded.signatures["activations"](image=tf.constant(x * 255.0))


EDITED_DURING_THE_RUN = r"""
import sys
repo, export_dir = sys.argv[1:3]
sys.path.insert(0, repo)
import numpy as np
import tensorflow as tf
from app import export
from core import layers

model = layers.Sequential([layers.Conv2D(4, 3), layers.BatchNorm(), layers.Activation("relu"), layers.Flatten(),
                           layers.Dropout(0.5), layers.Dense(10)])
x = tf.random.stateless_uniform([3, 28, 28, 1], seed=[1, 2])
expected = tf.nn.softmax(model(x, training=False)).numpy()
for name in ("core/module.py", "core/layers.py", "app/export.py"):
    with open(f"{repo}/{name}", encoding="utf-8") as f:
        text = f.read()
    with open(f"{repo}/{name}", "w", encoding="utf-8") as f:
        f.write('\"\"\"Edited while the run trained.\"\"\"\nimport os\n\n' + text)
loaded = tf.saved_model.load(export.export_saved_model(model, export_dir))
print(np.abs(loaded.signatures["serving_default"](image=x)["probabilities"].numpy() - expected).max())
"""


def test_export_at_the_end_of_a_run_ignores_source_files_edited_during_it(tmp_path):
    """A run imports the code at its start and exports at its end; a user editing the project in between (the next
    experiment) must not change what is exported. AutoGraph would read the edited files at the export's trace."""
    for package in ("core", "app"):
        shutil.copytree(REPO / package, tmp_path / "repo" / package, ignore=shutil.ignore_patterns("__pycache__"))
    result = subprocess.run([sys.executable, "-c", EDITED_DURING_THE_RUN, str(tmp_path / "repo"),
                             str(tmp_path / "model")], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout.split()[-1]) < 1e-6
