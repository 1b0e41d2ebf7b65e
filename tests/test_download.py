"""Downloads against a local HTTP server on 127.0.0.1 (never the internet): complete, interrupted, corrupt."""
import dataclasses
import gzip
import hashlib
import json
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

import datasets
from datasets import idx
from datasets.idx import DataError
from datasets.download import DownloadError, content_md5, download


def tiny_files(train=120, test=40):
    """{key: raw IDX bytes} of a tiny valid data set."""
    rng = np.random.default_rng(0)
    arrays = {"train_images": rng.integers(0, 256, (train, 28, 28), dtype=np.uint8),
              "train_labels": (np.arange(train) % 10).astype(np.uint8),
              "test_images": rng.integers(0, 256, (test, 28, 28), dtype=np.uint8),
              "test_labels": (np.arange(test) % 10).astype(np.uint8)}
    files = {}
    for key, array in arrays.items():
        header = (0x0800 + array.ndim).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in array.shape)
        files[key] = header + array.tobytes()
    return files


RAW = tiny_files()
TINY_MD5 = {key: hashlib.md5(raw).hexdigest() for key, raw in RAW.items()}


def served(dataset, url, md5=None):
    """`dataset` with its four files fetched from `url` (same names) and, if given, other MD5s."""
    md5 = md5 or {key: file.md5 for key, file in dataset.files.items()}
    return dataclasses.replace(dataset, files={
        key: datasets.DataFile(f"{url}{name}.gz", md5[key]) for key, name in idx.FILES.items()})


def tiny(url):
    """A data set entry for the tiny files served from `url`."""
    return served(dataclasses.replace(datasets.MNIST, name="tiny"), url, TINY_MD5)


class Server:
    """A local HTTP server: `routes[path] = (body, mode)`; mode "ok", "truncate" (close mid-body), "hang"."""

    def __init__(self):
        self.routes = {}
        self.requests = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                if self.path not in server.routes:
                    self.send_error(404, "Not Found")
                    return
                body, mode = server.routes[self.path]
                if mode == "hang":
                    time.sleep(2.0)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if mode == "truncate":
                    self.wfile.write(body[:len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/mnist/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def serve(self, name, body, mode="ok"):
        self.routes["/mnist/" + name] = (body, mode)

    def serve_tiny(self, keys=tuple(idx.FILES)):
        for key in keys:
            self.serve(idx.FILES[key] + ".gz", gzip.compress(RAW[key], mtime=0))

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    running = Server()
    yield running
    running.close()


def leftovers(directory):
    """Temporary download files left in `directory`."""
    return [path.name for path in Path(directory).glob("*.part")] + \
           [path.name for path in Path(directory).glob(".*")]


def test_prepare_downloads_verifies_and_reuses(server, tmp_path, capsys):
    server.serve_tiny()
    directory = tmp_path / "mnist"
    directory.mkdir()
    assert datasets.prepare(directory, tiny(server.url)) == str(directory)
    assert sorted(path.name for path in directory.iterdir()) == sorted(name + ".gz" for name in idx.FILES.values())
    assert idx.validate(directory) == {"train": 120, "test": 40}
    assert len(server.requests) == 4
    output = capsys.readouterr().out
    assert "train-images-idx3-ubyte.gz" in output and "100%" in output
    datasets.prepare(directory, tiny(server.url))
    assert len(server.requests) == 4  # nothing fetched twice


def test_only_missing_files_are_fetched_into_the_env_directory(server, tmp_path, monkeypatch):
    directory = tmp_path / "from_env"
    directory.mkdir()
    for key in ("train_images", "train_labels", "test_images"):
        (directory / idx.FILES[key]).write_bytes(RAW[key])  # plain copies are fine
    server.serve_tiny()
    monkeypatch.setenv("TF_BY_HAND_DATA_DIR", str(directory))
    assert datasets.prepare(dataset=tiny(server.url), progress=False) == str(directory)
    assert server.requests == ["/mnist/t10k-labels-idx1-ubyte.gz"]


def test_interrupted_download_leaves_no_partial_file(server, tmp_path):
    server.serve_tiny()
    body = gzip.compress(RAW["train_images"], mtime=0)
    server.serve("train-images-idx3-ubyte.gz", body, mode="truncate")
    with pytest.raises(DataError) as caught:
        datasets.prepare(tmp_path, tiny(server.url), progress=False)
    message = str(caught.value)
    assert f"interrupted: received {len(body) // 2} of {len(body)} bytes; nothing was kept" in message
    assert "--data_dir DIR" in message and "\n" not in message
    assert not (tmp_path / "train-images-idx3-ubyte.gz").exists()
    assert leftovers(tmp_path) == []


def test_corrupt_download_is_deleted(server, tmp_path):
    server.serve_tiny()
    wrong = bytearray(RAW["test_images"])
    wrong[-1] ^= 0xFF  # a valid gzip of valid-looking IDX content, one pixel off
    server.serve("t10k-images-idx3-ubyte.gz", gzip.compress(bytes(wrong), mtime=0))
    with pytest.raises(DataError) as caught:
        datasets.prepare(tmp_path, tiny(server.url), progress=False)
    message = str(caught.value)
    assert (f"downloaded t10k-images-idx3-ubyte.gz from {server.url}t10k-images-idx3-ubyte.gz has MD5 "
            f"{hashlib.md5(bytes(wrong)).hexdigest()}, expected {TINY_MD5['test_images']}") in message
    assert "the file was deleted" in message
    assert not (tmp_path / "t10k-images-idx3-ubyte.gz").exists()
    assert leftovers(tmp_path) == []


def test_download_that_is_not_gzip_is_deleted(server, tmp_path):
    server.serve("train-labels-idx1-ubyte.gz", b"<html>a captive portal</html>")
    with pytest.raises(DownloadError, match="is not a valid gzip file .*; the file was deleted"):
        download(server.url + "train-labels-idx1-ubyte.gz", tmp_path / "train-labels-idx1-ubyte.gz",
                 md5=TINY_MD5["train_labels"], progress=False)
    assert list(tmp_path.iterdir()) == []


def test_http_error_names_the_url(server, tmp_path):
    with pytest.raises(DataError, match=r"cannot download http://127.0.0.1:\d+/mnist/train-images-idx3-ubyte.gz: "
                                        r"HTTP 404 Not Found; to use a local copy"):
        datasets.prepare(tmp_path, tiny(server.url), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_offline_says_how_to_point_at_a_copy(tmp_path):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (tmp_path / "offline").mkdir()
    with pytest.raises(DataError) as caught:
        datasets.prepare(tmp_path / "offline", served(datasets.MNIST, f"http://127.0.0.1:{port}/"),
                         progress=False)
    message = str(caught.value)
    assert message.startswith(f"cannot download http://127.0.0.1:{port}/train-images-idx3-ubyte.gz: ")
    assert message.endswith("and pass --data_dir DIR (or set TF_BY_HAND_DATA_DIR=DIR)")
    assert "t10k-labels-idx1-ubyte" in message and "\n" not in message
    assert leftovers(tmp_path / "offline") == []


def test_unresponsive_server_times_out(server, tmp_path):
    server.serve("t10k-labels-idx1-ubyte.gz", b"", mode="hang")
    started = time.monotonic()
    with pytest.raises(DownloadError, match="timed out"):
        download(server.url + "t10k-labels-idx1-ubyte.gz", tmp_path / "labels.gz", timeout=0.3, progress=False)
    assert time.monotonic() - started < 1.5
    assert list(tmp_path.iterdir()) == []


def test_plain_download_without_checksum(server, tmp_path):
    server.serve("notes.txt", b"hello")
    path = download(server.url + "notes.txt", tmp_path / "sub" / "notes.txt", progress=False)
    assert Path(path).read_bytes() == b"hello"
    assert content_md5(path) == hashlib.md5(b"hello").hexdigest()


def test_real_mnist_through_the_download_path(server, mnist_dir, tmp_path):
    """The shipped MD5 table matches the real files' content, served as the mirror would."""
    for name in idx.FILES.values():
        server.serve(name + ".gz", (Path(mnist_dir) / (name + ".gz")).read_bytes())
    (tmp_path / "mirror").mkdir()
    directory = datasets.prepare(tmp_path / "mirror", served(datasets.MNIST, server.url), progress=False)
    assert idx.validate(directory) == {"train": 60000, "test": 10000}
    assert leftovers(directory) == []


def test_fashion_mnist_downloads_its_files_into_its_own_directory(server, tmp_path, monkeypatch):
    """The fashion_mnist entry through the download path: its directory, its MD5s. The tiny files served here
    are not Fashion-MNIST, so the first one is refused by its MD5; with the tiny MD5s all four arrive."""
    monkeypatch.delenv("TF_BY_HAND_DATA_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    server.serve_tiny()
    with pytest.raises(DataError) as caught:
        datasets.prepare(dataset=served(datasets.FASHION_MNIST, server.url), progress=False)
    assert (f"downloaded train-images-idx3-ubyte.gz from {server.url}train-images-idx3-ubyte.gz has MD5 "
            f"{TINY_MD5['train_images']}, expected f4a8712d7a061bf5bd6d2ca38dc4d50a") in str(caught.value)
    assert server.requests == ["/mnist/train-images-idx3-ubyte.gz"]
    directory = tmp_path / ".cache" / "tf-by-hand" / "fashion_mnist"
    assert list(directory.iterdir()) == []
    tiny_fashion = served(datasets.FASHION_MNIST, server.url, TINY_MD5)
    assert datasets.prepare(dataset=tiny_fashion, progress=False) == str(directory)
    assert idx.validate(directory) == {"train": 120, "test": 40}


def write_tiny(directory, keys=tuple(idx.FILES)):
    directory.mkdir(exist_ok=True)
    for key in keys:
        (directory / idx.FILES[key]).write_bytes(RAW[key])
    return directory


def test_files_present_are_checked_like_downloads(server, mnist_dir, tmp_path, monkeypatch):
    """A data set's name never trains another data set's files, nor a damaged copy; files of no registered data
    set are the user's own and are used as they are, never completed by a download."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(DataError) as caught:
        datasets.prepare(mnist_dir, "fashion_mnist", progress=False)
    assert str(caught.value) == (f"{mnist_dir}/train-images-idx3-ubyte.gz: this is MNIST's, not Fashion-MNIST's "
                                 f"(content MD5 6bbc9ace898e44ae57da46a324031adb); point --data_dir at "
                                 f"Fashion-MNIST's files, or pass --dataset=mnist to train on these")
    monkeypatch.setenv("TF_BY_HAND_DATA_DIR", mnist_dir)
    with pytest.raises(DataError, match="this is MNIST's, not Fashion-MNIST's"):
        datasets.prepare(dataset="fashion_mnist", progress=False)
    assert datasets.prepare(dataset="mnist", download=False) == mnist_dir

    swapped = write_tiny(tmp_path / "swapped")
    (swapped / idx.FILES["train_labels"]).write_bytes(RAW["test_labels"])  # the wrong file of the right set
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte: this is MNIST's t10k-labels-idx1-ubyte, not "
                                        r"MNIST's \(content MD5"):
        datasets.prepare(swapped, tiny(server.url), progress=False)

    damaged = write_tiny(tmp_path / "damaged")
    labels = bytearray(RAW["train_labels"])
    labels[8 + 17] = 3  # one label changed, a valid file all the same
    (damaged / idx.FILES["train_labels"]).write_bytes(bytes(labels))
    with pytest.raises(DataError) as caught:
        datasets.prepare(damaged, tiny(server.url), progress=False)
    assert str(caught.value) == (
        f"{damaged}/train-labels-idx1-ubyte: not MNIST's train-labels-idx1-ubyte (content MD5 "
        f"{hashlib.md5(labels).hexdigest()}, expected {TINY_MD5['train_labels']}) beside MNIST's other files: a "
        f"damaged or replaced file; put MNIST's back, or all four of your own")

    own = write_tiny(tmp_path / "own", keys=("train_images", "train_labels", "test_images"))
    server.serve_tiny()
    with pytest.raises(DataError, match=r"own: missing t10k-labels-idx1-ubyte \(plain or .gz\) and the other files "
                                        r"are not MNIST's, so MNIST's are not downloaded; to use a local copy"):
        datasets.prepare(own, served(datasets.MNIST, server.url), progress=False)
    assert server.requests == []
    write_tiny(own, keys=("test_labels",))
    assert datasets.prepare(own, "mnist", download=False) == str(own)  # the user's own data: the files decide


def test_a_missing_data_dir_is_one_line_and_creates_nothing(server, tmp_path, monkeypatch):
    server.serve_tiny()
    for named in (tmp_path / "typo", tmp_path / "no" / "such" / "dir"):
        with pytest.raises(DataError) as caught:
            datasets.prepare(named, tiny(server.url), progress=False)
        assert str(caught.value).startswith(f"no MNIST files in {named} (no such directory); to use a local copy")
    monkeypatch.setenv("TF_BY_HAND_DATA_DIR", str(tmp_path / "typo"))
    with pytest.raises(DataError, match=r"^no MNIST files in .*/typo \(no such directory\)"):
        datasets.prepare(dataset=tiny(server.url), progress=False)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(DataError, match=r"^no MNIST files in .*/a_file \(not a directory\)"):
        datasets.prepare(tmp_path / "a_file", tiny(server.url), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"] and server.requests == []


def test_checksums_are_remembered_by_size_and_mtime_and_never_written_beside_the_data(tmp_path, monkeypatch):
    from datasets import checksums
    hashed = []
    real_md5 = checksums.content_md5
    monkeypatch.setattr(checksums, "content_md5", lambda path: hashed.append(Path(path).name) or real_md5(path))
    monkeypatch.setattr(checksums, "_memory", {})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    directory = write_tiny(tmp_path / "data")
    dataset = tiny("http://127.0.0.1:9/")
    before = sorted(p.name for p in directory.iterdir())

    datasets.prepare(directory, dataset, download=False)
    assert sorted(hashed) == sorted(idx.FILES.values())
    datasets.prepare(directory, dataset, download=False)  # in memory
    monkeypatch.setattr(checksums, "_memory", {})
    datasets.prepare(directory, dataset, download=False)  # from the cache file: a new process hashes nothing
    assert len(hashed) == 4
    stored = json.loads((tmp_path / "cache" / "tf-by-hand" / "md5.json").read_text())
    labels = directory / idx.FILES["train_labels"]
    assert stored[str(labels)] == [len(RAW["train_labels"]), labels.stat().st_mtime_ns, TINY_MD5["train_labels"]]

    os.utime(labels, ns=(labels.stat().st_atime_ns, labels.stat().st_mtime_ns + 10**9))  # touched: hashed again
    datasets.prepare(directory, dataset, download=False)
    assert hashed[4:] == [idx.FILES["train_labels"]]
    assert sorted(p.name for p in directory.iterdir()) == before

    (tmp_path / "not_a_dir").write_text("x")  # a cache that cannot be written: hashed, no error
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "not_a_dir"))
    monkeypatch.setattr(checksums, "_memory", {})
    assert datasets.prepare(directory, dataset, download=False) == str(directory)
    assert len(hashed) == 9
