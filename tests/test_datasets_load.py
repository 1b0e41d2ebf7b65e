"""datasets.load: a data set's train and test examples as core.data.Examples with the image shape and the classes,
from a registered name or from any directory of IDX files; the one-line DataErrors; IDX stays inside datasets/."""
import ast
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
