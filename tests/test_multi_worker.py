"""train.py on 2 worker processes (MultiWorkerMirroredStrategy on 127.0.0.1, TF_CONFIG and free ports from
cluster/launch.py): killing a worker stops the other with one line; restarting the job resumes, and both workers
end with identical weights, equal to one process trained straight at the same global batch; every model family
(dense, conv, conv_bn with its per-worker BatchNorm statistics) exports a SavedModel that scores what the
checkpoint restored in one process scores. Each training job is a few steps on the first 512 MNIST training
images; one job serves the kill, the resume and the equality. The workers' agreements (joining, the same
command and data, stopping together): test_multi_worker_agreement.py."""
import gzip
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from app import export
from cluster.launch import start_workers, worker_command
from datasets import idx
from models import REGISTRY

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "train.py")
TIMEOUT = 120  # --collective_timeout, seconds: longer than any pause between two steps on a busy machine
FLAGS = ["--model=dense", "--optimizer=sgd", "--learning_rate=0.1", "--batch_size=32", "--epochs=2",
         "--steps_per_epoch=2", "--noprogress", f"--collective_timeout={TIMEOUT}"]
# Every worker of `python -m cluster.launch --program=<this>`: builds each family under the strategy with the
# same random weights on every worker and BatchNorm statistics of its own (as training leaves them), then, as
# train.py does, saves a checkpoint and exports (both read every worker; the chief writes, the others write
# a temporary copy); then worker 1 alone asks in a WorkerVote, and each gives its row of a WorkerTable.
EXPORTER = """
import os, sys
sys.path.insert(0, {repo!r})
import numpy as np
import tensorflow as tf
from app import export
from core import distribute
from models import REGISTRY

import signal, time
handled = []
signal.signal(signal.SIGTERM, lambda signum, frame: handled.append(signum))
strategy = distribute.make_strategy("multi_worker", timeout_seconds={timeout})
os.kill(os.getpid(), signal.SIGTERM)  # TensorFlow's preemption notifier took SIGTERM while joining; no longer
time.sleep(0.5)
print("SIGTERM reaches Python after the join:", handled == [signal.SIGTERM], flush=True)
index = distribute.worker_index(strategy)[0]
writes = distribute.WorkerDirectory({directory!r}, strategy)
for name in ("dense", "conv", "conv_bn"):
    spec = REGISTRY[name]
    with strategy.scope():
        model = spec.build(spec.defaults["dropout"])
        model.build((None, 28, 28, 1))
    same, own = np.random.default_rng(7), np.random.default_rng(index)
    for variable in model.trainable_variables:
        variable.assign(same.normal(0.0, 0.1, variable.shape).astype(np.float32))
    for variable in model.variables:
        if variable.synchronization == tf.VariableSynchronization.ON_READ:
            variable.values[0].assign(own.uniform(0.0, 0.5, variable.shape).astype(np.float32) + (
                1.0 if "variance" in variable.name else 0.0))
    tf.train.Checkpoint(model=model).write(os.path.join(writes.path, name, "ckpt"))
    export.export_saved_model(model, os.path.join(writes.path, name, "saved_model"))
    print("exported", name, flush=True)
writes.cleanup()
print("workers asking:", distribute.WorkerVote(strategy)(index == 1), flush=True)
print("table:", distribute.WorkerTable(strategy, 2)([index, 7]).tolist(), flush=True)
"""


def read_idx(path):
    raw = gzip.open(path).read()
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * dims).reshape(shape)


def job(mnist_dir, logdir, run_name):
    return FLAGS + [f"--data_dir={mnist_dir}", f"--logdir={logdir}", f"--run_name={run_name}"]


def start(args):
    """The 2 workers of `python -m cluster.launch --workers=2 -- <args>`, from the repository root."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return start_workers(worker_command(TRAIN, args), 2, env=env)


def finish(processes, seconds=300):
    """(exit codes, output lines) of every worker."""
    outputs = [process.communicate(timeout=seconds)[0] for process in processes]
    return [process.returncode for process in processes], [output.splitlines() for output in outputs]


def digest(lines):
    return next(re.search(r"weights sha256 (\w+)", line).group(1) for line in lines if "weights sha256" in line)


def model_weights(run_dir):
    """{name: value} of the model's variables in the newest checkpoint of a run."""
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(os.path.join(run_dir, "checkpoints")))
    return {key: reader.get_tensor(key) for key in reader.get_variable_to_shape_map() if key.startswith("model/")}


def in_this_process(args):
    """train.py's run with the settings of the flags `args`, in this process (no strategy): (exit code 0, its
    console lines); a failed run raises."""
    import train
    from absl import flags
    from core import cli
    flag_values = flags.FlagValues()
    train.define_flags(flag_values)
    cli.parse("train.py", ["train.py", *args], flag_values)
    lines = []
    train.run(train.make_config(train.flag_values_given(flag_values)), out=lines.append)
    return 0, lines


@pytest.fixture(scope="module")
def jobs(small_mnist, tmp_path_factory):
    """The dense job on 2 workers, one of them killed after the first of its 2 epochs, then the same command again
    (which resumes); EXPORTER on 2 workers through `python -m cluster.launch` alongside; and the dense job's
    settings in this process (no strategy) while the first job stops. Returns (logdir, {name: (exit codes,
    output lines)}) with the names "lost" (the killed job: the chief's lines, the killed worker's are none),
    "two" (the job resumed), "one" and "exports" (whose files are in logdir / "exports"), and "seconds": from
    the kill until both workers of the first job had ended."""
    logdir = tmp_path_factory.mktemp("multi_worker")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    workers = start(job(small_mnist, logdir, "two"))
    exporter = logdir / "exporter.py"
    exporter.write_text(EXPORTER.format(repo=str(REPO), timeout=TIMEOUT, directory=str(logdir / "exports")))
    launch = subprocess.Popen([sys.executable, "-m", "cluster.launch", "--workers=2", "--grace_seconds=30",
                               f"--program={exporter}"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env)
    try:
        chief_lines = []
        for line in workers[0].stdout:  # the chief prints an epoch's line after that epoch's checkpoint
            chief_lines.append(line.rstrip())
            if line.startswith("epoch 1/2"):
                break
        workers[1].kill()
        killed = time.monotonic()
        single_code, single_lines = in_this_process(job(small_mnist, logdir, "one"))
        codes, (rest, _) = finish(workers, seconds=TIMEOUT + 60)
        seconds = time.monotonic() - killed
        workers = start(job(small_mnist, logdir, "two"))
    finally:
        resumed_codes, resumed_lines = finish(workers)
        export_codes, export_lines = finish([launch])
    return logdir, {"lost": (codes, [chief_lines + rest]), "seconds": seconds, "two": (resumed_codes, resumed_lines),
                    "one": ([single_code], [single_lines]), "exports": (export_codes, export_lines)}


@pytest.fixture(scope="module")
def uninterrupted(jobs):
    """The dense job on 2 workers (lost and resumed) and in one process: (logdir, [chief's lines, other's lines,
    single's lines])."""
    logdir, runs = jobs
    codes, lines = [], []
    for name in ("two", "one"):
        codes += runs[name][0]
        lines += runs[name][1]
    assert codes == [0, 0, 0], "\n".join(sum(lines, []))
    return logdir, lines


def test_two_workers_end_identical_and_equal_to_one_process(uninterrupted):
    logdir, (chief, other, single) = uninterrupted
    assert digest(chief) == digest(other)
    assert "  multi_worker: worker 1 of 2, 2 replicas in all; 16 images per replica; the chief writes the run" in other
    assert not any(line.startswith("saved model:") for line in other)  # only the chief reports (and writes) the run
    two, one = model_weights(logdir / "two"), model_weights(logdir / "one")
    assert sorted(two) == sorted(one) and len(one) == 6
    difference = max(float(np.max(np.abs(two[key] - one[key]))) for key in one)
    assert 0 <= difference < 1e-6
    assert max(float(np.max(np.abs(value))) for value in two.values()) > 0.01


@pytest.mark.parametrize("name", ["dense", "conv", "conv_bn"])
def test_every_family_exports_what_its_checkpoint_restores_in_one_process(jobs, small_mnist, name):
    """The SavedModel the chief exported scores the test images as the model restored from the checkpoint
    without a strategy (conv_bn: the mean of the workers' BatchNorm statistics) scores them."""
    logdir, runs = jobs
    codes, (lines,) = runs["exports"]
    assert f"[worker 0] exported {name}" in lines and f"[worker 1] exported {name}" in lines, "\n".join(lines)
    if name == "conv_bn":  # the last one
        assert codes == [0] and {f"[launch] worker {i} exited with status 0" for i in (0, 1)} <= set(lines)
    model = REGISTRY[name].build(REGISTRY[name].defaults["dropout"])
    model.build((None, 28, 28, 1))
    tf.train.Checkpoint(model=model).read(str(logdir / "exports" / name / "ckpt")).assert_existing_objects_matched()
    images = read_idx(os.path.join(small_mnist, idx.FILES["test_images"] + ".gz")).astype(np.float32) / 255
    probabilities = model.predict(images[..., None]).numpy()
    np.testing.assert_allclose(export.Classifier(logdir / "exports" / name / "saved_model")(images)[0],
                               probabilities, atol=1e-6)
    assert np.ptp(probabilities) > 0.01
    statistics = [v.numpy() for v in model.variables if "moving_mean" in v.name]
    assert len(statistics) == (4 if name == "conv_bn" else 0)
    assert all(0.05 < np.mean(mean) < 0.45 for mean in statistics)  # the mean of two workers' uniform(0, 0.5)


def test_every_worker_hears_the_vote_of_one_gets_every_row_of_a_table_and_its_own_sigterm(jobs):
    _, runs = jobs
    lines = runs["exports"][1][0]
    assert {"[worker 0] workers asking: [1]", "[worker 1] workers asking: [1]"} <= set(lines), "\n".join(lines)
    assert {f"[worker {i}] table: [[0.0, 7.0], [1.0, 7.0]]" for i in (0, 1)} <= set(lines), "\n".join(lines)
    assert {f"[worker {i}] SIGTERM reaches Python after the join: True" for i in (0, 1)} <= set(lines)


def test_a_lost_worker_stops_the_other_with_one_line_and_the_job_resumes(jobs, uninterrupted):
    """The killed job's chief ends with one line; the same command then resumes and ends as one process does
    (test_two_workers_end_identical_and_equal_to_one_process)."""
    _, runs = jobs
    codes, (lines,) = runs["lost"]
    assert runs["seconds"] < TIMEOUT + 60
    errors = [line for line in lines if line.startswith("train.py: error:")]
    assert codes[0] == 1 and len(errors) == 1, "\n".join(lines)
    assert re.match(r"train\.py: error: lost worker 1 \(127\.0\.0\.1:\d+\): a collective operation failed", errors[0])
    assert not any("Traceback" in line for line in lines)
    chief, other, single = uninterrupted[1]
    assert any("(resuming from its checkpoint)" in line for line in chief)
    assert not any("(resuming from its checkpoint)" in line for line in single)
    assert digest(chief) == digest(other)
