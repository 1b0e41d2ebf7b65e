"""IDX files -> checked -> core.data.Examples, the way the codelab reads MNIST. Private to datasets/: the
application calls datasets.load.

    validate(data_dir)                                    # {"train": 60000, "test": 10000}, or one-line DataError
    describe(data_dir)                                    # ((28, 28, 1), 10): image shape and classes, from the files
    train = load(data_dir, "train")                       # Examples: uint8 pixels [n, H, W, C], int32 labels [n]
    batches = core.data.training_batches(train, 128, seed, epoch)

A directory holds four files, each plain or gzipped (FILES: the names MNIST made the convention):
    train-images-idx3-ubyte  train-labels-idx1-ubyte  t10k-images-idx3-ubyte  t10k-labels-idx1-ubyte
An IDX file is a big-endian header followed by raw unsigned bytes:
    images: magic 2051 | count | rows | cols            | count*rows*cols pixels        (16-byte header)
        or  magic 2052 | count | rows | cols | channels | count*rows*cols*channels     (20-byte header)
    labels: magic 2049 | count | count labels, one byte each                            (8-byte header)
The magic is 0x0800 + the number of dimensions (0x08: unsigned bytes). So every image is a fixed-length
record after the header, and every label a record of 1 byte: `tf.data.FixedLengthRecordDataset` reads
them directly, from the .gz files (compression_type "GZIP") or from plain copies. The files say the image
shape (rows, cols, channels; 1 channel for 3 dimensions) and the training labels the classes: 0 .. their
largest, each of which must occur.
A caller that knows what to expect (a registered data set) passes image_shape and num_classes to be checked.
"""
import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np

__all__ = ["DataError", "FILES", "SPLITS", "find_files", "how_to_point_at_a_copy", "validate", "describe",
           "load", "write_idx", "read_error"]

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
SPLITS = {"train": ("train_images", "train_labels"), "test": ("test_images", "test_labels")}

IMAGE_MAGICS = (2051, 2052)  # 0x00000803, 0x00000804: unsigned bytes, 3 or 4 dimensions
LABEL_MAGICS = (2049,)  # 0x00000801: unsigned bytes, 1 dimension
DECODE_BATCH = 1000  # records decoded per decode_raw call: one op per 1000 records, not per record

_checked = {}  # (path, kind, size, mtime) -> (count, image shape or labels): each file is read once per process
# (image key, label key, flat) -> Examples: the splits decoded last (bounded; tensors are immutable, so sharing
# them is safe). A notebook or a test that loads the same files again reads memory; a changed file has a new key.
_decoded = {}
DECODED_KEPT = 4


class DataError(Exception):
    """Unusable input data; the message is one line naming the file and the problem."""


def _directory(data_dir):
    """`data_dir` (str or path, may start with ~) as a Path."""
    return Path(os.path.expanduser(str(data_dir)))


def how_to_point_at_a_copy():
    """The advice printed whenever the files cannot be found or fetched."""
    names = ", ".join(FILES.values())
    return (f"to use a local copy, put the four IDX files ({names}; plain or .gz) in a directory "
            f"and pass --data_dir DIR (or set TF_BY_HAND_DATA_DIR=DIR)")


def find_files(data_dir):
    """{key: path of the plain file, else of the .gz file, else None} for every key of FILES."""
    directory = _directory(data_dir)
    paths = {}
    for key, name in FILES.items():
        candidates = [directory / name, directory / (name + ".gz")]
        paths[key] = next((str(path) for path in candidates if path.is_file()), None)
    return paths


def validate(data_dir, image_shape=None, num_classes=None):
    """Checks the four files; returns {"train": count, "test": count}. Raises DataError.

    Rules: each file present (plain or .gz) and non-empty; a .gz decompresses completely;
    magic 2051 or 2052 for images and 2049 for labels; the size after the header equals
    count * rows * cols * channels (images) or count (labels); images and labels of a split have the
    same count; train and test images have the same shape. When given, the image shape must be
    `image_shape` (H, W, C) and every label in 0..num_classes-1.
    """
    return {split: checked[2] for split, checked in _check_splits(data_dir, image_shape, num_classes).items()}


def describe(data_dir):
    """(image shape (H, W, C), number of classes) of the validated files. The classes are inferred from the
    training labels, 0 .. the largest: each must occur there, and no test label may lie above them (a stray
    label would otherwise make a class of its own); DataError names the odd labels otherwise."""
    checked = _check_splits(data_dir)
    (_, train_path, _, shape, train_labels), (_, test_path, _, _, test_labels) = checked["train"], checked["test"]
    counts = np.bincount(train_labels)
    top = len(counts) - 1
    absent = np.flatnonzero(counts == 0)
    if absent.size:
        odd = [label for label in range(absent[0] + 1, top + 1) if counts[label]]
        raise DataError(f"{train_path}: the labels say classes 0..{top}, but {_numbers(absent)} never "
                        f"{'occurs' if absent.size == 1 else 'occur'}; above {absent[0]}: "
                        f"{_odd_labels(train_labels, odd)}")
    above = sorted(set(np.unique(test_labels).tolist()) - set(range(top + 1)))
    if above:
        raise DataError(f"{test_path}: labels outside the training classes 0..{top}: {_odd_labels(test_labels, above)}")
    return shape, top + 1


def _numbers(values, shown=5):
    """'10, 11' / '3, 4, 5, 6, 7 and 2 more'."""
    values = [int(v) for v in values]
    text = ", ".join(map(str, values[:shown]))
    return text + (f" and {len(values) - shown} more" if len(values) > shown else "")


def _odd_labels(labels, odd, shown=3):
    """'label 12 (1 time, at index 299)' for the first `shown` of the labels `odd`: each one's count and first
    positions."""
    parts = []
    for label in odd[:shown]:
        where = np.flatnonzero(labels == label)
        times = f"{where.size:,} time{'' if where.size == 1 else 's'}"
        index = "index" if where.size == 1 else "indices"
        parts.append(f"label {label} ({times}, at {index} {_numbers(where)})")
    more = f" and {len(odd) - shown} more labels" if len(odd) > shown else ""
    return ", ".join(parts) + more


def load(data_dir, split, flat=False, image_shape=None, num_classes=None):
    """The `split` ("train" or "test") as core.data.Examples: uint8 pixels [n, H, W, C] (or [n, H * W * C] if
    `flat`; batched as x = pixel / 255 in [0, 1]) and int32 labels [n].

    The files are validated first (once per process; image_shape and num_classes as for validate) and
    read now, once: the decoded pixels and the labels stay in memory, so every epoch, and any part of the
    split, reads memory. The last DECODED_KEPT splits loaded stay decoded: loading the same unchanged files
    again returns the same tensors.
    """
    if split not in SPLITS:
        raise ValueError(f"load: split must be one of {sorted(SPLITS)}, got {split!r}")
    import tensorflow as tf  # here, not above: the data set names are read before TensorFlow loads

    from core.data import Examples
    image_path, label_path, count, shape, _ = _check_split(_directory(data_dir), split, image_shape, num_classes)
    key = (_file_key(image_path), _file_key(label_path), bool(flat))
    if key in _decoded:
        _decoded[key] = _decoded.pop(key)  # the most recently used last
        return _decoded[key]
    record_bytes = int(np.prod(shape))
    pixel_shape = [count, record_bytes] if flat else [count, *shape]
    try:
        pixels = tf.reshape(_decode(image_path, _header_bytes(image_path), record_bytes), pixel_shape)
        labels = tf.cast(tf.reshape(_decode(label_path, 8, 1), [count]), tf.int32)
    except tf.errors.OpError as error:  # the files changed since they were validated
        raise DataError(f"{image_path}: cannot read {split} data ({error.message.splitlines()[0]})") from None
    _decoded[key] = Examples(pixels, labels)
    while len(_decoded) > DECODED_KEPT:
        del _decoded[next(iter(_decoded))]
    return _decoded[key]


def write_idx(path, array):
    """Writes a uint8 array [count] (labels), [count, rows, cols] or [count, rows, cols, channels] (images).

    Gzipped when `path` ends with .gz. For tests and for converting other data sets.
    """
    array = np.asarray(array)
    if array.dtype != np.uint8 or array.ndim not in (1, 3, 4):
        raise ValueError(f"write_idx: expected uint8 [count], [count, rows, cols] or [count, rows, cols, "
                         f"channels], got {array.dtype} {list(array.shape)}")
    header = struct.pack(f">I{array.ndim}I", 0x0800 + array.ndim, *array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as stream:
        stream.write(header + array.tobytes())
    return str(path)


def shape_text(shape):
    """(28, 28, 1) -> '28x28'; (32, 32, 3) -> '32x32x3'."""
    return "x".join(str(n) for n in (shape[:2] if shape[2:] == (1,) else shape))


def _decode(path, header_bytes, record_bytes):
    """uint8 [count, record_bytes]: the records of an IDX file, decoded 1000 records per decode_raw."""
    import tensorflow as tf
    records = _records(path, header_bytes, record_bytes).batch(DECODE_BATCH)
    return tf.concat(list(records.map(lambda batch: tf.io.decode_raw(batch, tf.uint8))), axis=0)


def _records(path, header_bytes, record_bytes):
    import tensorflow as tf
    compression = "GZIP" if path.endswith(".gz") else ""
    return tf.data.FixedLengthRecordDataset(
        path, record_bytes, header_bytes=header_bytes, compression_type=compression)


def _header_bytes(path):
    """16 or 20: the header length of a validated images file (4 bytes of magic, 4 per dimension)."""
    with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as stream:
        return 4 + 4 * stream.read(4)[3]


def _check_splits(data_dir, image_shape=None, num_classes=None):
    """{split: _check_split(...)} for both splits, their image shapes checked to agree. Raises DataError."""
    directory = _directory(data_dir)
    if not directory.is_dir():
        raise DataError(f"{directory}: data directory not found; {how_to_point_at_a_copy()}")
    checked = {split: _check_split(directory, split, image_shape, num_classes) for split in SPLITS}
    train, test = checked["train"], checked["test"]
    if train[3] != test[3]:
        raise DataError(f"{train[0]}: images are {shape_text(train[3])}, expected {shape_text(test[3])} like "
                        f"the test images in {os.path.basename(test[0])}")
    return checked


def _check_split(directory, split, image_shape=None, num_classes=None):
    """(image path, label path, count, image shape (H, W, C), labels uint8 [count]) of a validated split."""
    image_key, label_key = SPLITS[split]
    paths = find_files(directory)
    for key in (image_key, label_key):
        if paths[key] is None:
            raise DataError(f"{directory / FILES[key]}: file not found (nor {FILES[key]}.gz); "
                            f"{how_to_point_at_a_copy()}")
    images, shape = _checked_file(paths[image_key], "images")
    if image_shape is not None and shape != tuple(image_shape):
        raise DataError(f"{paths[image_key]}: images are {shape_text(shape)}, expected {shape_text(image_shape)}")
    count, labels = _checked_file(paths[label_key], "labels")
    if num_classes is not None:
        _check_classes(paths[label_key], labels, num_classes)
    if images != count:
        raise DataError(f"{paths[image_key]}: {images} images but {os.path.basename(paths[label_key])} "
                        f"has {count} labels; the counts must match")
    return paths[image_key], paths[label_key], images, shape, labels


def _file_key(path):
    """(absolute path, size, modification time in ns): a file that changes gets a new key."""
    status = os.stat(path)
    return os.path.abspath(path), status.st_size, status.st_mtime_ns


def _checked_file(path, kind):
    key = (kind, *_file_key(path))
    if key not in _checked:
        _checked[key] = _check_images(path) if kind == "images" else _check_labels(path)
    return _checked[key]


def _check_images(path):
    """(count, (rows, cols, channels)) of an images file."""
    header, body_size, _ = _read_checked(path, IMAGE_MAGICS, "images", keep_body=False)
    count, *dims = struct.unpack(f">{len(header) // 4 - 1}I", header[4:])
    shape = tuple(dims) + (1,) * (3 - len(dims))
    if 0 in shape:
        raise DataError(f"{path}: images of {'x'.join(map(str, shape))} pixels are empty")
    _check_size(path, count, count * int(np.prod(shape)), body_size, "images")
    return count, shape


def _check_labels(path):
    """(count, labels uint8 [count]) of a labels file."""
    header, body_size, body = _read_checked(path, LABEL_MAGICS, "labels", keep_body=True)
    (count,) = struct.unpack(">I", header[4:8])
    _check_size(path, count, count, body_size, "labels")
    return count, np.frombuffer(body, dtype=np.uint8)


def _check_classes(path, labels, num_classes):
    outside = np.flatnonzero(labels >= num_classes)
    if outside.size:
        index = int(outside[0])
        raise DataError(f"{path}: label {labels[index]} at index {index} is outside 0..{num_classes - 1} "
                        f"({outside.size} such labels)")


def _read_checked(path, magics, kind, keep_body):
    """_read(), then the magic number and a complete header checked. Raises DataError."""
    header, body_size, body = _read(path, keep_body)
    _check_magic(path, header, magics, kind)
    header_bytes = 4 + 4 * header[3]  # magic, then 4 bytes per dimension
    if len(header) < header_bytes:
        raise DataError(f"{path}: truncated header ({len(header)} of {header_bytes} bytes)")
    return header, body_size, body


def _check_magic(path, header, expected, kind):
    if len(header) < 4:
        raise DataError(f"{path}: not an IDX file (only {len(header)} bytes of data)")
    (magic,) = struct.unpack(">I", header[:4])
    if magic not in expected:
        swapped = {2049: "a labels file", 2051: "an images file", 2052: "an images file"}.get(magic)
        what = f"this is {swapped}" if swapped else "not an IDX file of unsigned bytes"
        channels = f", or {expected[1]} for {kind} with channels" if len(expected) > 1 else ""
        raise DataError(f"{path}: magic number {magic}, expected {expected[0]} for {kind} ({what}){channels}")


def _check_size(path, count, expected, actual, kind):
    decompressed = " decompressed" if path.endswith(".gz") else ""
    if count == 0:
        raise DataError(f"{path}: the header announces 0 {kind}")
    if actual < expected:
        raise DataError(f"{path}: truncated: the header announces {count} {kind} ({expected} bytes after "
                        f"the header) but the file holds {actual}{decompressed} bytes")
    if actual > expected:
        raise DataError(f"{path}: {actual - expected} unexpected{decompressed} bytes after the {count} {kind} "
                        f"the header announces (not an IDX file?)")


def _read(path, keep_body):
    """(header, size of the rest, rest or None) of a plain or gzipped file. Raises DataError.

    The header is the 4-byte magic and, when the magic says unsigned bytes in d dimensions, the 4 * d bytes
    of the dimensions (as many of them as the file holds).
    """
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: empty file")
    body = [] if keep_body else None
    body_size = 0
    gzipped = path.endswith(".gz")
    try:
        with (gzip.open(path, "rb") if gzipped else open(path, "rb")) as stream:
            header = stream.read(4)
            if len(header) == 4 and header[:3] == b"\x00\x00\x08":
                header += stream.read(4 * header[3])
            if not gzipped and not keep_body:
                return header, os.path.getsize(path) - len(header), None
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                body_size += len(chunk)
                if keep_body:
                    body.append(chunk)
    except (OSError, EOFError, zlib.error) as error:
        raise read_error(path, error) from None
    return header, body_size, b"".join(body) if keep_body else None


def read_error(path, error):
    """The one-line DataError for an OSError, EOFError or zlib.error met while reading `path`."""
    if isinstance(error, EOFError):
        return DataError(f"{path}: truncated gzip file (the compressed stream ends early)")
    if isinstance(error, (gzip.BadGzipFile, zlib.error)):
        return DataError(f"{path}: corrupt gzip file ({error})")
    return DataError(f"{path}: cannot read ({error.strerror or error})")
