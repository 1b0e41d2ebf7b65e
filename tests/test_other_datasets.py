"""A data set that is not MNIST, end to end: colour images [32, 32, 3] in 5 classes, written as IDX files by the
test, trained with --model=conv through train.py's run (in this process), exported, and served as
[N, 32, 32, 3] -> [N, 5] probabilities."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from app import export
from datasets import idx

REPO = Path(__file__).resolve().parents[1]
CLASSES = 5
COLOURS = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40], [40, 200, 200]])
# conv on 32x32x3: conv1 3*3*3*12+12, conv2 6*6*12*24+24, conv3 6*6*24*32+32 (32 -> 16 -> 8),
# dense1 8*8*32*200+200, logits 200*5+5
CONV_PARAMS = 336 + 10_392 + 27_680 + 409_800 + 1_005


def colour_set(count, seed):
    """uint8 images [count, 32, 32, 3]: class k is colour COLOURS[k] plus noise; labels uint8 [count] in 0..4."""
    labels = (np.arange(count) % CLASSES).astype(np.uint8)
    noise = np.random.default_rng(seed).integers(0, 56, size=(count, 32, 32, 3))
    return (COLOURS[labels][:, None, None, :] + noise).astype(np.uint8), labels


def run(script, *args, cwd):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def colour_run(tmp_path_factory):
    """(train.py's console lines, run directory, data directory) of a few conv steps on 320 colour images."""
    root = tmp_path_factory.mktemp("colour")
    data_dir = root / "data"
    data_dir.mkdir()
    for split, count, seed in (("train", 320, 1), ("test", 100, 2)):
        images, labels = colour_set(count, seed)
        idx.write_idx(data_dir / (idx.FILES[f"{split}_images"] + ".gz"), images)
        idx.write_idx(data_dir / (idx.FILES[f"{split}_labels"] + ".gz"), labels)
    import train
    lines = []
    train.run(train.make_config({"model": "conv", "data_dir": str(data_dir), "epochs": 1, "steps_per_epoch": 6,
                                 "batch_size": 32, "log_every": 3, "progress": False,
                                 "logdir": str(root / "runs"), "run_name": "colour"}), out=lines.append)
    return lines, root / "runs" / "colour", data_dir


def test_train_py_trains_and_exports_a_colour_model(colour_run):
    lines, run_dir, _ = colour_run
    assert any("320 training images 32x32x3 in 5 classes, 6 steps per epoch" in line for line in lines), lines
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["params"]["total"] == CONV_PARAMS
    assert json.loads((run_dir / "config.json").read_text())["dataset"] == "mnist"  # the files decide the shape
    tags = {value.tag for path in run_dir.glob("events.out.tfevents.*")
            for event in tf.compat.v1.train.summary_iterator(str(path)) for value in event.summary.value}
    assert "predictions" in tags and "font_digits" not in tags  # printed digits are for MNIST's digits only


def test_the_saved_model_serves_colour_images_and_scores_what_training_reported(colour_run):
    _, run_dir, _ = colour_run
    images, labels = colour_set(100, 2)
    loaded = tf.saved_model.load(str(run_dir / "saved_model"))
    served = loaded.signatures["serving_default"](image=tf.constant(images.astype(np.float32) / np.float32(255)))
    probabilities, classes = served["probabilities"].numpy(), served["classes"].numpy()
    assert probabilities.shape == (100, CLASSES) and classes.shape == (100,)
    assert np.abs(probabilities.sum(axis=1) - 1).max() < 1e-5
    np.testing.assert_array_equal(classes, probabilities.argmax(axis=1))
    from_uint8 = loaded.signatures["serving_uint8"](image=tf.constant(images))
    np.testing.assert_array_equal(from_uint8["probabilities"].numpy(), probabilities)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert np.mean(classes == labels) == metrics["test_accuracy"]
    for wrong in (images[..., 0], images[:, :28, :28]):
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"image must be \[N, 32, 32, 3\]; got shape"):
            loaded.signatures["serving_uint8"](image=tf.constant(wrong))
    assert export.Classifier(run_dir / "saved_model").image_shape == (32, 32, 3)


def test_predict_takes_arrays_of_the_models_shape_and_refuses_pictures(colour_run, tmp_path):
    _, run_dir, _ = colour_run
    images, _ = colour_set(3, 2)
    np.save(tmp_path / "three.npy", images)
    np.save(tmp_path / "one.npy", images[0].astype(np.float32) / np.float32(255))
    np.save(tmp_path / "grey.npy", images[..., 0])
    digit = Image.new("L", (40, 40), 0)
    digit.paste(255, (15, 5, 25, 35))
    digit.save(tmp_path / "digit.png")
    result = run("predict.py", "--model_dir", run_dir / "saved_model", "three.npy", "one.npy", "grey.npy",
                 "digit.png", "--top_k=2", cwd=tmp_path)
    assert result.returncode == 1
    lines = [re.fullmatch(r"(\S+): (\d)  \((\d): [\d.]+  (\d): [\d.]+\)", line) for line in result.stdout.splitlines()]
    assert [line[1] for line in lines] == ["three.npy:1", "three.npy:2", "three.npy:3", "one.npy"]
    assert all(line[2] == line[3] for line in lines)
    assert lines[0].group(2, 3, 4) == lines[3].group(2, 3, 4)  # uint8 pixels or pixel / 255: the same image
    assert result.stderr.splitlines() == [
        "predict.py: error: grey.npy: an array of shape [3, 32, 32]; this model takes 32x32x3 images [32, 32, 3] "
        "or a batch [N, 32, 32, 3]",
        "predict.py: error: digit.png: picture preprocessing is for 28x28 grey digits; this model takes 32x32x3 "
        "images: give them as a .npy array [N, 32, 32, 3]"]


def test_an_unknown_data_set_is_one_line(tmp_path):
    result = run("train.py", "--dataset=cifar10", "--model=softmax", cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        "train.py: error: flag --dataset=cifar10: value should be one of <mnist|fashion_mnist>"]
    assert list(tmp_path.iterdir()) == []


def test_the_dataset_flag_offers_every_registered_data_set():
    import datasets
    import train
    assert train.RunConfig.__dataclass_fields__["dataset"].metadata["choices"] == datasets.REGISTRY.keys()
