"""Checkpoints that survive a crash and refuse to half-restore.

A `Checkpointer` wraps `tf.train.Checkpoint` + `tf.train.CheckpointManager`:

- save():    ckpt-<n>.data/.index are written first (through a `ckpt-<n>_temp/` shard directory that is
             merged at the end); only then is the small `checkpoint` index file rewritten, atomically
             (temp file + rename). A crash before that leaves `checkpoint` naming the previous save.
             A failed write (a full disk) raises CheckpointWriteError; the previous checkpoint stays.
- restore(): takes the checkpoint named by `checkpoint`; if its files are missing or unreadable
             (truncated, deleted), it falls back to the next older one the manager keeps, then to any other
             ckpt-<n>.index on disk (and raises CheckpointUnreadableError if none is readable, rather than
             silently start over). Before any value is assigned, the names, shapes and dtypes stored in the
             checkpoint are compared with what this model and optimizer would save; a difference raises one
             clear `CheckpointMismatchError` (a ValueError) instead of a silent partial restore.
- opening:   `ckpt-<n>_temp/` shard directories left by a killed save are removed, and a `checkpoint` state
             file that TensorFlow cannot read (garbage, binary, empty) is set aside as `checkpoint.damaged`
             and rebuilt from the ckpt-<n>.index files themselves: TensorFlow would otherwise ignore it and
             the run would start over, writing over its own checkpoints.

One process writes a directory at a time (train.py holds a lock on the run directory).
"""
import logging
import os
import re
import shutil
import tempfile

import tensorflow as tf

__all__ = ["Checkpointer", "CheckpointMismatchError", "CheckpointUnreadableError", "CheckpointWriteError",
           "variable_specs", "describe_mismatch", "holds_checkpoints", "on_disk"]

_log = logging.getLogger(__name__)

# Bookkeeping entries of every TF2 checkpoint, not part of the model's state.
_IGNORED_KEYS = ("_CHECKPOINTABLE_OBJECT_GRAPH", "save_counter/.ATTRIBUTES/VARIABLE_VALUE")
_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
_PREFIX = "ckpt"  # tf.train.CheckpointManager's default checkpoint_name
_STATE = "checkpoint"  # TensorFlow's state file, naming the committed checkpoints
_INDEX = re.compile(rf"^{_PREFIX}-(\d+)\.index$")
_TEMP = re.compile(rf"^{_PREFIX}-\d+_temp$")


class CheckpointMismatchError(ValueError):
    """The checkpoint on disk was written by a different model, optimizer or trainer."""


class CheckpointUnreadableError(RuntimeError):
    """Checkpoints were committed in the directory but none of them can be read."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (full disk, read-only file system); the previous one is kept."""


def on_disk(directory):
    """Prefixes of the ckpt-<n>.index files in `directory`, newest (highest n) first."""
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    numbers = sorted((int(m.group(1)) for m in map(_INDEX.match, names) if m), reverse=True)
    return [os.path.join(directory, f"{_PREFIX}-{n}") for n in numbers]


def holds_checkpoints(directory):
    """Does `directory` hold checkpoints (a state file or any ckpt-<n>.index), readable or not?"""
    return os.path.exists(os.path.join(directory, _STATE)) or bool(on_disk(directory))


def _readable_state(directory):
    """TensorFlow's CheckpointState of `directory`, or None if the state file is missing or unreadable."""
    quiet = tf.get_logger()
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # it logs a parse error as a warning and then ignores the file
    try:
        state = tf.train.get_checkpoint_state(directory)
    except Exception:  # binary (UnicodeDecodeError), empty (ValueError)
        return None
    finally:
        quiet.setLevel(level)
    return state if state is not None and state.model_checkpoint_path else None


def _repair(directory):
    """Removes shard directories of killed saves; rebuilds an unreadable state file from the index files."""
    for name in os.listdir(directory):
        if _TEMP.match(name) and os.path.isdir(os.path.join(directory, name)):
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    found = on_disk(directory)
    if not found or _readable_state(directory) is not None:
        return
    state_file = os.path.join(directory, _STATE)
    if os.path.exists(state_file):
        os.replace(state_file, state_file + ".damaged")
    oldest_first = list(reversed(found))
    times = [os.path.getmtime(path + ".index") for path in oldest_first]
    lines = [f'model_checkpoint_path: "{os.path.basename(found[0])}"']
    lines += [f'all_model_checkpoint_paths: "{os.path.basename(path)}"' for path in oldest_first]
    lines += [f"all_model_checkpoint_timestamps: {t!r}" for t in times]
    lines += [f"last_preserved_timestamp: {min(times) - 1.0!r}"]
    temporary = state_file + ".tmp"
    with open(temporary, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(temporary, state_file)
    _log.warning("%s was unreadable (kept as %s.damaged); rebuilt from %d checkpoint file(s), newest %s",
                 state_file, _STATE, len(found), os.path.basename(found[0]))


def variable_specs(path):
    """{key: (shape, dtype name)} of every tensor stored in the checkpoint `path` (a prefix)."""
    reader = tf.train.load_checkpoint(path)
    shapes = reader.get_variable_to_shape_map()
    dtypes = reader.get_variable_to_dtype_map()
    return {key: (tuple(shapes[key]), dtypes[key].name) for key in shapes if key not in _IGNORED_KEYS}


def _readable(key):
    """'model/layers/1/w/.ATTRIBUTES/VARIABLE_VALUE' -> 'model/layers/1/w'."""
    return key[: -len(_SUFFIX)] if key.endswith(_SUFFIX) else key


def describe_mismatch(expected, found):
    """One line naming how the stored specs `found` differ from the `expected` ones, or None if equal."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    different = sorted(key for key in set(expected) & set(found) if expected[key] != found[key])
    parts = []
    if different:
        key = different[0]
        parts.append(f"{_readable(key)} is {list(found[key][0])} {found[key][1]} in the checkpoint but "
                     f"{list(expected[key][0])} {expected[key][1]} here"
                     + (f" (and {len(different) - 1} more)" if len(different) > 1 else ""))
    if missing:
        parts.append(f"{len(missing)} variable(s) missing from the checkpoint, e.g. {_readable(missing[0])}")
    if unexpected:
        parts.append(f"{len(unexpected)} unknown variable(s) in the checkpoint, e.g. {_readable(unexpected[0])}")
    return "; ".join(parts) or None


class Checkpointer:
    """Saves and restores `objects` (keyword -> trackable) in `directory`, keeping the last `keep`.

    Checkpoints are numbered by the checkpoint's own save counter (ckpt-1, ckpt-2, ...), which is
    itself saved, so numbers never repeat within a run and no save overwrites a committed one.
    With `write_directory` (a distributed run's non-chief worker), saves go there and restores still
    read `directory`.
    """

    def __init__(self, directory, keep=3, write_directory=None, **objects):
        self.directory = os.fspath(directory)
        if os.path.isdir(self.directory):
            _repair(self.directory)
        self.checkpoint = tf.train.Checkpoint(**objects)
        self.manager = tf.train.CheckpointManager(self.checkpoint, os.fspath(write_directory or directory),
                                                  max_to_keep=keep)

    @property
    def latest(self):
        """The prefix of the newest committed checkpoint, or None."""
        return self.manager.latest_checkpoint

    def save(self):
        """Writes a new checkpoint and returns its prefix; CheckpointWriteError (one line) if it cannot be
        written, with the previous checkpoint left as it was."""
        previous = self.latest
        try:
            return self.manager.save()
        except (OSError, tf.errors.OpError) as error:
            for name in os.listdir(self.directory):
                if _TEMP.match(name):
                    shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
            reason = getattr(error, "strerror", None) or _first_line(getattr(error, "message", None) or error)
            kept = f"the previous checkpoint {previous} is kept" if previous else "no checkpoint was saved yet"
            raise CheckpointWriteError(f"cannot save a checkpoint in {self.directory} ({reason}); {kept}") from None

    def expected_specs(self):
        """What this process would save: {key: (shape, dtype)}, from a throwaway write to a temp dir."""
        with tempfile.TemporaryDirectory(prefix="tf-by-hand-ckpt-") as scratch:
            return variable_specs(self.checkpoint.write(os.path.join(scratch, "probe")))

    def candidates(self):
        """Checkpoints to try, best first: the one the state file names, the older ones it keeps, then any
        other ckpt-<n>.index on disk (newest first)."""
        state = _readable_state(self.directory)  # its paths already start with self.directory, relative or not
        paths = [state.model_checkpoint_path] + list(reversed(state.all_model_checkpoint_paths)) if state else []
        return list(dict.fromkeys(os.path.normpath(path) for path in paths + on_disk(self.directory)))

    def restore(self):
        """Restores the newest readable checkpoint and returns its prefix (None if none was ever committed).

        Raises CheckpointMismatchError when a readable checkpoint does not match these objects, and
        CheckpointUnreadableError when checkpoints were committed but none of them can be read.
        """
        expected = None
        failures = []
        for path in self.candidates():
            try:
                found = variable_specs(path)
            except Exception as error:  # a missing or damaged .index file
                failures.append(_warn_unreadable(path, error))
                continue
            if expected is None:
                expected = self.expected_specs()
            problem = describe_mismatch(expected, found)
            if problem:
                raise _mismatch(path, problem)
            try:
                status = self.checkpoint.restore(path)
            except Exception as error:  # names and shapes matched, so the data file is damaged
                failures.append(_warn_unreadable(path, error))
                continue
            try:
                status.assert_consumed()
            except AssertionError as error:
                raise _mismatch(path, _first_line(error) or "unmatched objects") from None
            return path
        if failures:
            raise CheckpointUnreadableError(f"no readable checkpoint in {self.directory}: " + "; ".join(failures))
        return None


def _first_line(error):
    """The first line of the error's message ('' if it has none)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""


def _mismatch(path, problem):
    return CheckpointMismatchError(f"checkpoint {path} does not match this model/optimizer: {problem}")


def _warn_unreadable(path, error):
    first = _first_line(error)
    reason = f"{type(error).__name__}: {first}" if first else type(error).__name__
    _log.warning("checkpoint %s is unreadable (%s); trying an older one", path, reason)
    return f"{os.path.basename(path)} ({reason})"
