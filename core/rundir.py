"""Run directories: one directory per run, claimed atomically and locked for the life of the process.

    run = claim("runs", name=None, prefix="conv", program="train.py")   # RunDirError: one line
    run.path                      # runs/conv-20260101-120000 (or ...-120000-3f2a if that name was taken)
    write_json(os.path.join(run.path, "config.json"), settings)          # atomic: temp file + rename

- A run directory is marked by its lock file, `run.lock`. A named directory that exists is used only if it
  holds that file (a run of this program) or is empty; anything else is refused, so a user's directory is
  never written into.
- Default names cannot collide: `os.mkdir` is the claim (it fails if the name exists, atomically, across
  processes), and a taken name gets a short random suffix.
- The lock is `fcntl.flock(LOCK_EX)` on `run.lock`, held until `release()` or the process ends in any way
  (the kernel drops it with the file descriptor, even after SIGKILL). The file names its holder (program,
  pid, host, start time), so a second process on the same directory stops at once saying who holds it.
- Before anything runs, the directory and its subdirectories must be writable, and a name must fit the
  file system (PC_NAME_MAX), so these end in one line instead of a failure after training.
- A start that fails before writing anything leaves nothing behind: `discard()` removes a directory the claim
  created that holds only its lock file.
"""
import datetime
import errno
import fcntl
import json
import os
import secrets
import socket

__all__ = ["RunDir", "RunDirError", "RunDirBusy", "claim", "default_name", "read_json", "write_json", "LOCK_FILE"]

LOCK_FILE = "run.lock"
_NAME_ATTEMPTS = 100


class RunDirError(RuntimeError):
    """The run directory cannot be used; the message is one line naming the directory and what to do."""


class RunDirBusy(RunDirError):
    """Another live process holds the run directory's lock."""


class RunDir:
    """A claimed run directory: `path`, whether this process created it (`created`), its lock held until
    `release()` (or the end of the process). Also a context manager that releases on exit."""

    def __init__(self, path, lock_fd, created):
        self.path = path
        self.created = created
        self._lock_fd = lock_fd

    def release(self):
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = None

    def discard(self):
        """Removes the directory if this claim created it and it still holds only its lock file (a start that
        failed before writing anything); returns whether it did. Call it before release()."""
        if not self.created or self._lock_fd is None:
            return False
        try:
            if os.listdir(self.path) != [LOCK_FILE]:
                return False
            os.remove(os.path.join(self.path, LOCK_FILE))
            os.rmdir(self.path)
        except OSError:  # a process that reopened it by name in the meantime keeps it
            return False
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def __repr__(self):
        return f"RunDir({self.path!r}, created={self.created})"


def claim(logdir, name=None, prefix="run", program="python"):
    """Creates or reopens <logdir>/<name> and locks it for this process; returns a RunDir.

    name: an explicit run name (an existing run of this program is reopened, an empty directory adopted,
      anything else refused); None: `<prefix>-<YYYYmmdd-HHMMSS>`, with a random suffix if taken, always new.
    Raises RunDirBusy if another process holds the run, RunDirError for anything else that makes the
    directory unusable (logdir is a file or read-only, name too long, a foreign directory, unwritable parts).
    """
    logdir = os.path.expanduser(os.fspath(logdir))
    _make_logdir(logdir)
    if name is not None:
        _check_name_length(logdir, name)
        path = os.path.join(logdir, name)
        created = _mkdir(path)
        if not created:
            _check_ours(path)
        run = RunDir(path, _lock(path, program), created)
    else:
        run = _claim_new(logdir, default_name(prefix), program)
    try:
        _check_writable(run.path)
    except BaseException:
        run.release()
        raise
    return run


def default_name(prefix):
    """<prefix>-<YYYYmmdd-HHMMSS>, the local time now."""
    return f"{prefix}-{datetime.datetime.now():%Y%m%d-%H%M%S}"


def _claim_new(logdir, base, program):
    """A new directory base, base-<4 hex>, ... : the first that this process both creates and locks."""
    for attempt in range(_NAME_ATTEMPTS):
        path = os.path.join(logdir, base if attempt == 0 else f"{base}-{secrets.token_hex(2)}")
        if not _mkdir(path):
            continue
        try:
            return RunDir(path, _lock(path, program), created=True)
        except RunDirBusy:  # someone reopened it by name between our mkdir and flock: leave it to them
            continue
    raise RunDirError(f"cannot find a free run name like {base} in {logdir}")


def _make_logdir(logdir):
    if os.path.exists(logdir) and not os.path.isdir(logdir):
        raise RunDirError(f"{logdir} is a file, not a directory for runs")
    try:
        os.makedirs(logdir, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"cannot create {logdir}: {e.strerror or e}") from None


def _check_name_length(logdir, name):
    try:
        limit = os.pathconf(logdir, "PC_NAME_MAX")
    except (OSError, ValueError):
        return
    size = len(os.fsencode(name))
    if size > limit:
        raise RunDirError(f"run name {name[:40]}... is {size} bytes; the file system of {logdir} allows {limit}")


def _mkdir(path):
    """True if this call created `path`, False if it exists as a directory; RunDirError otherwise."""
    try:
        os.mkdir(path)
        return True
    except FileExistsError:
        if not os.path.isdir(path):
            raise RunDirError(f"{path} is a file, not a run directory") from None
        return False
    except OSError as e:
        raise RunDirError(f"cannot create {path}: {e.strerror or e}") from None


def _check_ours(path):
    """An existing directory is a run of this program (it holds the lock file) or empty; else RunDirError."""
    if os.path.exists(os.path.join(path, LOCK_FILE)):
        return
    try:
        entries = os.listdir(path)
    except OSError as e:
        raise RunDirError(f"cannot read {path}: {e.strerror or e}") from None
    if entries:
        raise RunDirError(f"{path} exists and is not a run directory (no {LOCK_FILE}); it is left alone: "
                          f"choose another run name")


def _lock(path, program):
    """Opens <path>/run.lock and takes an exclusive flock without waiting; returns the descriptor."""
    lock_path = os.path.join(path, LOCK_FILE)
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise RunDirError(f"cannot create {lock_path}: {e.strerror or e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = _holder(fd)
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
            raise RunDirBusy(f"{path} is in use by {holder or 'another process'}; wait for it to end or "
                             f"choose another run name") from None
        raise RunDirError(f"cannot lock {lock_path}: {e.strerror or e}") from None
    started = datetime.datetime.now().isoformat(timespec="seconds")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{program} pid {os.getpid()} on {socket.gethostname()} since {started}\n".encode(), 0)
    return fd


def _holder(fd):
    """The first line the lock's holder wrote ('' if it has not written it yet)."""
    try:
        return os.pread(fd, 512, 0).decode("utf-8", "replace").strip().splitlines()[0]
    except (OSError, IndexError):
        return ""


def _check_writable(path):
    """The run directory and each of its subdirectories must be writable by this process."""
    for directory in [path] + [entry.path for entry in os.scandir(path) if entry.is_dir()]:
        if not os.access(directory, os.W_OK | os.X_OK):
            raise RunDirError(f"{directory} is not writable")


def read_json(path):
    """The JSON value in `path`, None if there is no such file; RunDirError (one line) if it is damaged."""
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        return None
    except OSError as e:
        raise RunDirError(f"cannot read {path}: {e.strerror or e}") from None
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, nested too deeply
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RunDirError(f"{path} is damaged ({reason}); restore it, or choose another run name") from None


def write_json(path, value):
    """Writes `value` as JSON to `path` atomically (temp file, fsync, rename): a crash leaves the old file or
    the new one, never half of one."""
    text = json.dumps(value, indent=2) + "\n"
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        with open(temporary, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
