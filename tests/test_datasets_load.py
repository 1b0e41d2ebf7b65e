"""datasets.load: a data set's train and test examples as core.data.Examples with the image shape and the classes,
from a registered name or from any directory of IDX files; the one-line DataErrors; IDX stays inside datasets/."""
import ast
import os
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import datasets
from core import data

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mnist(mnist_dir):
    return datasets.load("mnist", mnist_dir, download=False)


def test_real_mnist_by_name(mnist, mnist_dir):
    by_name = mnist
    assert isinstance(by_name.train, data.Examples) and isinstance(by_name.test, data.Examples)
    assert (len(by_name.train), len(by_name.test)) == (60000, 10000)
    assert (by_name.image_shape, by_name.num_classes, by_name.directory) == ((28, 28, 1), 10, mnist_dir)
    assert by_name.train.images.shape == (60000, 28, 28, 1) and by_name.train.images.dtype == tf.uint8
    assert by_name.train.labels.numpy()[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert by_name.test.labels.numpy()[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert np.bincount(by_name.test.labels.numpy()).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028,
                                                                 974, 1009]


def test_a_directory_of_idx_files_the_small_fixture(small_mnist, mnist):
    """By its directory alone, or by name and directory: its files are no registered data set's (they are cut),
    so they are read as they are, the image shape and the classes from the files."""
    for small in (datasets.load(small_mnist), datasets.load("mnist", small_mnist, download=False)):
        assert (len(small.train), len(small.test), small.image_shape, small.num_classes) == (512, 128, (28, 28, 1),
                                                                                             10)
        for part, whole in ((small.train, mnist.train), (small.test, mnist.test)):
            np.testing.assert_array_equal(part.images.numpy(), whole.take(len(part)).images.numpy())
            np.testing.assert_array_equal(part.labels.numpy(), whole.take(len(part)).labels.numpy())


def test_unusable_data_is_the_same_one_line_data_error(tmp_path):
    from datasets import idx
    missing = tmp_path / "missing"
    with pytest.raises(datasets.DataError) as error:
        datasets.load(str(missing))
    with pytest.raises(idx.DataError) as same:
        idx.describe(missing)
    assert str(error.value) == str(same.value)
    assert str(error.value).startswith(f"{missing}: data directory not found; to use a local copy, put the four")
    with pytest.raises(datasets.DataError, match=r"^no MNIST files in .*missing \(no such directory\); to use"):
        datasets.load("mnist", missing, download=False)
    with pytest.raises(ValueError, match="unknown data set 'mnsit'; choose one of: mnist, fashion_mnist"):
        datasets.load("mnsit")


def imports(path):
    """Every module name `path` imports, with `from X import y` also as X.y."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("path", sorted((REPO / "app").glob("*.py")) + sorted((REPO / "lab").glob("*.py")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_the_application_does_not_know_the_file_format(path):
    """app/ and lab/ ask datasets.load for examples; IDX files are datasets/' business."""
    assert "datasets.idx" not in imports(path), f"{path.relative_to(REPO)} imports datasets.idx"


def test_the_same_files_load_once_and_a_changed_file_is_read_again(tmp_path):
    """A split loaded again from unchanged files is the tensors already decoded (a notebook loads data in every
    lesson); a file rewritten since is decoded anew; the four newest splits are kept."""
    from datasets import idx
    rng = np.random.default_rng(3)
    images, labels = rng.integers(0, 256, (6, 4, 4), dtype=np.uint8), np.arange(6, dtype=np.uint8) % 3
    for split in ("train", "test"):
        idx.write_idx(tmp_path / idx.FILES[f"{split}_images"], images)
        idx.write_idx(tmp_path / idx.FILES[f"{split}_labels"], labels)
    first = idx.load(tmp_path, "train")
    assert idx.load(tmp_path, "train") is first and idx.load(tmp_path, "train", flat=True) is not first
    assert idx.load(tmp_path, "train", flat=True).images.shape == (6, 16)
    rewritten = idx.write_idx(tmp_path / idx.FILES["train_labels"], labels[::-1].copy())
    status = os.stat(rewritten)  # a later modification time, as a later write has (not within one clock tick)
    os.utime(rewritten, ns=(status.st_atime_ns, status.st_mtime_ns + 10_000_000))
    again = idx.load(tmp_path, "train")
    assert again is not first and again.labels.numpy().tolist() == labels[::-1].tolist()
    for name in ("a", "b", "c", "d"):
        other = tmp_path / name
        other.mkdir()
        for split in ("train", "test"):
            idx.write_idx(other / idx.FILES[f"{split}_images"], images)
            idx.write_idx(other / idx.FILES[f"{split}_labels"], labels)
        idx.load(other, "train")
    assert len(idx._decoded) == idx.DECODED_KEPT and idx.load(tmp_path, "train") is not again
