"""Checkpoints and exact resume: what a checkpoint holds, resuming after a clean stop, a mid-epoch
crash, a mid-epoch stop and a SIGTERM or Ctrl-C give bit-for-bit the uninterrupted run; a crash before the
index is written or a damaged newest checkpoint falls back to the previous one; an unreadable state file is
rebuilt from the checkpoint files; a full disk keeps the previous checkpoint; a different model's
checkpoint is a clear one-line error and restores nothing."""
import errno
import glob
import json
import os
import signal

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.checkpoint import checkpoint_management

from core.checkpoint import (CheckpointMismatchError, CheckpointUnreadableError, CheckpointWriteError,
                             holds_checkpoints, on_disk)
from core.interrupts import Interrupt, StopOnSignal
from core.layers import Dense, Dropout, Flatten, Sequential
from core.optimizers import SGD, Adam
from core.schedules import ExponentialDecay
from core.trainer import Callback, Runner, Trainer
from stop_at import StopAt

EXAMPLES, BATCH, STEPS = 256, 32, 8  # 8 steps per epoch


def synthetic(examples=EXAMPLES, seed=0):
    """Images [N,8,8,1] of noise; the quarter (2 rows) numbered by the label is brighter."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, examples).astype(np.int32)
    images = rng.random((examples, 4, 16), dtype=np.float32) * 0.7
    images[np.arange(examples), labels] += 0.3
    return images.reshape(examples, 8, 8, 1), labels


IMAGES, LABELS = synthetic()
VALIDATION = tf.data.Dataset.from_tensor_slices(synthetic(128, seed=1)).batch(64)


def train_data(epoch):
    """One epoch of batches whose order depends on the epoch only (not on TF's global seed, which
    the resumed trainers below set differently to prove that the restore, not the seed, sets the state)."""
    order = np.random.default_rng(epoch).permutation(EXAMPLES)
    return tf.data.Dataset.from_tensor_slices((IMAGES[order], LABELS[order])).batch(BATCH, drop_remainder=True)


def make_trainer(directory, seed=1, hidden=32, optimizer="adam", callbacks=(), **kwargs):
    """Dropout (a generator), Adam slots and a per-epoch decaying learning rate: all must resume."""
    tf.random.set_seed(seed)
    model = Sequential([Flatten(), Dense(hidden, activation="relu"), Dropout(0.25), Dense(4)])
    schedule = ExponentialDecay(0.01, 0.6, STEPS, staircase=True)
    opt = Adam(schedule) if optimizer == "adam" else SGD(schedule, momentum=0.9)
    kwargs.setdefault("log_every", 3)
    kwargs.setdefault("checkpoint_every", 5)
    return Trainer(Runner(model, opt), callbacks=callbacks, checkpoint_dir=str(directory), progress=False,
                   **kwargs)


def stored(path):
    """Everything a checkpoint holds, as numpy values; history without wall-clock seconds."""
    reader = tf.train.load_checkpoint(path)
    values = {}
    for key in reader.get_variable_to_shape_map():
        if key.startswith(("save_counter", "_CHECKPOINTABLE_OBJECT_GRAPH")):
            continue
        values[key] = reader.get_tensor(key)
    history = json.loads(values.pop("history/.ATTRIBUTES/VARIABLE_VALUE").decode())
    for epoch in history["epochs"]:
        epoch.pop("seconds")
    return values, history


def assert_same_state(path, reference_path):
    (values, history), (expected, expected_history) = stored(path), stored(reference_path)
    assert sorted(values) == sorted(expected)
    different = [key for key in values if not np.array_equal(values[key], expected[key])]
    assert not different, f"differs from the uninterrupted run: {different}"
    assert history == expected_history


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted 3-epoch run: {epochs completed: checkpoint path at that epoch's end}."""
    directory = tmp_path_factory.mktemp("straight")

    class AtEpochEnd(Callback):
        paths = {}

        def on_epoch_end(self, epoch, step, logs):
            self.paths[epoch] = trainer.checkpointer.latest

    trainer = make_trainer(directory, callbacks=[AtEpochEnd()], keep_checkpoints=10)
    history = trainer.fit(train_data, epochs=3, validation_data=VALIDATION)
    assert history.epochs[-1]["loss"] < history.epochs[0]["loss"]
    return AtEpochEnd.paths


def test_checkpoint_holds_the_whole_run_state(straight):
    keys = set(tf.train.load_checkpoint(straight[1]).get_variable_to_shape_map())
    names = {key.replace("/.ATTRIBUTES/VARIABLE_VALUE", "") for key in keys}
    assert {"model/layers/1/w", "model/layers/1/b", "model/layers/3/w", "model/layers/3/b",
            "model/layers/2/generator/_state_var",              # dropout's random generator
            "optimizer/step", "optimizer/m/0", "optimizer/v/3",  # Adam's counter and slots
            "epoch", "step_in_epoch", "learning_rate", "history",
            "metrics/train_loss/total", "metrics/train_accuracy/correct",
            "metrics/window_loss/count", "metrics/window_accuracy/count"} <= names
    reader = tf.train.load_checkpoint(straight[1])
    assert reader.get_tensor("epoch/.ATTRIBUTES/VARIABLE_VALUE") == 1
    assert reader.get_tensor("step_in_epoch/.ATTRIBUTES/VARIABLE_VALUE") == 0
    assert reader.get_tensor("optimizer/step/.ATTRIBUTES/VARIABLE_VALUE") == STEPS


def test_resume_after_a_clean_stop_equals_the_straight_run(straight, tmp_path):
    first = make_trainer(tmp_path)
    first.fit(train_data, epochs=1, validation_data=VALIDATION)
    assert_same_state(first.checkpointer.latest, straight[1])

    # A new process would build everything again: a differently seeded model proves the restore.
    log_steps = []

    class Steps(Callback):
        def on_log(self, step, logs):
            log_steps.append(step)

    second = make_trainer(tmp_path, seed=99, callbacks=[Steps()])
    history = second.fit(train_data, epochs=3, validation_data=VALIDATION)
    assert second.restored_from.endswith("ckpt-2")  # ckpt-1 at step 5, ckpt-2 at the end of epoch 1
    assert log_steps[0] == 9  # the step axis continues: 8 steps were done, the next log point is 9
    assert [entry["epoch"] for entry in history.epochs] == [1, 2, 3]
    assert second.runner.learning_rate.numpy() == pytest.approx(0.01 * 0.6 ** 2)
    assert_same_state(second.checkpointer.latest, straight[3])


@pytest.mark.parametrize("crash", [False, True], ids=["stop", "crash"])
def test_resume_in_the_middle_of_an_epoch_equals_the_straight_run(straight, tmp_path, crash):
    # Step 12 is the 4th batch of epoch 2; checkpoints are saved every 5 steps and at epoch ends.
    first = make_trainer(tmp_path, callbacks=[StopAt(12, crash)])
    if crash:
        with pytest.raises(KeyboardInterrupt):
            first.fit(train_data, epochs=3, validation_data=VALIDATION)
    else:
        first.fit(train_data, epochs=3, validation_data=VALIDATION)
    reader = tf.train.load_checkpoint(first.checkpointer.latest)
    stopped_at = 10 if crash else 12  # a crash loses the steps after the last checkpoint (step 10)
    assert reader.get_tensor("optimizer/step/.ATTRIBUTES/VARIABLE_VALUE") == stopped_at
    assert reader.get_tensor("epoch/.ATTRIBUTES/VARIABLE_VALUE") == 1
    assert reader.get_tensor("step_in_epoch/.ATTRIBUTES/VARIABLE_VALUE") == stopped_at - STEPS

    second = make_trainer(tmp_path, seed=99)
    second.fit(train_data, epochs=3, validation_data=VALIDATION)
    assert int(second.optimizer.step.numpy()) == 3 * STEPS  # nothing repeated, nothing skipped
    assert_same_state(second.checkpointer.latest, straight[3])


def test_a_finished_run_resumes_to_nothing(straight, tmp_path):
    first = make_trainer(tmp_path)
    first.fit(train_data, epochs=1)
    latest = first.checkpointer.latest
    again = make_trainer(tmp_path)
    history = again.fit(train_data, epochs=1)
    assert again.restored_from == latest and again.checkpointer.latest == latest  # nothing trained or saved
    assert len(history.epochs) == 1 and int(again.optimizer.step.numpy()) == STEPS


def test_a_relative_checkpoint_directory_resumes_without_warnings(tmp_path, monkeypatch, caplog):
    """TensorFlow prefixes the state file's paths with the directory: joined on again, a relative directory
    ('runs/x/checkpoints', as train.py's default --logdir gives it) named runs/x/checkpoints/runs/x/checkpoints/
    ckpt-1 and warned once per kept checkpoint before falling back to the files on disk."""
    monkeypatch.chdir(tmp_path)
    make_trainer("runs/x/checkpoints", checkpoint_every=None, keep_checkpoints=2).fit(train_data, epochs=2)
    again = make_trainer("runs/x/checkpoints", checkpoint_every=None)
    with caplog.at_level("WARNING"):
        again.fit(train_data, epochs=3)
    assert again.restored_from == "runs/x/checkpoints/ckpt-2" and "unreadable" not in caplog.text
    assert int(again.optimizer.step.numpy()) == 3 * STEPS


def test_keeps_the_last_k_checkpoints(tmp_path):
    trainer = make_trainer(tmp_path, keep_checkpoints=2)
    trainer.fit(train_data, epochs=2)
    # saves: step 5, epoch 1 (8), step 10, step 15, epoch 2 (16) -> ckpt-1..5, the last two kept
    assert [os.path.basename(path) for path in trainer.checkpointer.manager.checkpoints] == ["ckpt-4", "ckpt-5"]
    assert sorted(os.path.basename(path) for path in glob.glob(str(tmp_path / "*.index"))) == \
        ["ckpt-4.index", "ckpt-5.index"]


def test_a_crash_before_the_index_is_written_keeps_the_previous_checkpoint(straight, tmp_path, monkeypatch):
    """The data files of a save are complete before `checkpoint` (the index) is rewritten; kill the
    process right there and the index still names the previous checkpoint."""
    first = make_trainer(tmp_path, checkpoint_every=None)
    first.fit(train_data, epochs=1, validation_data=VALIDATION)

    class Killed(BaseException):
        pass

    def die(*args, **kwargs):
        raise Killed()

    monkeypatch.setattr(checkpoint_management.file_io, "atomic_write_string_to_file", die)
    with pytest.raises(Killed):
        first.fit(train_data, epochs=2, validation_data=VALIDATION)
    monkeypatch.undo()
    assert os.path.exists(tmp_path / "ckpt-2.index")  # written, but never committed

    second = make_trainer(tmp_path, seed=99, checkpoint_every=None)
    second.fit(train_data, epochs=3, validation_data=VALIDATION)
    assert second.restored_from.endswith("ckpt-1")
    assert_same_state(second.checkpointer.latest, straight[3])


def _truncate_data(path):
    data = glob.glob(path + ".data-*")[0]
    with open(data, "r+b") as handle:
        handle.truncate(os.path.getsize(data) // 2)


def _delete_index(path):
    os.remove(path + ".index")


def _half_written_next(path):
    """What a crash in the middle of writing the next save leaves: its shard directory only."""
    number = int(path.rsplit("-", 1)[1]) + 1
    shards = f"{path.rsplit('-', 1)[0]}-{number}_temp"
    os.makedirs(shards)
    with open(os.path.join(shards, "part-00000-of-00001.data-00000-of-00001"), "wb") as handle:
        handle.write(b"\x00" * 100)


@pytest.mark.parametrize("damage, resumes_at_epoch", [
    (_truncate_data, 1), (_delete_index, 1), (_half_written_next, 2)],
    ids=["truncated-data", "missing-index", "half-written-next"])
def test_a_damaged_newest_checkpoint_falls_back(straight, tmp_path, damage, resumes_at_epoch, caplog):
    first = make_trainer(tmp_path, checkpoint_every=None)
    first.fit(train_data, epochs=2, validation_data=VALIDATION)
    newest = first.checkpointer.latest
    damage(newest)

    second = make_trainer(tmp_path, seed=99, checkpoint_every=None)
    second.fit(train_data, epochs=3, validation_data=VALIDATION)
    expected = f"ckpt-{resumes_at_epoch}"
    assert second.restored_from.endswith(expected)
    if resumes_at_epoch == 1:
        assert f"checkpoint {newest} is unreadable" in caplog.text
    assert_same_state(second.checkpointer.latest, straight[3])


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    first = make_trainer(tmp_path, checkpoint_every=None, keep_checkpoints=1)
    first.fit(train_data, epochs=1)
    _truncate_data(first.checkpointer.latest)
    with pytest.raises(CheckpointUnreadableError, match=r"no readable checkpoint in .*ckpt-1 \(IndexError"):
        make_trainer(tmp_path, checkpoint_every=None).fit(train_data, epochs=2)


@pytest.mark.parametrize("other, message", [
    (dict(hidden=16), "model/layers/1/b is [32] float32 in the checkpoint but [16] float32 here (and "),
    (dict(optimizer="sgd"), "unknown variable(s) in the checkpoint, e.g. optimizer/m/0"),
], ids=["wider-layer", "other-optimizer"])
def test_a_different_models_checkpoint_is_a_clear_error(tmp_path, other, message):
    make_trainer(tmp_path).fit(train_data, epochs=1)
    trainer = make_trainer(tmp_path, **other)
    trainer.build((None, 8, 8, 1))
    before = [v.numpy() for v in trainer.model.variables]
    with pytest.raises(CheckpointMismatchError) as caught:
        trainer.fit(train_data, epochs=2)
    text = str(caught.value)
    assert isinstance(caught.value, ValueError) and "\n" not in text
    assert text.startswith(f"checkpoint {tmp_path}/ckpt-2 does not match this model/optimizer: ")
    assert message in text
    assert all(np.array_equal(a, b.numpy()) for a, b in zip(before, trainer.model.variables))  # nothing restored


def test_a_deeper_model_is_told_what_is_missing(tmp_path):
    make_trainer(tmp_path).fit(train_data, epochs=1)
    tf.random.set_seed(1)
    deeper = Sequential([Flatten(), Dense(32, activation="relu"), Dropout(0.25), Dense(4), Dense(4)])
    trainer = Trainer(Runner(deeper, Adam(0.01)), checkpoint_dir=str(tmp_path), progress=False)
    with pytest.raises(ValueError, match=r"variable\(s\) missing from the checkpoint, e\.g\. model/layers/4/b"):
        trainer.fit(train_data, epochs=2)


def _state_garbage(directory):
    with open(directory / "checkpoint", "a") as handle:
        handle.write("zzz this is not a CheckpointState\n")


def _state_binary(directory):
    (directory / "checkpoint").write_bytes(b"\x00\xff\xfe\x01binary")


def _state_empty(directory):
    (directory / "checkpoint").write_bytes(b"")


def _state_missing(directory):
    os.remove(directory / "checkpoint")


@pytest.mark.parametrize("damage", [_state_garbage, _state_binary, _state_empty, _state_missing],
                         ids=["garbage", "binary", "empty", "missing"])
def test_an_unreadable_state_file_is_rebuilt_from_the_checkpoint_files(straight, tmp_path, damage, caplog):
    """TensorFlow ignores such a `checkpoint` file (or raises), and the run would start over on top of its own
    checkpoints. The newest ckpt-<n>.index on disk is found instead and the run continues exactly."""
    first = make_trainer(tmp_path, checkpoint_every=None)
    first.fit(train_data, epochs=2, validation_data=VALIDATION)
    damage(tmp_path)
    assert holds_checkpoints(tmp_path)
    assert on_disk(str(tmp_path)) == [str(tmp_path / "ckpt-2"), str(tmp_path / "ckpt-1")]

    second = make_trainer(tmp_path, seed=99, checkpoint_every=None, keep_checkpoints=2)
    second.fit(train_data, epochs=3, validation_data=VALIDATION)
    assert second.restored_from == str(tmp_path / "ckpt-2")
    assert_same_state(second.checkpointer.latest, straight[3])
    if damage is not _state_missing:
        assert (tmp_path / "checkpoint.damaged").exists()
        assert "unreadable (kept as checkpoint.damaged); rebuilt from 2 checkpoint file(s), newest ckpt-2" in caplog.text
    # The rebuilt state keeps the usual bookkeeping: only the last 2 checkpoints stay.
    assert sorted(p.name for p in tmp_path.glob("*.index")) == ["ckpt-2.index", "ckpt-3.index"]
    assert tf.train.get_checkpoint_state(str(tmp_path)).model_checkpoint_path.endswith("ckpt-3")


def test_checkpoints_the_state_file_does_not_name_are_a_last_resort(straight, tmp_path):
    """The state file names only a deleted checkpoint: the other ckpt-<n> files on disk are tried next."""
    first = make_trainer(tmp_path, checkpoint_every=None, keep_checkpoints=5)
    first.fit(train_data, epochs=2, validation_data=VALIDATION)
    _delete_index(str(tmp_path / "ckpt-2"))
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "ckpt-2"\nall_model_checkpoint_paths: "ckpt-2"\n')
    second = make_trainer(tmp_path, seed=99, checkpoint_every=None)
    second.fit(train_data, epochs=3, validation_data=VALIDATION)
    assert second.restored_from == str(tmp_path / "ckpt-1")
    assert_same_state(second.checkpointer.latest, straight[3])


def test_shard_directories_of_a_killed_save_are_removed_on_the_next_start(tmp_path):
    first = make_trainer(tmp_path, checkpoint_every=None)
    first.fit(train_data, epochs=1)
    _half_written_next(first.checkpointer.latest)
    (tmp_path / "notes_temp").mkdir()  # not a checkpoint's: left alone
    assert (tmp_path / "ckpt-2_temp").is_dir()
    make_trainer(tmp_path, checkpoint_every=None).fit(train_data, epochs=1)
    assert not (tmp_path / "ckpt-2_temp").exists() and (tmp_path / "notes_temp").is_dir()


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
                                   tf.errors.ResourceExhaustedError(None, None, "No space left on device")],
                         ids=["OSError", "tf.errors"])
def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(straight, tmp_path, monkeypatch,
                                                                                 error):
    first = make_trainer(tmp_path, checkpoint_every=None)
    first.fit(train_data, epochs=1, validation_data=VALIDATION)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}

    def full_disk(prefix, *args, **kwargs):
        os.makedirs(f"{prefix}_temp")  # what a save that dies half way leaves
        raise error

    monkeypatch.setattr(first.checkpointer.checkpoint, "_write", full_disk)  # what CheckpointManager.save calls
    with pytest.raises(CheckpointWriteError) as caught:
        first.fit(train_data, epochs=2, validation_data=VALIDATION)
    assert str(caught.value) == (f"cannot save a checkpoint in {tmp_path} (No space left on device); "
                                 f"the previous checkpoint {tmp_path}/ckpt-1 is kept")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    assert not list(tmp_path.glob("*_temp"))
    monkeypatch.undo()
    second = make_trainer(tmp_path, seed=99, checkpoint_every=None)
    second.fit(train_data, epochs=3, validation_data=VALIDATION)
    assert second.restored_from == str(tmp_path / "ckpt-1")
    assert_same_state(second.checkpointer.latest, straight[3])


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_at_the_current_step_with_a_checkpoint_and_resumes_exactly(straight, tmp_path, signum):
    class SignalAt(Callback):
        def on_log(self, step, logs):
            if step == 12:
                os.kill(os.getpid(), signum)

    with StopOnSignal() as stop:
        first = make_trainer(tmp_path, callbacks=[SignalAt(), stop])
        first.fit(train_data, epochs=3, validation_data=VALIDATION)
    assert (stop.signum, stop.exit_code) == (signum, 128 + signum)
    reader = tf.train.load_checkpoint(first.checkpointer.latest)
    assert reader.get_tensor("optimizer/step/.ATTRIBUTES/VARIABLE_VALUE") == 12  # not the last save (step 10)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored

    second = make_trainer(tmp_path, seed=99)
    second.fit(train_data, epochs=3, validation_data=VALIDATION)
    assert_same_state(second.checkpointer.latest, straight[3])


def test_a_second_signal_interrupts_at_once(tmp_path):
    class TwoSignals(Callback):
        def on_log(self, step, logs):
            if step == 3:
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Interrupt) as caught:
        with StopOnSignal() as stop:
            make_trainer(tmp_path, callbacks=[TwoSignals(), stop]).fit(train_data, epochs=1)
    assert (caught.value.name, caught.value.exit_code) == ("SIGTERM", 143)
    assert not on_disk(str(tmp_path))  # stopped before the first save (step 5)
