"""train.py end to end, as a user runs it: its console, exit codes and run directory on real MNIST. The command
runs in this process (cli()); a subprocess only where the process is what is checked: TensorFlow's start-up
noise, an answer given before TensorFlow loads, SIGKILL."""
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

from keras_twins import KERAS_TWINS, keras_counts
from train_in_process import train_command
from models import REGISTRY

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "train.py")


def train(*args, cwd=None):
    """Runs train.py with `args`; returns the CompletedProcess (text stdout/stderr)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, TRAIN, *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300)


cli = train_command


def assert_one_error_line(result, code, pattern):
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train.py: error: "), result.stderr
    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in result.stdout + result.stderr


@pytest.fixture(scope="module")
def softmax_run(mnist_dir, tmp_path_factory):
    """One short softmax run: 1 epoch of 30 steps, logged every 10 steps."""
    logdir = tmp_path_factory.mktemp("runs")
    result = train("--model=softmax", "--epochs=1", "--steps_per_epoch=30", "--log_every=10",
                   f"--data_dir={mnist_dir}", f"--logdir={logdir}", "--run_name=quick",
                   f"--export_dir={logdir / 'exported'}")
    return result, logdir / "quick"


def test_cli_trains_and_prints_the_closing_lines(softmax_run):
    result, run_dir = softmax_run
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert re.search(r"^epoch 1/1  step 30  loss \d\.\d{4}  accuracy [\d.]+%  \| test loss [\d.]+  "
                     r"accuracy [\d.]+%", out, re.M), out
    assert re.search(r"^test accuracy: final [\d.]+%, best [\d.]+% \(epoch 1\)", out, re.M), out
    assert re.search(r"^wall time: [\d.]+ s \(30 steps, 1 epoch\)", out, re.M), out
    for what in ("logs:", "pictures:", "checkpoints:", "saved model:", "metrics:"):
        assert re.search(rf"^{what} ", out, re.M), out
    assert str(run_dir) in out
    assert "Traceback" not in result.stderr and "I0000" not in result.stderr and "oneDNN" not in result.stderr


def test_cli_writes_metrics_config_checkpoint_and_saved_models(softmax_run):
    result, run_dir = softmax_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["model"] == "softmax" and metrics["steps"] == 30 and metrics["epochs"] == 1
    assert 0.1 < metrics["test_accuracy"] <= 1.0
    assert metrics["best_val_accuracy"] == pytest.approx(metrics["test_accuracy"])  # validation = test set
    assert metrics["params"] == {"total": 7850, "trainable": 7850, "non_trainable": 0}
    assert f"{100 * metrics['test_accuracy']:.2f}%" in result.stdout
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"] == "softmax" and config["optimizer"] == "sgd" and config["batch_size"] == 100
    assert (run_dir / "checkpoints" / "checkpoint").exists()
    assert glob.glob(str(run_dir / "checkpoints" / "ckpt-*.index"))
    for saved_model in (run_dir / "saved_model", run_dir.parent / "exported"):
        assert (saved_model / "saved_model.pb").exists(), saved_model
    assert [os.path.abspath(p) for p in metrics["saved_model"]] == [
        str((run_dir / "saved_model").resolve()), str((run_dir.parent / "exported").resolve())]


def test_cli_leaves_pictures(softmax_run):
    _, run_dir = softmax_run
    pictures = sorted(p.name for p in run_dir.glob("*.png"))
    assert pictures, "no PNG in the run directory"
    assert json.loads((run_dir / "metrics.json").read_text())["pictures"] == pictures
    for name in pictures:
        assert (run_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _events(run_dir):
    """{(subdirectory, plugin): {tag: [(step, value)]}} from every event file under run_dir; plugin 'graph'
    holds the graph, and scalar values are read back as floats."""
    found = {}
    files = glob.glob(str(run_dir / "**" / "events.out.tfevents.*"), recursive=True)
    assert files, f"no event files under {run_dir}"
    for path in files:
        subdir = os.path.relpath(os.path.dirname(path), run_dir)
        for record in tf.data.TFRecordDataset(path):
            event = tf.compat.v1.Event.FromString(record.numpy())
            if event.graph_def:
                found.setdefault((subdir, "graph"), {}).setdefault("graph", []).append((event.step, None))
            for value in event.summary.value:
                plugin = value.metadata.plugin_data.plugin_name or "other"
                number = float(tf.make_ndarray(value.tensor)) if plugin == "scalars" else None
                found.setdefault((subdir, plugin), {}).setdefault(value.tag, []).append((event.step, number))
    return found


def test_cli_writes_tensorboard_scalars_histograms_images(softmax_run):
    _, run_dir = softmax_run
    events = _events(run_dir)
    train_scalars = events[("train", "scalars")]
    assert [step for step, _ in train_scalars["loss"]] == [10, 20, 30]
    assert [value for _, value in train_scalars["learning_rate"]] == pytest.approx([0.01] * 3)
    assert all(0 <= value <= 1 for _, value in train_scalars["accuracy"])
    validation = events[("validation", "scalars")]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert validation["accuracy"] == [(30, pytest.approx(metrics["best_val_accuracy"]))]
    histograms = events[(".", "histograms")]
    assert {"logits/w", "logits/b", "activations/logits"} <= set(histograms), sorted(histograms)
    assert {"predictions", "font_digits"} <= set(events[(".", "images")]), events.keys()
    assert (".", "graph") in events and (".", "hparams") in events, events.keys()


def test_summary_counts_equal_keras(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    result = cli("--model=conv_bn", "--summary", capsys=capsys)
    assert result.returncode == 0, result.stderr
    counts = [int(re.search(rf"^{what} params: ([\d,]+)$", result.stdout, re.M).group(1).replace(",", ""))
              for what in ("Total", "Trainable", "Non-trainable")]
    assert tuple(counts) == keras_counts(KERAS_TWINS["conv_bn"]()) == (354_538, 354_002, 536)
    assert "y = conv2d(x[N,28,28,1], w[3,3,1,12], stride 1, same)" in result.stdout
    assert "Training: adam lr = 0.01 * 0.666^epoch, batch 64, 10 epochs" in result.stdout
    assert not list(tmp_path.iterdir()), "--summary must not write anything"


@pytest.mark.parametrize("name", list(REGISTRY))  # a model without a Keras twin fails here
def test_summary_of_every_model_equals_keras(name, capsys):
    import train as train_module
    train_module.print_summary(train_module.make_config({"model": name}, REGISTRY), REGISTRY)
    out = capsys.readouterr().out
    total = int(re.search(r"^Total params: ([\d,]+)$", out, re.M).group(1).replace(",", ""))
    non_trainable = int(re.search(r"^Non-trainable params: ([\d,]+)$", out, re.M).group(1).replace(",", ""))
    expected = keras_counts(KERAS_TWINS[name]())
    assert (total, non_trainable) == (expected[0], expected[2])


@pytest.mark.parametrize("name", list(REGISTRY))
def test_summary_by_hand_prints_every_layers_backward_formula(name, capsys):
    import train as train_module
    config = train_module.make_config({"model": name, "gradients": "by_hand"}, REGISTRY)
    train_module.print_summary(config, REGISTRY)
    out = capsys.readouterr().out
    assert "dz[N,10] = (softmax(z) - onehot(labels)) / N" in out
    model = REGISTRY[name].build(config.dropout)
    assert out.count("      forward:  y = ") == out.count("      backward: ") == len(model.layers)
    assert "backward: dw[" in out and "gradients by hand" in out


def test_list_models(capsys):
    result = cli("--list_models", capsys=capsys)
    assert result.returncode == 0, result.stderr
    names = re.findall(r"^(\w+)$", result.stdout, re.M)
    assert names == list(REGISTRY)
    assert "lr = 0.0001 + 0.02 * 0.3679^(step/1600), batch 100" in result.stdout
    assert result.stdout.count("target:") == len(names)


BAD_FLAGS = [
    (["--model=nope"], r"unknown model 'nope'; choose one of: softmax, .*conv_small"),
    (["--epochs=0"], r"--epochs must be a positive integer, got 0"),
    (["--epochs=1000000001"], r"--epochs must be at most 1,000,000,000, got 1000000001"),
    (["--batch_size=-5"], r"--batch_size must be a positive integer, got -5"),
    (["--steps_per_epoch=0"], r"--steps_per_epoch must be a positive integer, got 0"),
    (["--learning_rate=0"], r"--learning_rate must be > 0, got 0"),
    (["--learning_rate=-0.1"], r"--learning_rate must be > 0, got -0.1"),
    (["--dropout=1"], r"--dropout must be in \[0, 1\), got 1"),
    (["--dropout=-0.2"], r"--dropout must be in \[0, 1\), got -0.2"),
    (["--lr_decay=1.5"], r"--lr_decay must be in \(0, 1\]"),
    (["--lr_decay_steps=soon"], r"--lr_decay_steps must be 'epoch' or a positive number of steps"),
    (["--lr_decay_steps=9223372036854775808"], r"--lr_decay_steps must be 'epoch' or a positive number of steps "
                                               r"below 2\*\*63, got '9223372036854775808'"),
    (["--optimizer=rmsprop"], r"--optimizer=rmsprop: value should be one of <adam\|sgd>"),
    (["--learning_rate=inf"], r"--learning_rate must be finite, got inf"),
    (["--lr_min=inf"], r"--lr_min must be finite, got inf"),
    (["--learning_rate=1e39"], r"--learning_rate must be at most 3.4e\+38 \(the largest float32\), got 1e\+39"),
    (["--seed=9223372036854775808"], r"--seed must be in \[0, 2\*\*63\), got 9223372036854775808"),
    (["--steps_per_loop=0"], r"--steps_per_loop must be a positive integer, got 0"),
    (["--join_timeout=inf"], r"--join_timeout must be > 0 and at most 1e\+06 seconds, got inf"),
    (["--collective_timeout=1e300"], r"--collective_timeout must be > 0 and at most 1e\+06 seconds, got 1e\+300"),
    (["--collective_timeout=nan"], r"--collective_timeout must be > 0 and at most 1e\+06 seconds, got nan"),
    (["--jit_compile", "--strategy=mirrored"],
     r"--jit_compile compiles the step of one replica; drop it or --strategy=mirrored"),
    (["--gradients=by_hand", "--precision=mixed_bfloat16"],
     r"--gradients=by_hand works in float32 only, not with --precision=mixed_bfloat16"),
    (["--precision=float64"], r"--precision=float64: value should be one of <float32\|mixed_bfloat16\|mixed_float16>"),
    (["--run_name=a/b"], r"--run_name must be a plain directory name, got 'a/b'"),
    (["--epochs=ten"], r"--epochs=ten: invalid literal for int"),
    (["--no_such_flag=1"], r"Unknown command line flag 'no_such_flag'"),
    (["conv"], r"unexpected arguments: conv"),
]


@pytest.mark.parametrize("args,message", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_flag_gives_one_line_and_exit_code_2(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    result = cli(*args, f"--logdir={tmp_path / 'runs'}", capsys=capsys)
    assert_one_error_line(result, 2, message)
    assert result.stdout == ""
    assert not (tmp_path / "runs").exists(), "nothing may be written before the flags are checked"


def test_a_bad_choice_is_refused_before_tensorflow_loads(tmp_path):
    """The registries of names import no TensorFlow: --model=nope is one line and exit code 2 from a process that
    never imported it (said on stdout as the process exits)."""
    harness = ("import atexit, runpy, sys\n"
               "atexit.register(lambda: print('tensorflow' in sys.modules))\n"
               f"sys.argv, sys.path[0] = [{TRAIN!r}, '--model=nope'], {str(REPO)!r}\n"
               "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run([sys.executable, "-c", harness], capture_output=True, text=True, cwd=tmp_path, env=env,
                            timeout=60)
    assert_one_error_line(result, 2, r"unknown model 'nope'; choose one of: softmax, .*conv_small")
    assert result.stdout == "False\n", "TensorFlow was imported"


def test_lr_min_without_a_decay_says_it_has_no_effect(capsys):
    result = cli("--model=dense", "--lr_min=0.001", "--summary", capsys=capsys)
    assert result.returncode == 0, result.stderr
    assert "note: --lr_min has no effect: the learning rate of dense is constant" in result.stdout
    with_decay = cli("--model=conv", "--lr_min=0.001", "--summary", capsys=capsys)
    assert with_decay.returncode == 0 and "no effect" not in with_decay.stdout
    assert "lr = 0.001 + 0.01 * 0.6^epoch" in with_decay.stdout


def test_unusable_data_gives_one_line_and_exit_code_1(tmp_path, capsys):
    data_dir = tmp_path / "mnist"
    data_dir.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (data_dir / name).write_bytes(b"not an IDX file")
    result = cli("--model=softmax", f"--data_dir={data_dir}", f"--logdir={tmp_path / 'runs'}", capsys=capsys)
    assert_one_error_line(result, 1, r"train-images-idx3-ubyte")
    assert not (tmp_path / "runs").exists()  # the data is checked before a run directory is claimed


def config_of(**values):
    """A tiny softmax run's RunConfig: 1 epoch of 5 steps, logged once, no progress bar; `values` override."""
    import train as train_module
    return train_module.make_config({"model": "softmax", "epochs": 1, "steps_per_epoch": 5, "log_every": 5,
                                     "progress": False, **values}, REGISTRY)


def test_a_failed_start_creates_nothing(mnist_dir, tmp_path, monkeypatch):
    """A --data_dir that does not exist is one line and is not created (nor downloaded into); a data set's name
    never trains another data set's files; no run directory is left by a start that fails."""
    import datasets
    import train as train_module
    fetched = []

    def offline(url, *args, **kwargs):
        fetched.append(url)
        raise datasets.DownloadError(f"cannot download {url}: offline")

    monkeypatch.setattr(datasets, "fetch", offline)
    monkeypatch.delenv("TF_BY_HAND_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    logdir = tmp_path / "runs"
    with pytest.raises(train_module.RunError) as caught:
        train_module.run(config_of(data_dir=str(tmp_path / "nowhere"), logdir=str(logdir)))
    assert str(caught.value).startswith(f"no MNIST files in {tmp_path}/nowhere (no such directory); to use a local "
                                        f"copy, put the four IDX files")
    assert not (tmp_path / "nowhere").exists() and fetched == []

    wrong = (f"{mnist_dir}/train-images-idx3-ubyte.gz: this is MNIST's, not Fashion-MNIST's (content MD5 "
             f"6bbc9ace898e44ae57da46a324031adb); point --data_dir at Fashion-MNIST's files, or pass --dataset=mnist "
             f"to train on these")
    with pytest.raises(train_module.RunError, match=re.escape(wrong)):
        train_module.run(config_of(dataset="fashion_mnist", data_dir=mnist_dir, logdir=str(logdir)))
    monkeypatch.setenv("TF_BY_HAND_DATA_DIR", mnist_dir)
    with pytest.raises(train_module.RunError, match=re.escape(wrong)):
        train_module.run(config_of(dataset="fashion_mnist", logdir=str(logdir)))
    assert not logdir.exists() and fetched == []

    monkeypatch.delenv("TF_BY_HAND_DATA_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # offline, nothing in the download cache
    with pytest.raises(train_module.RunError, match=r"^cannot download https://storage.googleapis.com/\S+: offline; "):
        train_module.run(config_of(logdir=str(logdir)))
    assert not logdir.exists() and len(fetched) == 1

    (tmp_path / "mine").mkdir()  # refused once the run directory is claimed: the new directory goes again
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(train_module.FlagError, match="--export_dir: cannot export to"):
        train_module.run(config_of(data_dir=mnist_dir, logdir=str(logdir), export_dir=str(tmp_path / "mine")))
    assert list(logdir.iterdir()) == []


def test_a_relative_logdir_resumes_quietly_and_the_lines_say_what_runs(mnist_dir, tmp_path, monkeypatch, caplog):
    """The default --logdir is relative (runs): resuming from it warns about nothing. The start line says that
    mixed precision is on; a run shorter than the model's codelab run gives its target as the full run's."""
    import train as train_module
    monkeypatch.chdir(tmp_path)
    lines = []
    train_module.run(config_of(data_dir=mnist_dir, run_name="x", precision="mixed_bfloat16"), out=lines.append)
    with caplog.at_level("WARNING"):
        metrics = train_module.run(config_of(data_dir=mnist_dir, run_name="x", precision="mixed_bfloat16",
                                             epochs=2), out=lines.append)
    assert metrics["resumed"] and metrics["steps"] == 10 and metrics["run_dir"] == "runs/x"
    assert "unreadable" not in caplog.text and "trying an older one" not in caplog.text
    assert lines[1] == ("  7,850 parameters (0 non-trainable); sgd lr = 0.01 (constant), batch 100, 1 epoch, "
                        "5 steps per epoch, no dropout, mixed precision (mixed_bfloat16)")
    closing = [line for line in lines if line.startswith("test accuracy:")]
    assert len(closing) == 2
    assert all(line.endswith("   (target of the full 100-epoch run: >= 92% test accuracy)") for line in closing)


def test_the_target_is_given_plainly_for_a_run_as_long_as_the_codelabs():
    from app.console import report
    from app.run import codelab_run
    from app.settings import make_config
    full = codelab_run(config_of(epochs=100, steps_per_epoch=None), REGISTRY["softmax"], 60_000, 600)
    assert full == {"epochs": 100, "reached": True}
    assert codelab_run(config_of(epochs=99, steps_per_epoch=None), REGISTRY["softmax"], 60_000, 600) \
        == {"epochs": 100, "reached": False}
    big = make_config({"model": "conv_bn_big"}, REGISTRY)  # 20 epochs of 500 steps
    assert codelab_run(big, REGISTRY["conv_bn_big"], 60_000, 500) == {"epochs": 20, "reached": True}
    metrics = {"run_dir": "runs/x", "best_val_accuracy": 0.93, "best_epoch": 100, "test_accuracy": 0.925,
               "target": ">= 92% test accuracy", "stopped": None, "wall_seconds": 60.0, "steps": 60_000,
               "epochs": 100, "pictures": [], "saved_model": ["runs/x/saved_model"]}
    lines = []
    report(metrics, config_of(epochs=100, steps_per_epoch=None), lines.append, full_run=full)
    assert lines[0] == "test accuracy: final 92.50%, best 93.00% (epoch 100)   (target: >= 92% test accuracy)"


def test_mirrored_on_one_cpu_device_says_how_to_split_it():
    import types

    from app.console import one_cpu_hint
    from core import distribute
    one = tf.distribute.MirroredStrategy(["/cpu:0"])
    assert distribute.describe(one) == "mirrored: 1 replica on CPU:0"
    config = config_of(strategy="mirrored")
    assert one_cpu_hint(config, one) == \
        "; no GPU found: --cpu_devices=2 splits the CPU into 2 devices to try data parallelism"
    assert one_cpu_hint(config, types.SimpleNamespace(num_replicas_in_sync=2)) == ""
    assert one_cpu_hint(config_of(), one) == ""


def test_non_finite_loss_gives_one_line_and_exit_code_1(mnist_dir, tmp_path, capsys):
    result = cli("--model=softmax", "--learning_rate=1e38", "--epochs=1", "--steps_per_epoch=20",
                   "--log_every=5", "--noprogress", f"--data_dir={mnist_dir}", f"--logdir={tmp_path}",
               "--run_name=nan", capsys=capsys)
    assert_one_error_line(result, 1, r"non-finite .* at step \d+ \(learning rate 1e\+38\).*--learning_rate")
    assert not (tmp_path / "nan" / "metrics.json").exists()


def test_jit_compile_trains_exports_and_keeps_the_nan_guard(mnist_dir, tmp_path, capsys):
    common = ["--model=dense", "--epochs=1", "--steps_per_epoch=20", "--log_every=5", "--noprogress",
              "--jit_compile", f"--data_dir={mnist_dir}", f"--logdir={tmp_path}"]
    result = cli(*common, "--run_name=xla", capsys=capsys)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "xla" / "metrics.json").read_text())
    assert metrics["steps"] == 20 and metrics["test_accuracy"] > 0.8 and metrics["hparams"]["jit_compile"]
    assert (tmp_path / "xla" / "saved_model" / "saved_model.pb").exists()
    failed = cli(*common, "--learning_rate=1e38", "--run_name=nan", capsys=capsys)
    assert_one_error_line(failed, 1, r"non-finite .* at step \d+ \(learning rate 1e\+38\).*--learning_rate")
    floor = cli(*common, "--lr_decay=0.5", "--lr_min=1e38", "--run_name=floor", capsys=capsys)
    assert_one_error_line(floor, 1, r"non-finite .* \(learning rate 1e\+38\).*; try a smaller --lr_min$")


def test_the_test_images_are_evaluated_once_for_the_final_weights(small_mnist, tmp_path, capsys, monkeypatch):
    """With --validation=test the last epoch end has just evaluated the final weights on the test images: the
    final test figures are that evaluation's, not a second run of it. Weights the last epoch end did not
    evaluate (early stopping's restored best epoch) are evaluated again."""
    from app.run import tested_at_the_last_epoch_end
    from core.trainer import History, Trainer

    calls = []
    evaluate = Trainer.evaluate
    monkeypatch.setattr(Trainer, "evaluate", lambda self, dataset: calls.append(1) or evaluate(self, dataset))
    result = cli("--model=softmax", "--epochs=2", "--steps_per_epoch=8", "--batch_size=16", "--noprogress",
                 f"--data_dir={small_mnist}", f"--logdir={tmp_path}", "--run_name=once", capsys=capsys)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "once" / "metrics.json").read_text())
    assert len(calls) == 2 and metrics["test_accuracy"] == metrics["final_val_accuracy"]

    last = {"epoch": 2, "step": 16, "val_loss": 0.5, "val_accuracy": 0.875}
    history = History(epochs=[{**last, "epoch": 1, "step": 8}, last])
    history.stopped = {"reason": "epochs", "epoch": 2}
    assert tested_at_the_last_epoch_end(history, 16) == {"loss": 0.5, "accuracy": 0.875}
    assert tested_at_the_last_epoch_end(history, 17) is None  # updates after the last epoch end
    history.stopped = {"reason": "early_stopping", "epoch": 2, "restored": True}
    assert tested_at_the_last_epoch_end(history, 16) is None
    assert tested_at_the_last_epoch_end(History(), 0) is None


def test_resume_continues_a_run_and_refuses_other_settings(mnist_dir, tmp_path, capsys):
    common = ["--model=softmax", "--steps_per_epoch=20", "--log_every=10", "--noprogress",
              f"--data_dir={mnist_dir}", f"--logdir={tmp_path}", "--run_name=r"]
    first = cli(*common, "--epochs=1", capsys=capsys)
    assert first.returncode == 0, first.stderr
    second = cli(*common, "--epochs=2", capsys=capsys)
    assert second.returncode == 0, second.stderr
    assert "resuming" in second.stdout and "epoch 1/2" not in second.stdout and "epoch 2/2" in second.stdout
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["steps"] == 40 and metrics["epochs"] == 2 and metrics["resumed"]

    # The resume rules are checked before any data is read: test them in-process.
    from app.rundirs import check_resume, claim_run_dir
    from app.settings import FlagError, make_config
    values = {"model": "softmax", "steps_per_epoch": 20, "logdir": str(tmp_path), "run_name": "r", "epochs": 3}
    run_dir = str(tmp_path / "r")
    with pytest.raises(FlagError, match=r"was started with --batch_size=100, not 50"):
        check_resume(make_config({**values, "batch_size": 50}, REGISTRY), run_dir)
    with pytest.raises(FlagError, match=r"was started with --seed=1, not 2"):
        check_resume(make_config({**values, "seed": 2}, REGISTRY), run_dir)
    # Loop length and logging change no numbers: a resume may use others.
    assert check_resume(make_config(
        {**values, "steps_per_loop": 7, "log_every": 3}, REGISTRY), run_dir) is True
    with pytest.raises(FlagError, match=r"already holds a checkpoint; drop --noresume"):
        check_resume(make_config({**values, "resume": False}, REGISTRY), run_dir)
    config = make_config(values, REGISTRY)
    with claim_run_dir(config) as claimed:
        assert claimed.path == run_dir and not claimed.created
        assert check_resume(config, run_dir) is True
    # A run started before a setting existed had that setting's default: it still resumes, and only with it.
    started = json.loads((tmp_path / "r" / "config.json").read_text())
    del started["dataset"]
    (tmp_path / "r" / "config.json").write_text(json.dumps(started))
    assert check_resume(config, run_dir) is True
    with pytest.raises(FlagError, match=r"was started with --dataset=mnist, not fashion_mnist"):
        check_resume(make_config({**values, "dataset": "fashion_mnist"}, REGISTRY), run_dir)


def _final_state(run_dir):
    """{name: array} of the model and optimizer variables in the run's newest checkpoint."""
    reader = tf.train.load_checkpoint(str(run_dir / "checkpoints"))
    return {key: reader.get_tensor(key) for key in reader.get_variable_to_shape_map()
            if key.startswith(("model/", "optimizer/"))}


def _latest_checkpoint_number(run_dir):
    index = run_dir / "checkpoints" / "checkpoint"
    found = re.search(r'^model_checkpoint_path: "ckpt-(\d+)"', index.read_text(), re.M) if index.exists() else None
    return int(found.group(1)) if found else 0


def test_same_seed_is_bit_identical_and_sigkill_resume_loses_nothing(small_mnist, tmp_path, capsys):
    """dense_decay (dropout draws random masks), one command run twice: once straight through, once killed
    with SIGKILL in the middle of its second epoch and then resumed; 10 steps per compiled call (cut to
    5 before each checkpoint at a multiple of 25). Both end with bit-identical weights,
    optimizer slots, dropout generator states and test figures (determinism and exact resume at once).
    Batches of 5 of the first 512 images: 100 steps per epoch, 128 test images to evaluate. Without XLA, whose
    compilation would be most of each run's time (test_jit_compile.py resumes the compiled step bit for bit)."""
    common = ["--model=dense_decay", "--epochs=2", "--steps_per_epoch=100", "--batch_size=5", "--checkpoint_every=25",
              "--log_every=25", "--steps_per_loop=10", "--nojit_compile", "--noprogress", f"--data_dir={small_mnist}",
              f"--logdir={tmp_path}"]
    result = cli(*common, "--run_name=straight", capsys=capsys)
    assert result.returncode == 0, result.stderr

    # Saves: steps 25, 50, 75, end of epoch 1 (ckpt-4), then 125 (ckpt-5), 150, 175, end of epoch 2.
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    victim = subprocess.Popen([sys.executable, TRAIN, *common, "--run_name=killed"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while victim.poll() is None and _latest_checkpoint_number(tmp_path / "killed") < 5:
            time.sleep(0.002)
        victim.kill()
    finally:
        victim.wait()
    assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "killed" / "metrics.json").exists()
    resumed = cli(*common, "--run_name=killed", capsys=capsys)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout and "epoch 1/2" not in resumed.stdout

    straight, killed = _final_state(tmp_path / "straight"), _final_state(tmp_path / "killed")
    assert any("generator" in key for key in straight), sorted(straight)
    assert any(key.startswith("optimizer/") for key in straight), sorted(straight)
    assert killed.keys() == straight.keys()
    for key in straight:
        assert (killed[key] == straight[key]).all(), key
    metrics = [json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("straight", "killed")]
    assert metrics[0]["steps"] == metrics[1]["steps"] == 200
    assert (metrics[0]["test_accuracy"], metrics[0]["test_loss"]) == (metrics[1]["test_accuracy"],
                                                                      metrics[1]["test_loss"])
