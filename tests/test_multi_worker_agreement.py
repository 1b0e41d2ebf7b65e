"""Multi-worker jobs whose workers must agree, on 2 worker processes (MultiWorkerMirroredStrategy on 127.0.0.1):
a worker waits for the others at most --join_timeout, and Ctrl-C ends that wait; workers whose data differ stop
before training with one line; a SIGTERM to one worker stops both at the same step; a port taken by another
program is one line."""
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import tensorflow as tf

from cluster.launch import free_ports, tf_config
from datasets import idx
from test_multi_worker import TIMEOUT, TRAIN, finish, job, read_idx, start


def test_workers_whose_data_differ_stop_before_training_with_one_line(small_mnist, tmp_path):
    """Worker 1's --data_dir holds the first 256 of the 512 training images (and --logdir differs, which it may):
    their settings agree, their data do not, and both stop before training with the same line. (Commands that
    differ: test_config.py, with the exchange played in one process.)"""
    fewer = tmp_path / "fewer"
    fewer.mkdir()
    for name in idx.FILES.values():
        examples = read_idx(os.path.join(small_mnist, name + ".gz"))
        idx.write_idx(fewer / (name + ".gz"), examples[:256] if name.startswith("train") else examples)
    flags = job(small_mnist, tmp_path, "differ")
    commands = [flags, flags + [f"--data_dir={fewer}", f"--logdir={tmp_path / 'elsewhere'}"]]
    addresses = [f"127.0.0.1:{port}" for port in free_ports(2)]
    workers = [subprocess.Popen([sys.executable, TRAIN, *command, "--strategy=multi_worker"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=dict(
                                    os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_CONFIG=tf_config(addresses, index)))
               for index, command in enumerate(commands)]
    try:
        results = [worker.communicate(timeout=TIMEOUT + 60) for worker in workers]
    finally:
        for worker in workers:
            worker.kill()
    line = ("train.py: error: the workers' data differ in training images: every worker must read the same data set "
            "(--data_dir may differ, its files may not)")
    assert [(worker.returncode, err.splitlines()) for worker, (_, err) in zip(workers, results)] == [(1, [line])] * 2


def test_a_signal_to_one_worker_stops_every_worker_at_the_same_step(small_mnist, tmp_path):
    """SIGTERM to worker 1 alone (a scheduler taking back one machine) while the job trains: both workers stop
    at the same step with one line each, the chief's checkpoint holds that step, and both exit 143, which a
    scheduler restarts; the same command then resumes (test_a_lost_worker_stops_the_other_with_one_line_...)."""
    flags = [flag for flag in job(small_mnist, tmp_path, "signal")
             if not flag.startswith(("--epochs", "--steps_per_epoch"))]
    workers = start(flags + ["--epochs=300"])  # 16 steps an epoch: still training long after the first
    try:
        for line in workers[0].stdout:
            if line.startswith("epoch 1/300"):
                break
        workers[1].send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        codes, lines = finish(workers, seconds=TIMEOUT + 60)
    finally:
        for worker in workers:
            worker.kill()
    assert time.monotonic() - signalled < 60
    chief, other = (worker_lines[-1] for worker_lines in lines)
    found = re.match(r"train\.py: stopped by SIGTERM at step ([\d,]+); its checkpoint is in (\S+): resume with the "
                     r"same command$", other)
    assert codes == [143, 143] and found, "\n".join(sum(lines, []))
    step, checkpoint = found.groups()
    assert chief == (f"train.py: stopped at step {step} with worker 1, which was interrupted; its checkpoint is in "
                     f"{checkpoint}: resume with the same command")
    assert Path(checkpoint).parent == tmp_path / "signal" / "checkpoints"
    reader = tf.train.load_checkpoint(checkpoint)
    assert int(reader.get_tensor("optimizer/step/.ATTRIBUTES/VARIABLE_VALUE")) == int(step.replace(",", "")) >= 16


def test_a_worker_waits_for_the_others_at_most_join_timeout_and_a_signal_ends_the_wait(tmp_path):
    """Workers started alone, their peers never: the leader (worker 0) and another (worker 1) each stop after
    --join_timeout with one line naming the worker that never came; a third, waiting with a long timeout,
    ends at once on Ctrl-C (TensorFlow's wait holds the interpreter, so no Python handler could run: SIGINT keeps
    the system's action, ending the process; SIGTERM goes to TensorFlow's preemption notifier meanwhile)."""
    clusters = [[f"127.0.0.1:{port}" for port in free_ports(2)] for _ in range(3)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    command = [sys.executable, TRAIN, "--model=dense", "--strategy=multi_worker", "--run_name=j",
               f"--logdir={tmp_path}"]
    lone = [subprocess.Popen(command + [f"--join_timeout={seconds}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=dict(env, TF_CONFIG=tf_config(addresses, index)))
            for addresses, index, seconds in zip(clusters, (0, 1, 1), (1, 1, 600))]
    try:
        waiting = clusters[2][1].rsplit(":", 1)
        for _ in range(600):  # its server listens once TensorFlow is in the wait
            try:
                socket.create_connection((waiting[0], int(waiting[1])), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        lone[2].send_signal(signal.SIGINT)
        signalled = time.monotonic()
        assert lone[2].wait(timeout=30) == -signal.SIGINT and time.monotonic() - signalled < 10
        for process, addresses, missing in zip(lone, clusters, (1, 0)):
            _, err = process.communicate(timeout=120)
            assert (process.returncode, err.splitlines()) == (2, [
                f"train.py: error: worker {missing} ({addresses[missing]}) did not join within --join_timeout=1 s; "
                f"start every worker of TF_CONFIG with the same command"]), err
    finally:
        for process in lone:
            process.kill()


def test_a_port_taken_by_another_program_is_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_CONFIG=tf_config([address, "127.0.0.1:1"], 0))
        result = subprocess.run([sys.executable, TRAIN, "--model=dense", "--strategy=multi_worker", "--run_name=p",
                                 f"--logdir={tmp_path}"], env=env, capture_output=True, text=True, timeout=120)
    port = address.split(":")[1]
    assert (result.returncode, result.stderr.splitlines()) == (2, [
        f"train.py: error: cannot start the server of worker 0 at {address} (TF_CONFIG): port {port} is in use by "
        f"another program"]), result.stderr
