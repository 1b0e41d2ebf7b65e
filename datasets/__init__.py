"""The data sets the application trains on: one registry entry each, their IDX files downloaded when missing.

    data = load("fashion_mnist")                # found or downloaded, checked, read: data.train, data.test
    data.train                                  # core.data.Examples: uint8 pixels [60000, 28, 28, 1], int32 labels
    data.image_shape, data.num_classes          # (28, 28, 1), 10: what the files hold
    dataset = get("fashion_mnist")              # name, image shape (H, W, C), classes, four files (URL, MD5)
    data_dir = prepare(None, dataset)           # ~/.cache/tf-by-hand/fashion_mnist, downloaded and checked

A data set is a `Dataset`: its four IDX files (datasets.idx.FILES) with the URL each is fetched from and
the MD5 of its decompressed content (mirrors recompress the .gz files, the content is what counts).
Adding one is one REGISTRY entry. Files already present are checked by the same MD5s (datasets.checksums
remembers each file's verdict): a data set's name never trains another's files. Any directory of four IDX
files of your own works too (--data_dir): the files say the image shape and the classes, so an entry's
image_shape and num_classes describe what it downloads. The files are IDX files (datasets.idx), a detail
of this package: load() gives their examples, DataError (one line) says what is wrong with them.
"""
import dataclasses
import os
import zlib

from datasets import checksums, idx
from datasets.download import DownloadError
from datasets.download import download as fetch
from datasets.idx import DataError, shape_text

__all__ = ["DataFile", "Dataset", "REGISTRY", "get", "default_data_dir", "prepare", "check_files", "Loaded",
           "load", "DataError", "shape_text"]


@dataclasses.dataclass(frozen=True)
class DataFile:
    """One IDX file of a data set: where to fetch it (.gz) and the MD5 of its decompressed content."""
    url: str
    md5: str


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A named data set: images [H, W, C] of `image_shape` in `num_classes` classes, in four IDX files.

    files: {key of datasets.idx.FILES: DataFile}, saved as <FILES[key]>.gz in the data directory.
    digits: the classes are handwritten digits 0-9 as MNIST draws them (runs then also show printed digits).
    title: the name people know it by, for messages.
    """
    name: str
    image_shape: tuple
    num_classes: int
    files: dict
    digits: bool = False
    title: str = ""

    def __post_init__(self):
        if not self.title:
            object.__setattr__(self, "title", self.name)


def _files(base_url, md5):
    """{key: DataFile(base_url + <name>.gz, md5[key])} for the four files."""
    return {key: DataFile(f"{base_url}{name}.gz", md5[key]) for key, name in idx.FILES.items()}


MNIST = Dataset(
    name="mnist", title="MNIST", image_shape=(28, 28, 1), num_classes=10, digits=True,
    files=_files("https://storage.googleapis.com/cvdf-datasets/mnist/", {
        "train_images": "6bbc9ace898e44ae57da46a324031adb",
        "train_labels": "a25bea736e30d166cdddb491f175f624",
        "test_images": "2646ac647ad5339dbf082846283269ea",
        "test_labels": "27ae3e4e09519cfbb04c329615203637",
    }))

# Zalando's Fashion-MNIST (github.com/zalandoresearch/fashion-mnist, MIT licence): the URLs of its README.
# The README lists the MD5s of the .gz files (8d4fb7e6..., 25c81989..., bef4ecab..., bb300cfd...); these are
# the MD5s of the decompressed files, as torchvision's FashionMNIST lists them (raw_data) and as md5sum gives
# them after gunzip; the two label files were checked here against the repository's own copies.
FASHION_MNIST = Dataset(
    name="fashion_mnist", title="Fashion-MNIST", image_shape=(28, 28, 1), num_classes=10,
    files=_files("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/", {
        "train_images": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train_labels": "9018921c3c673c538a1fc5bad174d6f9",
        "test_images": "8181f5470baa50b63fa0f6fddb340f0a",
        "test_labels": "15d484375f8d13e6eb1aabb0c3f46965",
    }))

REGISTRY = {dataset.name: dataset for dataset in (MNIST, FASHION_MNIST)}


@dataclasses.dataclass(frozen=True)
class Loaded:
    """A data set read into memory: train and test as core.data.Examples (uint8 pixels [n, H, W, C], int32
    labels [n]), the image shape (H, W, C) and the number of classes the files hold, and their directory."""
    train: object
    test: object
    image_shape: tuple
    num_classes: int
    directory: str


def load(name_or_dir="mnist", data_dir=None, download=True, progress=True, timeout=30.0):
    """The train and test examples of a registered data set (found or fetched as prepare() does, into data_dir or
    its default directory), or of any directory of four IDX files (`name_or_dir` not a registered name: read as
    they are, nothing fetched). Raises DataError (one line) for anything that stops training.
    """
    if isinstance(name_or_dir, Dataset) or name_or_dir in REGISTRY:
        directory = prepare(data_dir, name_or_dir, download=download, progress=progress, timeout=timeout)
    elif data_dir is not None:
        raise ValueError(f"load: pass a data set's name with data_dir, or a directory alone; got {name_or_dir!r} "
                         f"and data_dir={data_dir!r}")
    else:
        directory = os.path.expanduser(str(name_or_dir))
        if not os.path.isdir(directory) and os.sep not in directory:
            get(directory)  # neither a directory nor a registered name: the known names
    image_shape, num_classes = idx.describe(directory)
    return Loaded(idx.load(directory, "train"), idx.load(directory, "test"), tuple(image_shape), num_classes,
                  directory)


def get(name):
    """The Dataset called `name`; ValueError naming the known data sets otherwise."""
    if name not in REGISTRY:
        raise ValueError(f"unknown data set {name!r}; choose one of: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def default_data_dir(name="mnist"):
    """$TF_BY_HAND_DATA_DIR, or ~/.cache/tf-by-hand/<name>."""
    directory = os.environ.get("TF_BY_HAND_DATA_DIR") or os.path.join("~", ".cache", "tf-by-hand", name)
    return os.path.expanduser(directory)


def prepare(data_dir=None, dataset=MNIST, download=True, progress=True, timeout=30.0):
    """Returns the directory holding the four IDX files, downloading the missing ones, validated.

    dataset: a Dataset or its name. data_dir defaults to $TF_BY_HAND_DATA_DIR; a directory so named must
    exist. Without either, the download cache default_data_dir(dataset.name) is created if needed. The files
    present are checked (check_files): the dataset's own, or files of no registered data set (your own data).
    Missing files are fetched as .gz from the dataset's URLs when `download` is True (and the files present
    are the dataset's); their decompressed MD5 must match. Raises DataError (one line) for anything that
    stops training.
    """
    dataset = get(dataset) if isinstance(dataset, str) else dataset
    named = data_dir or os.environ.get("TF_BY_HAND_DATA_DIR")
    directory = os.path.expanduser(str(named or default_data_dir(dataset.name)))
    if named and not os.path.isdir(directory):
        reason = "not a directory" if os.path.exists(directory) else "no such directory"
        raise idx.DataError(f"no {dataset.title} files in {directory} ({reason}); {idx.how_to_point_at_a_copy()}")
    paths = idx.find_files(directory)
    own = not check_files(paths, dataset)
    missing = [key for key, path in paths.items() if path is None]
    if missing and (own or not download):
        names = ", ".join(idx.FILES[key] for key in missing)
        why = ("downloading is off" if not download else
               f"the other files are not {dataset.title}'s, so {dataset.title}'s are not downloaded")
        raise idx.DataError(f"{directory}: missing {names} (plain or .gz) and {why}; "
                            f"{idx.how_to_point_at_a_copy()}")
    for key in missing:
        destination = os.path.join(directory, idx.FILES[key] + ".gz")
        try:
            fetch(dataset.files[key].url, destination, md5=dataset.files[key].md5, timeout=timeout,
                  progress=progress)
        except DownloadError as error:
            raise idx.DataError(f"{error}; {idx.how_to_point_at_a_copy()}") from None
        except OSError as error:
            raise idx.DataError(f"{destination}: cannot write the download ({error.strerror or error}); "
                                f"{idx.how_to_point_at_a_copy()}") from None
    idx.validate(directory)
    return directory


def check_files(paths, dataset):
    """Checks the content MD5 of the files present ({key: path or None}, as idx.find_files gives them)
    against the registry. True: they are `dataset`'s (or none is present); False: none is any registered
    data set's (your own data: the files say the shape and the classes). DataError (one line naming the
    file and the data set) for a file of another data set, or for one that is not `dataset`'s beside others
    that are (damaged or replaced)."""
    owners = {file.md5: (other, key) for other in (*REGISTRY.values(), dataset) for key, file in other.files.items()}
    digests = {}
    for key, path in paths.items():
        if path is not None:
            try:
                digests[key] = checksums.md5(path)
            except (OSError, EOFError, zlib.error) as error:
                raise idx.read_error(path, error) from None
    for key, digest in digests.items():
        other, other_key = owners.get(digest, (dataset, key))
        if other.name != dataset.name or other_key != key:
            what = "" if other_key == key else f" {idx.FILES[other_key]}"
            raise idx.DataError(f"{paths[key]}: this is {other.title}'s{what}, not {dataset.title}'s (content MD5 "
                                f"{digest}); point --data_dir at {dataset.title}'s files, or pass "
                                f"--dataset={other.name} to train on these")
    ours = [key for key, digest in digests.items() if digest == dataset.files[key].md5]
    if not ours:
        return not digests
    for key, digest in digests.items():
        if key not in ours:
            raise idx.DataError(f"{paths[key]}: not {dataset.title}'s {idx.FILES[key]} (content MD5 {digest}, "
                                f"expected {dataset.files[key].md5}) beside {dataset.title}'s other files: "
                                f"a damaged or replaced file; put {dataset.title}'s back, or all four of "
                                f"your own")
    return True
