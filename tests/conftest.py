"""Shared fixtures: the real MNIST files beside the repository (never downloaded in tests); two logical CPU
devices for the tests of data parallelism (set before any op; every other test runs on /CPU:0 as before).
The suite runs on pytest-xdist's workers, one test file per worker at a time (README): the longest files are
handed out first, and the trained conv model is trained once for all the workers."""
import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / "shared" / "mnist"


def pytest_configure(config):
    """Two logical CPU devices before any op, in each process that runs tests (pytest-xdist's controller, which
    only hands out the files, loads no TensorFlow)."""
    if getattr(config.option, "numprocesses", None) and not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    from core.distribute import configure_cpu_devices  # after the log level, which TensorFlow reads on import
    configure_cpu_devices(2)


def find_mnist():
    """Where the tests read real MNIST, as train.py finds it: $TF_BY_HAND_DATA_DIR, then ../shared/mnist.
    Returns (directory or None, the places looked in)."""
    places = [Path(os.environ["TF_BY_HAND_DATA_DIR"])] if os.environ.get("TF_BY_HAND_DATA_DIR") else []
    places.append(SHARED_MNIST)
    found = next((place for place in places if (place / "train-images-idx3-ubyte.gz").exists()), None)
    return found, places


# The files that take longest, longest first: run first, they leave no long file for one worker alone at the end.
LONGEST_FIRST = ("test_notebooks.py", "test_hardening.py", "test_multi_worker.py", "test_train_cli.py",
                 "test_multi_worker_agreement.py", "test_serve.py", "test_export.py", "test_distribute.py",
                 "test_summaries.py")


def pytest_collection_modifyitems(session, config, items):
    """The files of LONGEST_FIRST first, each file's tests in their order. Under CI=true, a missing MNIST stops
    a run in one process before any test, with one line, when a collected test needs it (instead of one failure
    per test); on pytest-xdist's workers each such test fails with that line (mnist_dir)."""
    rank = {name: k for k, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
    if (os.environ.get("CI", "").lower() != "true" or os.environ.get("PYTEST_XDIST_WORKER")
            or find_mnist()[0] is not None):
        return
    needing = [item for item in items if "mnist_dir" in getattr(item, "fixturenames", ())]
    if needing:
        raise pytest.UsageError(f"{missing_mnist_message()}: {len(needing)} tests need it, and CI=true")


def missing_mnist_message():
    return f"real MNIST not found in {' or '.join(map(str, find_mnist()[1]))} (set TF_BY_HAND_DATA_DIR=DIR)"


@pytest.fixture(scope="session")
def mnist_dir():
    """The directory holding the four gzipped MNIST IDX files. Missing, the test is skipped, except under
    CI=true, where it fails: CI must not pass by skipping what it was meant to check."""
    found = find_mnist()[0]
    if found is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(missing_mnist_message(), pytrace=False)
        pytest.skip(missing_mnist_message())
    return str(found)


@pytest.fixture(scope="session")
def small_mnist(mnist_dir, tmp_path_factory):
    """The first 512 training and 128 test images of MNIST as four gzipped IDX files: the data of runs whose
    assertions need no more (a process reads and evaluates them at once)."""
    import gzip

    import numpy as np

    from datasets import idx

    directory = tmp_path_factory.mktemp("small_mnist")
    for split, count in (("train", 512), ("test", 128)):
        for kind in ("images", "labels"):
            name = idx.FILES[f"{split}_{kind}"] + ".gz"
            raw = gzip.open(os.path.join(mnist_dir, name)).read()
            dims = raw[3]
            shape = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
            examples = np.frombuffer(raw, np.uint8, offset=4 + 4 * dims).reshape(shape)
            idx.write_idx(directory / name, examples[:count])
    return str(directory)


def made_once(tmp_path_factory, name, make):
    """`make(directory)` -> a string, run once in the whole test session, even with pytest-xdist's workers (their
    temporary directories share a parent): the first to ask makes it under a file lock, the others read it."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    directory, made = root / name, root / f"{name}.made"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not made.exists():
            directory.mkdir(exist_ok=True)
            made.write_text(str(make(directory)))
    return made.read_text()


@pytest.fixture(scope="session")
def conv_saved_model(mnist_dir, tmp_path_factory):
    """The codelab's `conv` network trained for 200 steps of 100 real MNIST images (about 97% on the test
    set) with the project's trainer, exported by app.export beside the config.json of its Adam(0.003): its
    SavedModel directory (for serve.py's tests; read only, made once for all the workers)."""
    return made_once(tmp_path_factory, "conv", lambda run_dir: train_conv(mnist_dir, run_dir))


def train_conv(mnist_dir, run_dir):
    """conv_saved_model's model, trained and exported into `run_dir` / "saved_model": its path."""
    import tensorflow as tf

    from app import export
    from core import data, optimizers
    from core.trainer import Runner, Trainer
    from datasets import idx
    from models import REGISTRY

    tf.random.set_seed(1)
    model = REGISTRY["conv"].build(0.0)
    trainer = Trainer(Runner(model, optimizers.Adam(0.003)), progress=False)
    train = idx.load(mnist_dir, "train")
    trainer.fit(lambda epoch: data.training_batches(train, 100, 1, epoch), epochs=1, steps_per_epoch=200)
    # as train.py leaves it: the run's settings beside saved_model/
    (run_dir / "config.json").write_text('{"optimizer": "adam", "learning_rate": 0.003}')
    return export.export_saved_model(model, run_dir / "saved_model")


@pytest.fixture(scope="session")
def serve_url(conv_saved_model):
    """`python serve.py --model_dir=<conv_saved_model> --port=0` running in a subprocess: its URL
    (http://127.0.0.1:<port>/). At the end it must have written nothing on stderr."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    process = subprocess.Popen([sys.executable, str(REPO / "serve.py"), f"--model_dir={conv_saved_model}",
                                "--port=0"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    line = process.stdout.readline()
    if " at http://" not in line:
        process.kill()
        raise AssertionError(f"serve.py did not start: {line!r} {process.stderr.read()[-2000:]}")
    yield line.split(" at ")[1].split()[0]
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    assert process.stderr.read() == ""
