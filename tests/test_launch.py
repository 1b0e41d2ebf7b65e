"""cluster/launch.py and core/interrupts.py without TensorFlow: TF_CONFIG per worker, free ports, prefixed output;
every worker's end seen at once, the others stopped after the grace period; SIGTERM and SIGINT passed on; no
worker outlives the launcher, even killed by SIGKILL; --workers bounded by the machine; a second signal always
ends a process. The workers are small Python programs; every process is bounded in time."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster import launch
from cluster.launch import free_ports, tf_config, worker_command

REPO = Path(__file__).resolve().parents[1]

# A worker: prints its TF_CONFIG and arguments, writes its pid, then ends as `codes[index]` says: an exit
# status, or "wait" (until a signal: it reports the signal and exits with 128 + its number, as train.py does).
WORKER = """
import json, os, signal, sys, time
config = json.loads(os.environ["TF_CONFIG"])
index = config["task"]["index"]
open({pids!r} + f"/{{index}}", "w").write(str(os.getpid()))
def stop(signum, frame):
    print("got", signal.Signals(signum).name, flush=True)
    sys.exit(128 + signum)
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
print("workers", ",".join(config["cluster"]["worker"]), "args", " ".join(sys.argv[1:]), flush=True)
code = {codes}[index]
if code == "wait":
    time.sleep(60)
sys.exit(code)
"""


class Launch:
    """`python -m cluster.launch --workers=len(codes) --program=<WORKER>` running; `pids()` of its workers."""

    def __init__(self, tmp_path, codes, *args, grace=30):
        self.pid_dir = tmp_path / "pids"
        self.pid_dir.mkdir()
        program = tmp_path / "worker.py"
        program.write_text(WORKER.format(codes=codes, pids=str(self.pid_dir)))
        self.count = len(codes)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cluster.launch", f"--workers={len(codes)}", f"--program={program}",
             f"--grace_seconds={grace}", "--", *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        self.lines = []

    def wait_for_workers(self):
        """Reads the launcher's output until every worker has started."""
        while sum(" workers 127.0.0.1" in line for line in self.lines) < self.count:
            line = self.process.stdout.readline()
            assert line, "the launcher ended early:\n" + "".join(self.lines)
            self.lines.append(line)

    def finish(self, seconds=20):
        """(exit status, stdout lines, stderr) once the launcher ends, within `seconds`."""
        out, err = self.process.communicate(timeout=seconds)
        return self.process.returncode, [line.rstrip() for line in self.lines + out.splitlines(True)], err

    def pids(self):
        return [int(path.read_text()) for path in sorted(self.pid_dir.iterdir()) if path.read_text()]

    def cleanup(self):
        self.process.kill()
        self.process.wait()
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def launched(tmp_path):
    launches = []

    def start(codes, *args, grace=30):
        directory = tmp_path / str(len(launches))
        directory.mkdir()
        launches.append(Launch(directory, codes, *args, grace=grace))
        return launches[-1]

    yield start
    for each in launches:
        each.cleanup()


def alive(pid):
    """Is `pid` a live process (not a zombie)?"""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_until(condition, seconds=10):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


def test_each_worker_gets_its_tf_config_and_a_prefix(launched):
    code, lines, err = launched([0, 0], "--model=dense").finish()
    assert code == 0, err
    started = sorted(line for line in lines if " workers " in line)
    assert [line.split(" ", 2)[:2] for line in started] == [["[worker", "0]"], ["[worker", "1]"]]
    addresses = {line.split()[3] for line in started}
    assert len(addresses) == 1 and len(set(addresses.pop().split(","))) == 2
    assert all("--model=dense --strategy=multi_worker --run_name=dense-" in line and "--noprogress" in line
               for line in started)
    assert sorted(line for line in lines if line.startswith("[launch]")) == [
        "[launch] worker 0 exited with status 0", "[launch] worker 1 exited with status 0"]


def test_any_worker_that_fails_is_named_at_once_and_the_others_stopped(launched):
    """Worker 0 waits (as in a collective whose peer is gone) while worker 1 fails at start: the launcher sees
    worker 1 at once, gives worker 0 the grace period, kills it and exits with worker 1's status."""
    started = time.monotonic()
    run = launched(["wait", 3], grace=1)
    code, lines, err = run.finish()
    assert code == 3, err
    assert time.monotonic() - started < 15
    assert [line for line in lines if line.startswith("[launch]")] == [
        "[launch] worker 1 exited with status 3",
        "[launch] worker 0 still running 1 s after worker 1 failed: killed",
        "[launch] worker 0 was killed by SIGKILL"]
    assert not any(alive(pid) for pid in run.pids())


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_to_the_launcher_reaches_every_worker(launched, signum, status):
    run = launched(["wait", "wait"])
    run.wait_for_workers()
    run.process.send_signal(signum)
    code, lines, err = run.finish()
    name = signal.Signals(signum).name
    assert code == status, err
    assert sorted(line for line in lines if line.endswith(f"got {name}")) == [
        f"[worker 0] got {name}", f"[worker 1] got {name}"]
    assert sorted(line for line in lines if line.startswith("[launch]")) == [
        f"[launch] {name}: passed on to every worker",
        f"[launch] worker 0 exited with status {status}", f"[launch] worker 1 exited with status {status}"]
    assert err == ""


def test_no_worker_outlives_a_killed_launcher(launched):
    run = launched(["wait", "wait"])
    run.wait_for_workers()
    pids = run.pids()
    assert len(pids) == 2 and all(alive(pid) for pid in pids)
    run.process.kill()
    assert wait_until(lambda: not any(alive(pid) for pid in pids)), "a worker outlived the launcher"


def test_workers_are_bounded_by_the_machine(monkeypatch):
    monkeypatch.setattr(launch.os, "cpu_count", lambda: 64)
    monkeypatch.setattr(launch, "physical_memory", lambda: 8 * 2**30)
    launch.check_workers(4)
    with pytest.raises(launch.LaunchError, match=r"^--workers=5 is more than this machine can run: at most 4 "
                                                 r"\(64 cores, 8 GB of memory, 2 GB per worker\)$"):
        launch.check_workers(5)
    monkeypatch.setattr(launch.os, "cpu_count", lambda: 2)
    with pytest.raises(launch.LaunchError, match=r"at most 2 \(2 cores, 8 GB"):
        launch.check_workers(3)
    with pytest.raises(launch.LaunchError, match=r"^--workers must be >= 1, got 0$"):
        launch.check_workers(0)


@pytest.mark.parametrize("flag, message", [
    ("--workers=abc", "cluster.launch: error: flag --workers=abc: invalid literal for int() with base 10: 'abc'"),
    ("--model=conv", "cluster.launch: error: Unknown command line flag 'model'; the program's own flags go after --"),
    ("--grace_seconds=inf", "cluster.launch: error: flag --grace_seconds=inf: --grace_seconds must be between 0 and "
                            "1e6 seconds"),
    ("--grace_seconds=nan", "cluster.launch: error: flag --grace_seconds=nan: --grace_seconds must be between 0 and "
                            "1e6 seconds")])
def test_a_bad_flag_is_one_line(flag, message):
    result = subprocess.run([sys.executable, "-m", "cluster.launch", flag], cwd=REPO, capture_output=True,
                            text=True, timeout=30)
    assert (result.returncode, result.stdout, result.stderr) == (2, "", message + "\n")


def test_tf_config_and_command():
    ports = free_ports(3)
    assert len(set(ports)) == 3
    config = json.loads(tf_config(["127.0.0.1:1", "127.0.0.1:2"], 1))
    assert config == {"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, "task": {"type": "worker", "index": 1}}
    command = worker_command("train.py", ["--run_name=x", "--progress", "--strategy=default"])
    assert command[1:] == ["train.py", "--run_name=x", "--progress", "--strategy=default"]
    assert os.path.basename(command[0]).startswith("python")


# ------------------------------------------------------------------------------------ core/interrupts.py

SWALLOWED = """
import os, signal, sys, time
sys.path.insert(0, {repo!r})
from core.interrupts import StopOnSignal

class Collected:
    def __del__(self):  # the second signal's Interrupt is raised in here, where Python swallows it
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)

with StopOnSignal() as stop:
    Collected()
    print("after", stop.name, flush=True)
    time.sleep(30)
"""

BLOCKED = """
import ctypes, signal, sys
sys.path.insert(0, {repo!r})
from core.interrupts import StopOnSignal

with StopOnSignal():
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT, signal.SIGTERM])  # delivered to another thread
    print("blocked", flush=True)
    ctypes.CDLL(None).sleep(30)  # one long native call: the main thread runs no handler until it returns
"""


@pytest.mark.parametrize("script, signals", [(SWALLOWED, 0), (BLOCKED, 2)], ids=["swallowed", "blocked"])
def test_a_second_signal_always_ends_the_process(script, signals):
    """The second SIGTERM's Interrupt swallowed in a __del__, or never raised because the main thread is in one
    long native call: the process still ends within the final grace period, with 143 and one line."""
    process = subprocess.Popen([sys.executable, "-c", script.format(repo=str(REPO))], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        first = process.stdout.readline()
        started = time.monotonic()
        for _ in range(signals):
            process.send_signal(signal.SIGTERM)
            time.sleep(0.2)
        try:
            out, err = process.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            pytest.fail("the process outlived a second SIGTERM by 15 s")
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 143 and time.monotonic() - started < 10
    assert first == ("after SIGTERM\n" if script is SWALLOWED else "blocked\n")
    assert err.splitlines()[-1] == ("-c: error: interrupted again (SIGTERM): stopped at once; checkpoints already "
                                    "written are kept")
