"""datasets.idx and core.data: validation errors, decoding, the training/evaluation pipelines, on real and tiny
IDX files (grey 28x28 and colour 32x32x3)."""
import gzip
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import datasets
from core import data
from datasets import idx
from datasets.idx import DataError

TRAIN_FIRST_LABELS = [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
TEST_FIRST_LABELS = [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
AS_MNIST = {"image_shape": datasets.MNIST.image_shape, "num_classes": datasets.MNIST.num_classes}  # checked


# ---------------------------------------------------------------- tiny synthetic IDX data sets

def tiny_images(count):
    """uint8 [count, 28, 28] whose pixels (0,0) and (0,1) spell the example's index."""
    rng = np.random.default_rng(count)
    images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
    images[:, 0, 0] = np.arange(count) % 256
    images[:, 0, 1] = np.arange(count) // 256
    return images


def tiny_labels(count):
    return (np.arange(count) % 10).astype(np.uint8)


def write_tiny(directory, train=300, test=100, gz=True, overrides=None):
    """Writes the four files (gzipped or plain) of a tiny IDX data set; returns the directory."""
    directory.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    arrays = {"train_images": tiny_images(train), "train_labels": tiny_labels(train),
              "test_images": tiny_images(test), "test_labels": tiny_labels(test)}
    arrays.update(overrides or {})
    for key, array in arrays.items():
        idx.write_idx(directory / (idx.FILES[key] + suffix), array)
    return directory


def indices(images):
    """The example indices spelled by pixels (0,0) and (0,1) of a batch of images [n,28,28,1]."""
    pixels = np.rint(np.asarray(images)[:, 0, :2, 0] * 255).astype(np.int64)
    return pixels[:, 0] + 256 * pixels[:, 1]


def epoch_indices(dataset, batch_size, seed, epoch):
    batches = data.training_batches(dataset, batch_size, seed=seed, epoch=epoch)
    return np.concatenate([indices(images) for images, _ in batches])


@pytest.fixture
def tiny_dir(tmp_path):
    return write_tiny(tmp_path / "tiny")


# ---------------------------------------------------------------- constants and locations

def test_files_and_md5_tables_cover_the_four_files():
    assert set(idx.FILES) == set(datasets.MNIST.files) == {"train_images", "train_labels", "test_images", "test_labels"}
    assert idx.FILES["test_images"] == "t10k-images-idx3-ubyte"
    assert all(len(file.md5) == 32 for file in datasets.MNIST.files.values())


def test_registry_entries():
    """mnist downloads what it always did; fashion_mnist is the same format from Zalando's files."""
    mnist, fashion = datasets.get("mnist"), datasets.get("fashion_mnist")
    assert list(datasets.REGISTRY) == ["mnist", "fashion_mnist"]
    assert (mnist.image_shape, mnist.num_classes, mnist.digits) == ((28, 28, 1), 10, True)
    assert (fashion.image_shape, fashion.num_classes, fashion.digits) == ((28, 28, 1), 10, False)
    assert {key: (file.url, file.md5) for key, file in mnist.files.items()} == {
        "train_images": ("https://storage.googleapis.com/cvdf-datasets/mnist/train-images-idx3-ubyte.gz",
                         "6bbc9ace898e44ae57da46a324031adb"),
        "train_labels": ("https://storage.googleapis.com/cvdf-datasets/mnist/train-labels-idx1-ubyte.gz",
                         "a25bea736e30d166cdddb491f175f624"),
        "test_images": ("https://storage.googleapis.com/cvdf-datasets/mnist/t10k-images-idx3-ubyte.gz",
                        "2646ac647ad5339dbf082846283269ea"),
        "test_labels": ("https://storage.googleapis.com/cvdf-datasets/mnist/t10k-labels-idx1-ubyte.gz",
                        "27ae3e4e09519cfbb04c329615203637"),
    }
    assert set(fashion.files) == set(idx.FILES)
    for key, file in fashion.files.items():
        assert file.url == f"http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/{idx.FILES[key]}.gz"
        assert len(file.md5) == 32 and int(file.md5, 16) >= 0
    assert len({file.md5 for dataset in datasets.REGISTRY.values() for file in dataset.files.values()}) == 8
    with pytest.raises(ValueError, match="unknown data set 'cifar'; choose one of: mnist, fashion_mnist"):
        datasets.get("cifar")


def test_default_data_dir_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("TF_BY_HAND_DATA_DIR", raising=False)
    assert datasets.default_data_dir().endswith("/.cache/tf-by-hand/mnist")
    assert datasets.default_data_dir("fashion_mnist").endswith("/.cache/tf-by-hand/fashion_mnist")
    monkeypatch.setenv("TF_BY_HAND_DATA_DIR", str(tmp_path))
    assert datasets.default_data_dir() == str(tmp_path)


# ---------------------------------------------------------------- the real MNIST

@pytest.fixture(scope="module")
def mnist_train(mnist_dir):
    return idx.load(mnist_dir, "train")


@pytest.fixture(scope="module")
def mnist_test(mnist_dir):
    return idx.load(mnist_dir, "test")


def test_validate_real_mnist(mnist_dir):
    assert idx.validate(mnist_dir) == {"train": 60000, "test": 10000}
    assert datasets.prepare(mnist_dir, download=False) == mnist_dir


def test_real_shapes_dtypes_ranges_and_known_labels(mnist_train, mnist_test):
    assert mnist_train.images.dtype == tf.uint8 and mnist_train.labels.dtype == tf.int32
    assert mnist_train.images.shape == (60000, 28, 28, 1) and len(mnist_train) == 60000 and len(mnist_test) == 10000
    train_labels = []
    for images, labels in data.evaluation_batches(mnist_train, batch_size=10000):
        assert images.dtype == tf.float32 and labels.dtype == tf.int32
        assert float(tf.reduce_min(images)) == 0.0 and float(tf.reduce_max(images)) == 1.0
        train_labels.append(labels.numpy())
    train_labels = np.concatenate(train_labels)
    assert train_labels[:10].tolist() == TRAIN_FIRST_LABELS
    assert np.bincount(train_labels, minlength=10).tolist() == TRAIN_COUNTS

    batches = list(data.evaluation_batches(mnist_test))
    assert [int(labels.shape[0]) for _, labels in batches] == [1000] * 10
    test_labels = np.concatenate([labels.numpy() for _, labels in batches])
    assert test_labels[:10].tolist() == TEST_FIRST_LABELS
    assert np.bincount(test_labels, minlength=10).tolist() == TEST_COUNTS
    # The first test image is a 7: ink in the middle rows, blank corners, ~20% of pixels lit.
    first = batches[0][0][0].numpy()
    assert first[0, 0, 0] == 0.0 and first[27, 27, 0] == 0.0 and 0.1 < np.mean(first > 0) < 0.3


def test_flat_option(mnist_dir):
    images, labels = next(iter(data.evaluation_batches(idx.load(mnist_dir, "test", flat=True), 5)))
    assert images.shape == (5, 784) and labels.numpy().tolist() == TEST_FIRST_LABELS[:5]


def test_real_training_batches_are_a_shuffled_epoch_of_the_decoded_images(mnist_dir, mnist_train):
    """Every training image equals, bit for bit, the file's pixels / 255 decoded in numpy, with its label."""
    with gzip.open(f"{mnist_dir}/{idx.FILES['train_images']}.gz", "rb") as stream:
        pixels = np.frombuffer(stream.read(), np.uint8, offset=16).reshape(60000, 28, 28, 1)
    with gzip.open(f"{mnist_dir}/{idx.FILES['train_labels']}.gz", "rb") as stream:
        file_labels = np.frombuffer(stream.read(), np.uint8, offset=8)
    decoded = pixels.astype(np.float32) / np.float32(255)  # IEEE division, correctly rounded
    labels_of = {}
    for image, label in zip(decoded, file_labels):
        labels_of.setdefault(hashlib.sha1(image.tobytes()).digest(), set()).add(int(label))

    batches = data.training_batches(mnist_train, 128, seed=1, epoch=0)
    assert int(batches.cardinality()) == 60000 // 128
    assert batches.element_spec[0].shape.as_list() == [128, 28, 28, 1]  # static: one trace
    labels = []
    for images, batch_labels in batches:
        assert images.dtype == tf.float32 and batch_labels.dtype == tf.int32
        for image, label in zip(images.numpy(), batch_labels.numpy()):
            assert label in labels_of[hashlib.sha1(image.tobytes()).digest()]
        labels.append(batch_labels.numpy())
    labels = np.concatenate(labels)
    assert len(labels) == 468 * 128
    assert labels[:10].tolist() != TRAIN_FIRST_LABELS
    assert np.abs(np.bincount(labels, minlength=10) - TRAIN_COUNTS).max() <= 96  # 96 dropped


def test_gzipped_and_plain_copies_give_identical_batches(mnist_dir, mnist_train, mnist_test, tmp_path):
    for name in idx.FILES.values():
        with gzip.open(f"{mnist_dir}/{name}.gz", "rb") as source, open(tmp_path / name, "wb") as target:
            shutil.copyfileobj(source, target, 1 << 20)
    assert idx.validate(tmp_path) == {"train": 60000, "test": 10000}
    assert set(idx.find_files(tmp_path).values()) == {str(tmp_path / name) for name in idx.FILES.values()}

    plain_test = data.evaluation_batches(idx.load(tmp_path, "test"))
    for (gz_images, gz_labels), (images, labels) in zip(data.evaluation_batches(mnist_test), plain_test):
        np.testing.assert_array_equal(gz_images.numpy(), images.numpy())
        np.testing.assert_array_equal(gz_labels.numpy(), labels.numpy())

    plain_train = idx.load(tmp_path, "train")
    gz_batches = data.training_batches(mnist_train, 500, seed=7, epoch=2).take(5)
    plain_batches = data.training_batches(plain_train, 500, seed=7, epoch=2).take(5)
    for (gz_images, gz_labels), (images, labels) in zip(gz_batches, plain_batches):
        np.testing.assert_array_equal(gz_images.numpy(), images.numpy())
        np.testing.assert_array_equal(gz_labels.numpy(), labels.numpy())


# ---------------------------------------------------------------- pipeline behaviour (tiny data)

def test_tiny_data_round_trip(tiny_dir):
    assert idx.validate(tiny_dir) == {"train": 300, "test": 100}
    train = idx.load(tiny_dir, "train")
    expected = tiny_images(300)[..., None].astype(np.float32) / np.float32(255)
    assert len(np.unique(tiny_images(300))) == 256  # every pixel value occurs
    images, labels = next(iter(data.evaluation_batches(train, 300)))
    np.testing.assert_array_equal(images.numpy(), expected)
    np.testing.assert_array_equal(labels.numpy(), tiny_labels(300))
    images, labels = next(iter(train.dataset().batch(300)))  # the per-example view
    np.testing.assert_array_equal(images.numpy(), expected)


def test_training_pixels_are_exactly_pixel_over_255(tiny_dir):
    """Bit for bit, as numpy's float32 division gives them: a `* (1/255)` would be 1 ulp off for 126 values."""
    expected = tiny_images(300)[..., None].astype(np.float32) / np.float32(255)
    for images, labels in data.training_batches(idx.load(tiny_dir, "train"), 50, seed=0, epoch=0):
        np.testing.assert_array_equal(images.numpy(), expected[indices(images)])
        np.testing.assert_array_equal(labels.numpy(), tiny_labels(300)[indices(images)])


def test_flat_training_batches(tiny_dir):
    images, _ = next(iter(data.training_batches(idx.load(tiny_dir, "train", flat=True), 20, seed=0, epoch=0)))
    assert images.shape == (20, 784)


def test_same_seed_and_epoch_same_order_other_epoch_or_seed_other_order(tiny_dir):
    train = idx.load(tiny_dir, "train")
    first = epoch_indices(train, 32, seed=3, epoch=0)
    assert len(first) == 9 * 32 and len(set(first)) == len(first)  # a permutation, minus the remainder
    np.testing.assert_array_equal(first, epoch_indices(train, 32, seed=3, epoch=0))
    # A new load() of the same files (a resumed run) and a skip of k batches see the same batches.
    resumed = data.training_batches(idx.load(tiny_dir, "train"), 32, seed=3, epoch=0)
    np.testing.assert_array_equal(np.concatenate([indices(x) for x, _ in resumed.skip(4)]), first[4 * 32:])
    # Iterating the same epoch's dataset twice gives the same order too.
    once = data.training_batches(train, 32, seed=3, epoch=1)
    np.testing.assert_array_equal(np.concatenate([indices(x) for x, _ in once]),
                                  np.concatenate([indices(x) for x, _ in once]))
    assert not np.array_equal(first, epoch_indices(train, 32, seed=3, epoch=1))
    assert not np.array_equal(first, epoch_indices(train, 32, seed=4, epoch=0))


def test_every_example_once_per_epoch_and_the_dropped_remainder_changes(tiny_dir):
    train = idx.load(tiny_dir, "train")
    dropped = []
    for epoch in range(4):
        seen = epoch_indices(train, 64, seed=2, epoch=epoch)
        assert len(seen) == 4 * 64 and len(set(seen)) == len(seen) and set(seen) <= set(range(300))
        dropped.append(frozenset(range(300)) - set(seen))
    assert len(set(dropped)) == 4  # a different 44 examples sit out each epoch


def test_order_does_not_depend_on_the_global_seed(tiny_dir):
    train = idx.load(tiny_dir, "train")
    tf.random.set_seed(1)
    first = epoch_indices(train, 32, seed=3, epoch=5)
    tf.random.set_seed(2)
    tf.random.uniform([7])  # and whatever global random state was used since
    np.testing.assert_array_equal(first, epoch_indices(train, 32, seed=3, epoch=5))


def test_any_finite_dataset_of_examples_can_be_shuffled(tiny_dir):
    """A per-example Dataset (here the view of a take() of loaded examples) is read into memory, floats as
    they are."""
    part = idx.load(tiny_dir, "train").take(100).dataset()
    images, labels = next(iter(part.batch(100)))
    seen = np.concatenate([indices(x) for x, _ in data.training_batches(part, 25, seed=0, epoch=0)])
    assert sorted(seen) == list(range(100))
    batch_images, batch_labels = next(iter(data.training_batches(part, 25, seed=0, epoch=1)))
    np.testing.assert_array_equal(batch_images.numpy(), images.numpy()[indices(batch_images)])
    np.testing.assert_array_equal(batch_labels.numpy(), labels.numpy()[indices(batch_images)])
    with pytest.raises(ValueError, match="infinite"):
        data.training_batches(part.repeat(), 25, seed=0, epoch=0)
    # Once read into memory, its evaluation batches and validation split still give the same floats.
    evaluated, _ = next(iter(data.evaluation_batches(part, 100)))
    np.testing.assert_array_equal(evaluated.numpy(), images.numpy())
    kept, held_out = data.split_validation(part, count=10)
    np.testing.assert_array_equal(held_out.images.numpy(), images.numpy()[90:])
    assert sorted(epoch_indices(kept, 30, seed=0, epoch=0)) == list(range(90))


RESUMED_RUN = """
import sys
import numpy as np
import tensorflow as tf
from core import data
from datasets import idx
if sys.argv[2] != "none":
    tf.random.set_seed(int(sys.argv[2]))  # the order must not depend on it
test = idx.load(sys.argv[1], "test")
for epoch in (2, 3):
    batches = data.training_batches(test, 100, seed=3, epoch=epoch).take(3)
    print(epoch, np.concatenate([labels.numpy() for _, labels in batches]).tolist())
"""


def test_a_fresh_process_sees_the_same_batches(mnist_dir):
    """The resume guarantee: another process with the same (seed, epoch) gets the same batches of an epoch,
    whatever its global TF seed."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), TF_CPP_MIN_LOG_LEVEL="2")
    runs = [subprocess.Popen([sys.executable, "-c", RESUMED_RUN, mnist_dir, global_seed], env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) for global_seed in ("5", "none")]
    outputs = [run.communicate(timeout=120)[0].splitlines() for run in runs]
    assert all(run.returncode == 0 for run in runs)
    assert outputs[0] == outputs[1] and len(outputs[0]) == 2
    assert outputs[0][0].split(" ", 1)[1] != outputs[0][1].split(" ", 1)[1]  # epochs 2 and 3 differ


def test_load_reads_the_files_once_every_epoch_reads_memory(tmp_path):
    directory = write_tiny(tmp_path / "once", train=200, test=20)
    train = idx.load(directory, "train")
    first = epoch_indices(train, 50, seed=0, epoch=0)
    shutil.rmtree(directory)  # later epochs must come from the cache, not from the files
    second = epoch_indices(train, 50, seed=0, epoch=1)
    assert sorted(first) == sorted(second) == list(range(200)) and not np.array_equal(first, second)


def test_partial_epochs_keep_the_cache(tmp_path):
    directory = write_tiny(tmp_path / "partial", train=200, test=20)
    train = idx.load(directory, "train")
    shutil.rmtree(directory)  # load() filled the cache: stopping epochs early must not lose it
    for epoch in range(3):
        batches = data.training_batches(train, 10, seed=0, epoch=epoch)
        assert len(list(batches.take(2))) == 2
    assert sorted(epoch_indices(train, 50, seed=0, epoch=3)) == list(range(200))


def test_file_changed_after_validation_still_gives_a_data_error(tmp_path):
    directory = write_tiny(tmp_path / "changed")
    idx.validate(directory)
    path = directory / (idx.FILES["train_images"] + ".gz")
    status = path.stat()
    path.write_bytes(flipped(path.read_bytes(), 2000, 64))  # same size; same mtime below
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: cannot read train data \("):
        idx.load(directory, "train")


def test_split_validation_holds_out_the_last_examples(tmp_path):
    directory = write_tiny(tmp_path / "split", train=300, test=20)
    train, validation = data.split_validation(idx.load(directory, "train"), count=50)
    assert len(train) == 250 and len(validation) == 50
    shutil.rmtree(directory)  # both parts hold their slice of the pixels in memory
    held_out = np.concatenate([indices(x) for x, _ in data.evaluation_batches(validation, 16)])
    assert held_out.tolist() == list(range(250, 300))
    for epoch in range(2):
        assert sorted(epoch_indices(train, 25, seed=1, epoch=epoch)) == list(range(250))
    with pytest.raises(ValueError, match="count must be in 1..299"):
        data.split_validation(idx.load(write_tiny(tmp_path / "again"), "train"), count=300)


def test_evaluation_batches_keep_order_and_the_last_partial_batch(tiny_dir):
    batches = list(data.evaluation_batches(idx.load(tiny_dir, "test"), batch_size=30))
    assert [len(labels) for _, labels in batches] == [30, 30, 30, 10]
    assert np.concatenate([indices(x) for x, _ in batches]).tolist() == list(range(100))


def test_training_batches_rejects_bad_sizes(tiny_dir):
    train = idx.load(tiny_dir, "train")
    with pytest.raises(ValueError, match="300 examples do not fill one batch of 512"):
        data.training_batches(train, 512, seed=0, epoch=0)
    with pytest.raises(ValueError, match="batch_size"):
        data.training_batches(train, 0, seed=0, epoch=0)
    with pytest.raises(ValueError, match="split must be one of"):
        idx.load(tiny_dir, "validation")


# ---------------------------------------------------------------- any image shape, any number of classes

def colour_images(count):
    return np.random.default_rng(count).integers(0, 256, size=(count, 32, 32, 3), dtype=np.uint8)


def write_colour(directory, train=200, test=50, classes=5):
    """A tiny IDX data set of colour images [32, 32, 3] (4-dimensional IDX, magic 2052) in `classes` classes."""
    return write_tiny(directory, overrides={
        "train_images": colour_images(train), "train_labels": (np.arange(train) % classes).astype(np.uint8),
        "test_images": colour_images(test), "test_labels": (np.arange(test) % classes).astype(np.uint8)})


def test_colour_images_in_five_classes(tmp_path):
    directory = write_colour(tmp_path / "colour")
    with gzip.open(directory / (idx.FILES["train_images"] + ".gz"), "rb") as stream:
        assert np.frombuffer(stream.read(20), ">u4").tolist() == [2052, 200, 32, 32, 3]
    assert idx.validate(directory) == {"train": 200, "test": 50}
    assert idx.describe(directory) == ((32, 32, 3), 5)
    assert idx.validate(directory, image_shape=(32, 32, 3), num_classes=5) == {"train": 200, "test": 50}
    train = idx.load(directory, "train")
    assert train.images.shape == (200, 32, 32, 3) and train.images.dtype == tf.uint8
    images, labels = next(iter(data.evaluation_batches(train, 200)))
    np.testing.assert_array_equal(images.numpy(), colour_images(200).astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(labels.numpy(), np.arange(200) % 5)
    images, labels = next(iter(data.training_batches(train, 64, seed=0, epoch=0)))
    assert images.shape == (64, 32, 32, 3) and labels.shape == (64,)
    flat, _ = next(iter(data.evaluation_batches(idx.load(directory, "test", flat=True), 10)))
    assert flat.shape == (10, 32 * 32 * 3)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: images are 32x32x3, expected 28x28$"):
        idx.validate(directory, **AS_MNIST)
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte.gz: label 4 at index 4 is outside 0..3 \(40 such"):
        idx.load(directory, "train", image_shape=(32, 32, 3), num_classes=4)


def test_grey_images_with_a_channel_axis_are_mnist_shaped(tmp_path):
    """[N, 28, 28, 1] in 4 dimensions (magic 2052) reads exactly like [N, 28, 28] in 3."""
    directory = write_tiny(tmp_path / "four", overrides={"train_images": tiny_images(300)[..., None]})
    assert idx.describe(directory) == ((28, 28, 1), 10)
    train = idx.load(directory, "train", **AS_MNIST)
    images, _ = next(iter(data.evaluation_batches(train, 300)))
    np.testing.assert_array_equal(images.numpy(), tiny_images(300)[..., None].astype(np.float32) / np.float32(255))


def test_train_and_test_images_must_agree(tmp_path):
    directory = write_tiny(tmp_path / "mixed", overrides={"test_images": colour_images(100)})
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: images are 28x28, expected 32x32x3 like the "
                                        r"test images in t10k-images-idx3-ubyte.gz$"):
        idx.describe(directory)


# ---------------------------------------------------------------- every broken input: one clear DataError

def gzip_bytes(raw):
    return gzip.compress(raw, mtime=0)


def idx_bytes(array):
    array = np.asarray(array, dtype=np.uint8)
    header = (0x0800 + array.ndim).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in array.shape)
    return header + array.tobytes()


def flipped(raw, start, count):
    """`raw` with `count` bytes inverted from `start` on."""
    return raw[:start] + bytes(byte ^ 0xFF for byte in raw[start:start + count]) + raw[start + count:]


TRAIN_IMAGES = idx.FILES["train_images"]
TRAIN_LABELS = idx.FILES["train_labels"]
GOOD_IMAGES = idx_bytes(tiny_images(300))
GOOD_LABELS = idx_bytes(tiny_labels(300))

BROKEN = {
    # case: (file name, file content, words the message must hold)
    "empty file": (TRAIN_IMAGES + ".gz", b"", "empty file"),
    "empty plain file": (TRAIN_LABELS, b"", "empty file"),
    "truncated images": (TRAIN_IMAGES, GOOD_IMAGES[:-784 * 3 - 5], "truncated: the header announces 300 images"),
    "truncated images in gzip": (TRAIN_IMAGES + ".gz", gzip_bytes(GOOD_IMAGES[:5000]),
                                 "holds 4984 decompressed bytes"),
    "truncated labels": (TRAIN_LABELS, GOOD_LABELS[:100], "truncated: the header announces 300 labels"),
    "truncated gzip stream": (TRAIN_IMAGES + ".gz", gzip_bytes(GOOD_IMAGES)[:3000], "truncated gzip file"),
    "not gzip at all": (TRAIN_IMAGES + ".gz", GOOD_IMAGES, "corrupt gzip file"),
    "corrupt gzip data": (TRAIN_IMAGES + ".gz", flipped(gzip_bytes(GOOD_IMAGES), 1000, 64), "corrupt gzip file"),
    "labels file as images": (TRAIN_IMAGES, GOOD_LABELS, "magic number 2049, expected 2051 for images (this is a labels file)"),
    "images file as labels": (TRAIN_LABELS + ".gz", gzip_bytes(GOOD_IMAGES), "magic number 2051, expected 2049 for labels"),
    "text file": (TRAIN_IMAGES, b"<html>not found</html>\n", "expected 2051 for images (not an IDX file"),
    "three bytes": (TRAIN_LABELS, b"\x00\x00\x08", "not an IDX file (only 3 bytes"),
    "header cut": (TRAIN_IMAGES, GOOD_IMAGES[:10], "truncated header (10 of 16 bytes)"),
    "wrong dimensions": (TRAIN_IMAGES, idx_bytes(np.zeros((300, 32, 32))), "images are 32x32, expected 28x28"),
    "extra bytes": (TRAIN_IMAGES, GOOD_IMAGES + b"\x00" * 7, "7 unexpected bytes after the 300 images"),
    "zero images": (TRAIN_IMAGES, idx_bytes(np.zeros((0, 28, 28))), "announces 0 images"),
    "label out of range": (TRAIN_LABELS, idx_bytes(np.r_[tiny_labels(299), 12]), "label 12 "),  # 1 time, at index 299
    "count mismatch": (TRAIN_LABELS, idx_bytes(tiny_labels(299)), "300 images but train-labels-idx1-ubyte has 299 labels"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_each_broken_input_gives_one_clear_line(tmp_path, case):
    name, content, words = BROKEN[case]
    directory = write_tiny(tmp_path / "broken", gz=False)
    (directory / name.removesuffix(".gz")).unlink()
    (directory / name).write_bytes(content)
    calls = [lambda: idx.validate(directory, **AS_MNIST), lambda: idx.load(directory, "train", **AS_MNIST)]
    if case == "label out of range":  # without a data set's classes to check, the labels say them: 0..12
        assert datasets.prepare(directory, download=False) == str(directory)
        calls.append(lambda: idx.describe(directory))  # ... and 10, 11 never occur
        with pytest.raises(DataError, match=r"label 12 at index 299 is outside 0..9 \(1 such labels\)$"):
            idx.validate(directory, **AS_MNIST)
    else:
        calls.append(lambda: datasets.prepare(directory, download=False))
    for call in calls:
        with pytest.raises(DataError) as caught:
            call()
        message = str(caught.value)
        assert words in message, message
        assert "\n" not in message
        shown = TRAIN_IMAGES if case == "count mismatch" else name
        assert message.startswith(str(directory / shown) + ": "), message


def test_inferred_classes_must_all_occur_in_training(tmp_path):
    """One stray label 12 among 0..9 would make a 13-class model; a test label above the training classes would
    count as wrong whatever the model said. Each is one line naming the labels, their counts and positions."""
    labels = tiny_labels(300)
    labels[[17, 201]] = 12
    directory = write_tiny(tmp_path / "stray", overrides={"train_labels": labels})
    with pytest.raises(DataError) as caught:
        idx.describe(directory)
    assert str(caught.value) == (f"{directory / TRAIN_LABELS}.gz: the labels say classes 0..12, but 10, 11 never "
                                 f"occur; above 10: label 12 (2 times, at indices 17, 201)")

    labels = tiny_labels(300) + 1  # 1..10: class 0 is missing, every label lies above it
    directory = write_tiny(tmp_path / "shifted", overrides={"train_labels": labels})
    with pytest.raises(DataError, match=r"classes 0..10, but 0 never occurs; above 0: label 1 \(30 times, at "
                                        r"indices 0, 10, 20, 30, 40 and 25 more\), label 2 .*, label 3 .* and 7 "
                                        r"more labels$"):
        idx.describe(directory)

    test_labels = tiny_labels(100)
    test_labels[[5, 6, 99]] = [10, 11, 10]
    directory = write_tiny(tmp_path / "test_above", overrides={"test_labels": test_labels})
    with pytest.raises(DataError) as caught:
        idx.describe(directory)
    assert str(caught.value) == (f"{directory / idx.FILES['test_labels']}.gz: labels outside the training classes "
                                 f"0..9: label 10 (2 times, at indices 5, 99), label 11 (1 time, at index 6)")

    labels = tiny_labels(300) % 5  # fewer classes, all present: inferred
    assert idx.describe(write_tiny(tmp_path / "five", overrides={"train_labels": labels,
                                                                  "test_labels": tiny_labels(100) % 5})) == \
        ((28, 28, 1), 5)


def test_missing_file_and_directory(tmp_path):
    directory = write_tiny(tmp_path / "partial")
    (directory / (idx.FILES["test_labels"] + ".gz")).unlink()
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte: file not found \(nor t10k-labels-idx1-ubyte.gz\);"
                                        r" .* pass --data_dir DIR \(or set TF_BY_HAND_DATA_DIR=DIR\)"):
        idx.validate(directory)
    idx.load(directory, "train")  # the train split alone is complete
    with pytest.raises(DataError, match="missing t10k-labels-idx1-ubyte .* downloading is off; .*--data_dir DIR"):
        datasets.prepare(directory, download=False)
    with pytest.raises(DataError, match="nowhere: data directory not found; .*--data_dir DIR"):
        idx.validate(tmp_path / "nowhere")
    with pytest.raises(DataError, match=rf"^no MNIST files in {tmp_path}/nowhere \(no such directory\); to use "):
        datasets.prepare(tmp_path / "nowhere", download=False)  # a directory the user names is never created
    assert not (tmp_path / "nowhere").exists()


def test_write_idx_rejects_other_arrays(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        idx.write_idx(tmp_path / "x", np.zeros((3, 28, 28), np.float32))
    with pytest.raises(ValueError, match=r"\[3, 28\]"):
        idx.write_idx(tmp_path / "x", np.zeros((3, 28), np.uint8))
    with pytest.raises(ValueError, match=r"\[3, 2, 2, 2, 2\]"):
        idx.write_idx(tmp_path / "x", np.zeros((3, 2, 2, 2, 2), np.uint8))
