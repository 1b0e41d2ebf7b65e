"""train.py as a careless or hostile user drives it: runs started at once never share a directory, a damaged run
never restarts silently, SIGTERM and Ctrl-C end in one line with the run resumable, and nothing the user owns
is overwritten. Tiny runs on real MNIST; a subprocess where the process is what is checked (runs started at
once, signals), train.py's command in this process otherwise."""
import errno
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tensorflow as tf

from train_in_process import train_command

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "train.py")
TINY = ["--model=softmax", "--epochs=1", "--steps_per_epoch=5", "--log_every=5", "--noprogress"]


def start(*args):
    return subprocess.Popen([sys.executable, TRAIN, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))


def finish(process):
    out, err = process.communicate(timeout=900)
    return process.returncode, out, err


def command(*args, capsys):
    """train.py's command with `args` in this process: (exit code, stdout, stderr)."""
    result = train_command(*args, capsys=capsys)
    return result.returncode, result.stdout, result.stderr


def one_error_line(err, pattern):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train.py: error: "), err
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def one_stop_line(err, pattern):
    """A deliberate stop is one line too, without "error:"."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train.py: stopped by ") and "error" not in lines[0], err
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def event_files(run_dir):
    return sorted(os.path.relpath(p, run_dir) for p in glob.glob(f"{run_dir}/**/events.out.tfevents.*",
                                                                  recursive=True))


def checkpoint_step(prefix):
    return int(tf.train.load_checkpoint(prefix).get_tensor("optimizer/step/.ATTRIBUTES/VARIABLE_VALUE"))


def test_runs_started_at_once_never_share_a_directory(small_mnist, tmp_path):
    """Two seeds with the default run name and two runs on one --run_name, all four started together."""
    common = [*TINY, f"--data_dir={small_mnist}", f"--logdir={tmp_path}"]
    processes = [start(*common, f"--seed={seed}") for seed in (1, 2)]
    processes += [start(*common, "--run_name=same", f"--seed={seed}") for seed in (3, 4)]
    results = [finish(p) for p in processes]

    for code, _, err in results[:2]:
        assert code == 0, err
    runs = sorted(p for p in tmp_path.iterdir() if p.name != "same")
    assert len(runs) == 2 and all(re.fullmatch(r"softmax-\d{8}-\d{6}(-[0-9a-f]{4})?", p.name) for p in runs)
    seeds = []
    for run in runs:
        config = json.loads((run / "config.json").read_text())
        metrics = json.loads((run / "metrics.json").read_text())
        assert config["seed"] == metrics["hparams"]["seed"]
        seeds.append(config["seed"])
        files = event_files(run)
        assert len(files) == len({os.path.dirname(f) for f in files}), files  # one writer per directory
    assert sorted(seeds) == [1, 2]

    (winner, loser) = sorted(range(2), key=lambda k: results[2 + k][0])
    assert [results[2 + winner][0], results[2 + loser][0]] == [0, 2]
    one_error_line(results[2 + loser][2], rf"{tmp_path}/same is in use by train\.py pid "
                                          rf"{processes[2 + winner].pid} on \S+ since [\d\-T:]+; wait for it to end or "
                                          r"choose another run name$")
    assert results[2 + loser][1] == ""
    same = tmp_path / "same"
    seed = 3 + winner
    assert json.loads((same / "config.json").read_text())["seed"] == seed
    assert json.loads((same / "metrics.json").read_text())["hparams"]["seed"] == seed
    files = event_files(same)
    assert len(files) == len({os.path.dirname(f) for f in files}), files


def test_sigterm_saves_at_the_current_step_and_the_run_resumes_there(mnist_dir, tmp_path, capsys):
    args = ["--model=softmax", "--epochs=1", "--steps_per_epoch=1500", "--batch_size=10", "--checkpoint_every=100",
            "--log_every=100", "--noprogress", f"--data_dir={mnist_dir}", f"--logdir={tmp_path}", "--run_name=t"]
    victim = start(*args)
    try:
        while victim.poll() is None and not (tmp_path / "t" / "checkpoints" / "ckpt-1.index").exists():
            time.sleep(0.01)
        victim.send_signal(signal.SIGTERM)
    finally:
        code, _, err = finish(victim)
    assert code == 143, err
    line = one_stop_line(err, r"stopped by SIGTERM at step ([\d,]+); its checkpoint is in (\S+): resume with the "
                              r"same command$")
    step, prefix = re.search(r"step ([\d,]+); its checkpoint is in (\S+):", line).groups()
    step = int(step.replace(",", ""))
    assert 100 <= step < 1500 and checkpoint_step(prefix) == step  # the step it reached (in-process tests show it
    assert tf.train.latest_checkpoint(str(tmp_path / "t" / "checkpoints")) == prefix  # is not the last periodic one)
    assert not (tmp_path / "t" / "metrics.json").exists()

    code, out, err = command(*args, capsys=capsys)  # the same command
    assert code == 0, err
    assert "resuming" in out
    assert json.loads((tmp_path / "t" / "metrics.json").read_text())["steps"] == 1500


def _tensorflow_loaded(pid):
    try:
        return "libtensorflow" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_start_up_is_one_line(mnist_dir, tmp_path, signum):
    victim = start(*TINY, f"--data_dir={mnist_dir}", f"--logdir={tmp_path}", "--run_name=s")
    try:
        while victim.poll() is None and not _tensorflow_loaded(victim.pid):
            time.sleep(0.01)
        victim.send_signal(signum)
    finally:
        code, out, err = finish(victim)
    name = signal.Signals(signum).name
    assert code == 128 + signum, err
    one_stop_line(err, rf"^train\.py: stopped by {name} (during start-up; nothing was written|before the first "
                       rf"checkpoint; nothing to resume in \S+/s)$")
    assert "Traceback" not in out + err and "the last checkpoint" not in err


def test_the_interrupt_message_promises_a_checkpoint_only_when_there_is_one(tmp_path):
    from app.rundirs import interrupted, resume_hint
    from app.settings import make_config
    from core.interrupts import Interrupt

    run_dir = tmp_path / "r"
    (run_dir / "checkpoints").mkdir(parents=True)
    named = resume_hint(make_config({"run_name": "r"}), str(run_dir))
    unnamed = resume_hint(make_config({}), str(run_dir))
    assert (named, unnamed) == ("resume with the same command", "resume with the same command and --run_name=r")
    assert interrupted(str(run_dir), Interrupt(signal.SIGTERM), named) == \
        f"stopped by SIGTERM before the first checkpoint; nothing to resume in {run_dir}"
    assert interrupted(str(run_dir), Interrupt(signal.SIGTERM), named, discarded=True) == \
        "stopped by SIGTERM during start-up; nothing was written"
    (run_dir / "checkpoints" / "ckpt-3.index").write_bytes(b"")
    assert interrupted(str(run_dir), KeyboardInterrupt(), unnamed) == \
        f"stopped by SIGINT; the last checkpoint in {run_dir} is kept: resume with the same command and --run_name=r"


def test_a_damaged_run_is_repaired_or_refused_never_restarted(small_mnist, tmp_path, capsys):
    args = ["--model=softmax", "--steps_per_epoch=20", "--batch_size=25", "--log_every=10", "--noprogress",
            f"--data_dir={small_mnist}", f"--logdir={tmp_path}", "--run_name=d"]

    def train(*more):
        return command(*args, *more, capsys=capsys)

    code, _, err = train("--epochs=1")
    assert code == 0, err
    run = tmp_path / "d"
    with open(run / "checkpoints" / "checkpoint", "a") as f:
        f.write("garbage appended by a careless editor\n")
    (run / "checkpoints" / "ckpt-7_temp").mkdir()  # a killed save's shards
    killed_export = run / ".saved_model.tmp-0badc0de"  # a killed export's staging directory
    killed_export.mkdir()
    (killed_export / ".tf_by_hand_export").write_text("marker")

    code, out, err = train("--epochs=2")
    assert code == 0, err
    assert "resuming" in out and "epoch 1/2" not in out and "epoch 2/2" in out
    assert json.loads((run / "metrics.json").read_text())["steps"] == 40
    assert (run / "checkpoints" / "checkpoint.damaged").exists()
    assert not (run / "checkpoints" / "ckpt-7_temp").exists() and not killed_export.exists()

    (run / "config.json").write_text('{"model": "softmax", "batch_size": 10')
    code, out, err = train("--epochs=3")
    assert code == 2 and out == ""
    one_error_line(err, rf"{run}/config.json is damaged \(.+\); restore it, or choose another run name$")
    (run / "config.json").unlink()
    code, out, err = train("--epochs=3")
    assert code == 2
    one_error_line(err, rf"{run} holds checkpoints but no usable config.json")
    assert json.loads((run / "metrics.json").read_text())["steps"] == 40  # untouched


@pytest.mark.parametrize("case", ["logdir is a file", "foreign run directory", "run name too long",
                                  "foreign export directory"])
def test_what_cannot_work_is_refused_before_training(small_mnist, tmp_path, capsys, case):
    logdir = tmp_path / "runs"
    logdir.mkdir()
    args = [*TINY, f"--data_dir={small_mnist}", f"--logdir={logdir}", "--run_name=r"]
    if case == "logdir is a file":
        logdir.rmdir()
        logdir.write_text("not a directory")
        pattern = rf"{logdir} is a file, not a directory for runs$"
    elif case == "foreign run directory":
        (logdir / "r").mkdir()
        (logdir / "r" / "config.json").write_text('{"mine": 1}')
        pattern = rf"{logdir}/r exists and is not a run directory \(no run.lock\); it is left alone"
    elif case == "run name too long":
        args[-1] = "--run_name=" + "x" * 300
        pattern = r"is 300 bytes; the file system of .* allows 255$"
    else:
        (tmp_path / "mine").mkdir()
        (tmp_path / "mine" / "saved_model.pb").write_bytes(b"the user's own model")
        (tmp_path / "mine" / "notes.txt").write_text("keep")
        args.append(f"--export_dir={tmp_path / 'mine'}")
        pattern = rf"--export_dir: cannot export to {tmp_path}/mine: the directory holds files this program did not"
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    code, out, err = command(*args, capsys=capsys)
    assert code == 2, err
    one_error_line(err, pattern)
    assert "epoch" not in out
    after = sorted(str(p) for p in tmp_path.rglob("*"))
    assert after == before  # a run directory claimed before the export directory was refused is removed


def test_a_full_disk_while_training_is_one_line_and_keeps_the_previous_checkpoint(small_mnist, tmp_path,
                                                                                   monkeypatch):
    import train as train_module
    from models import REGISTRY

    config = train_module.make_config({"model": "softmax", "epochs": 2, "steps_per_epoch": 10, "log_every": 10,
                                       "batch_size": 50, "progress": False, "data_dir": small_mnist,
                                       "logdir": str(tmp_path), "run_name": "full"}, REGISTRY)
    real_write = tf.train.Checkpoint._write
    calls = []

    def write(self, prefix, *args, **kwargs):
        calls.append(prefix)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, prefix, *args, **kwargs)

    monkeypatch.setattr(tf.train.Checkpoint, "_write", write)
    with pytest.raises(train_module.RunError) as caught:
        train_module.run(config, out=lambda line: None)
    checkpoints = tmp_path / "full" / "checkpoints"
    assert str(caught.value) == (f"cannot save a checkpoint in {checkpoints} (No space left on device); the previous "
                                 f"checkpoint {checkpoints}/ckpt-1 is kept")
    assert checkpoint_step(str(checkpoints / "ckpt-1")) == 10
    assert tf.train.get_checkpoint_state(str(checkpoints)).model_checkpoint_path.endswith("ckpt-1")
    monkeypatch.undo()
    metrics = train_module.run(config, out=lambda line: None)  # the lock was released; the run resumes
    assert metrics["resumed"] and metrics["steps"] == 20


def test_a_failed_export_is_one_line_and_the_same_command_exports_without_training_again(small_mnist, tmp_path,
                                                                                        monkeypatch):
    import train as train_module
    from app import export
    from models import REGISTRY

    config = train_module.make_config({"model": "softmax", "epochs": 1, "steps_per_epoch": 10, "log_every": 10,
                                       "batch_size": 50, "progress": False, "data_dir": small_mnist,
                                       "logdir": str(tmp_path), "run_name": "r"}, REGISTRY)

    def failing_export(model, export_dir):
        raise ValueError("as_list() is not defined on an unknown TensorShape.\n  (the trace's details)")

    monkeypatch.setattr(export, "export_saved_model", failing_export)
    with pytest.raises(train_module.RunError) as caught:
        train_module.run(config, out=lambda line: None)
    run_dir = tmp_path / "r"
    assert str(caught.value) == ("export failed (ValueError: as_list() is not defined on an unknown TensorShape.); "
                                 f"the trained weights are in {run_dir / 'checkpoints'}: run the same command with "
                                 "--run_name=r to export without training again")
    assert not (run_dir / "saved_model").exists()
    monkeypatch.undo()
    metrics = train_module.run(config, out=lambda line: None)
    assert metrics["resumed"] and metrics["steps"] == 10
    assert tf.saved_model.load(metrics["saved_model"][0]).signatures["serving_default"] is not None
