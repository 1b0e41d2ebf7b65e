"""Start N training workers on this machine, the way a cluster would: one process per worker, each with
its own TF_CONFIG naming every worker's address and its own index.

    python -m cluster.launch --workers=2 -- --model=conv_bn --epochs=1

runs `python train.py --model=conv_bn --epochs=1 --strategy=multi_worker --run_name=<shared>` twice, on
127.0.0.1 with free ports, prints each worker's output prefixed with its index ("[worker 1] ..."), and
reports every worker's end ("[launch] worker 1 exited with status 3") the moment it happens.

- A worker that fails: the others get `--grace_seconds` to stop on their own (a collective that lost its
  peer fails within --collective_timeout), then are killed. The launcher exits with the first failure's status.
- SIGTERM or SIGINT to the launcher: passed on to every worker (train.py checkpoints where it is and exits),
  the same grace, then the launcher exits with 143 or 130. A second signal is passed on too.
- No worker outlives the launcher: each runs in its own process group, killed as a whole, and the kernel
  kills it when the launcher dies, even by SIGKILL (Linux's PR_SET_PDEATHSIG).
- --workers is bounded by the machine: one worker per core and WORKER_MEMORY each.
On a real cluster the scheduler does this job; docs/distributed.md shows the TF_CONFIG it must set.
"""
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from absl import app, flags

PROGRAM = "cluster.launch"
FLAGS = flags.FLAGS
flags.DEFINE_integer("workers", 2, "Number of worker processes (at most one per core and per "
                     "2 GB of memory).")
flags.DEFINE_string("program", "train.py", "The training program every worker runs.")
flags.DEFINE_float("grace_seconds", 120.0, "After a worker fails, or the launcher gets SIGTERM or SIGINT, how "
                   "long the workers may take to stop before they are killed.")
# At most 1e6 s (about 11.6 days), and a number: infinity or NaN would never kill a worker that does not stop.
flags.register_validator("grace_seconds", lambda seconds: 0 <= seconds <= 1e6,
                         message="--grace_seconds must be between 0 and 1e6 seconds")

# Memory one worker may need: train.py --model=conv_bn on MNIST peaked at 1.6 GB.
WORKER_MEMORY = 2 * 2**30
# Run by each worker before its program: the kernel sends it SIGKILL when the thread that started it ends
# (prctl PR_SET_PDEATHSIG = 1, kept across exec), and it ends at once if the launcher is already gone.
# In a process of its own, before any thread exists, unlike a preexec_fn run in a copy of a threaded launcher.
ORPHAN_GUARD = ("import ctypes, os, signal, sys\n"
                "prctl = getattr(ctypes.CDLL(None), 'prctl', None)\n"
                "prctl and prctl(1, signal.SIGKILL)\n"
                "os.getppid() == int(sys.argv[1]) or os._exit(1)\n"
                "os.execvp(sys.argv[2], sys.argv[2:])\n")


class LaunchError(Exception):
    """A launch that cannot start (one line)."""


def free_ports(count, host="127.0.0.1"):
    """`count` distinct TCP ports that were free on `host` a moment ago (bound to port 0, then released).
    Another program may take one before its worker listens there: that worker then stops with one line
    naming the port (core.distribute.server_failure), and the launcher stops the others."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def tf_config(addresses, index):
    """The TF_CONFIG of worker `index` in a cluster of workers at `addresses` (worker 0 is the chief)."""
    return json.dumps({"cluster": {"worker": list(addresses)}, "task": {"type": "worker", "index": index}})


def physical_memory():
    """Bytes of memory this machine has."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_workers(count):
    """LaunchError unless 1 <= count <= what this machine can run: one worker per core, WORKER_MEMORY each."""
    if count < 1:
        raise LaunchError(f"--workers must be >= 1, got {count}")
    cores, memory = os.cpu_count() or 1, physical_memory()
    limit = max(1, min(cores, memory // WORKER_MEMORY))
    if count > limit:
        raise LaunchError(f"--workers={count} is more than this machine can run: at most {limit} ({cores} cores, "
                          f"{memory / 2**30:.0f} GB of memory, {WORKER_MEMORY / 2**30:g} GB per worker)")


def start_workers(command, count, host="127.0.0.1", env=None):
    """Starts `count` copies of `command` (argv list), each with its TF_CONFIG, in a process group of its own
    and killed by the kernel if this thread ends first; stdout and stderr of each go to one pipe (text).
    Returns the Popen objects, worker 0 first."""
    addresses = [f"{host}:{port}" for port in free_ports(count, host)]
    guard = [sys.executable, "-c", ORPHAN_GUARD, str(os.getpid())]
    processes = []
    for index in range(count):
        worker_env = dict(os.environ if env is None else env, TF_CONFIG=tf_config(addresses, index))
        # Native ERROR lines of a failed collective repeat what the worker reports in one line.
        worker_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        processes.append(subprocess.Popen(guard + list(command), env=worker_env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                                          bufsize=1, start_new_session=True))
    return processes


def _relay(index, process, out):
    for line in process.stdout:
        out(f"[worker {index}] {line.rstrip()}")


def _has_flag(args, name):
    return any(arg == f"--{name}" or arg.startswith(f"--{name}=") or arg == f"--no{name}" for arg in args)


def worker_command(program, args, now=None):
    """[python, program, *args] plus --strategy=multi_worker, one shared --run_name (every worker must name
    the same run) and --noprogress (bars from N processes would interleave), unless given."""
    args = list(args)
    if not _has_flag(args, "strategy"):
        args.append("--strategy=multi_worker")
    if not _has_flag(args, "run_name"):
        model = next((arg.split("=", 1)[1] for arg in args if arg.startswith("--model=")), "conv")
        args.append(f"--run_name={model}-{now or datetime.datetime.now():%Y%m%d-%H%M%S}")
    if not _has_flag(args, "progress"):
        args.append("--noprogress")
    return [sys.executable, program] + args


def exit_status(returncode):
    """A Popen returncode as a shell reports it: -s (ended by signal s) -> 128 + s."""
    return 128 - returncode if returncode < 0 else returncode


def describe_exit(index, returncode):
    if returncode < 0:
        return f"worker {index} was killed by {signal.Signals(-returncode).name}"
    return f"worker {index} exited with status {returncode}"


def _signal_group(process, signum):
    """Sends `signum` to the worker's process group (the worker and anything it started)."""
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass


class Signals:
    """While active, SIGTERM and SIGINT to this process are recorded (`received`, oldest first) instead of
    ending it, so the supervisor can pass them on."""

    def __init__(self):
        self.received = []
        self._previous = {}

    def __enter__(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, lambda signum, frame: self.received.append(signum))
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def supervise(processes, grace_seconds, out=print, signals=None):
    """Relays every worker's lines and reports each worker's end as it happens; returns the exit status.

    Once a worker fails, the others get `grace_seconds` to stop on their own, then are killed. Each signal in
    `signals.received` (a Signals) is passed on to every worker still running, with the same grace; the status
    is then 128 + the first signal's number, else the first failure's (0 if none)."""
    lock = threading.Lock()

    def say(line):
        with lock:
            out(line)

    relays = [threading.Thread(target=_relay, args=(i, p, say), daemon=True) for i, p in enumerate(processes)]
    for relay in relays:
        relay.start()
    received = signals.received if signals is not None else []
    passed_on, failure, deadline, why, ended = 0, 0, None, None, [False] * len(processes)
    try:
        while not all(ended):
            for signum in received[passed_on:]:
                name = signal.Signals(signum).name
                say(f"[launch] {name}: passed on to every worker")
                for index, process in enumerate(processes):
                    if not ended[index]:
                        _signal_group(process, signum)
                if deadline is None:
                    deadline, why = time.monotonic() + grace_seconds, name
                passed_on += 1
            for index, process in enumerate(processes):  # every worker, every time: any of them may end first
                if ended[index] or process.poll() is None:
                    continue
                ended[index] = True
                relays[index].join(timeout=2)  # its last lines before the line that says it ended
                say(f"[launch] {describe_exit(index, process.returncode)}")
                if process.returncode and not failure:
                    failure = exit_status(process.returncode)
                    if deadline is None:
                        deadline, why = time.monotonic() + grace_seconds, f"worker {index} failed"
            if deadline is not None and time.monotonic() > deadline:
                for index, process in enumerate(processes):
                    if not ended[index] and process.poll() is None:
                        say(f"[launch] worker {index} still running {grace_seconds:g} s after {why}: killed")
                        _signal_group(process, signal.SIGKILL)
                deadline = float("inf")
            time.sleep(0.05)
    finally:
        for process in processes:
            if process.poll() is None:
                _signal_group(process, signal.SIGKILL)
                process.wait()
    for relay in relays:
        relay.join(timeout=2)
    return 128 + received[0] if received else failure


def parse_flags(argv):
    """absl's parser, with a bad value or an unknown flag reported as one line and exit code 2."""
    try:
        return FLAGS(argv)
    except flags.Error as error:
        hint = "; the program's own flags go after --" if isinstance(error, flags.UnrecognizedFlagError) else ""
        print(f"{PROGRAM}: error: {error}{hint}", file=sys.stderr)
        sys.exit(2)


def main(argv):
    try:
        check_workers(FLAGS.workers)
    except LaunchError as error:
        print(f"{PROGRAM}: error: {error}", file=sys.stderr)
        return 2
    with Signals() as signals:
        processes = start_workers(worker_command(FLAGS.program, argv[1:]), FLAGS.workers)
        return supervise(processes, FLAGS.grace_seconds, signals=signals)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
