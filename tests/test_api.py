"""lab's API without Jupyter: fit on real MNIST with no run directory, LiveCurves' redraws, show_mistakes, and
the one line a learner without data sees."""
import numpy as np
import pytest

import lab
from lab.api import DataNotFound


@pytest.fixture(scope="module")
def data(mnist_dir):
    return lab.mnist(mnist_dir)


class FakeHandle:
    def __init__(self):
        self.shown = []

    def update(self, picture):
        self.shown.append(picture._repr_png_())


def test_fit_returns_the_history_and_livecurves_redraws_one_figure_per_epoch(data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = lab.settings("softmax", epochs=3, steps_per_epoch=20, log_every=10)
    model = lab.build("softmax", config, data)
    handle = FakeHandle()
    displayed = []
    live = lab.LiveCurves(display=lambda picture: displayed.append(picture._repr_png_()) or handle)
    quiet = lab.LiveCurves()   # outside Jupyter: draws nothing
    history = lab.fit(model, data, config, callbacks=[live, quiet])
    assert [e["epoch"] for e in history.epochs] == [1, 2, 3] and history.stopped == {"reason": "epochs", "epoch": 3}
    losses = [e["val_loss"] for e in history.epochs]
    assert losses[0] > losses[1] > losses[2] > 0 and history.epochs[-1]["val_accuracy"] > 0.5, history.epochs
    assert len(displayed) == 1 and len(handle.shown) == 2 and live.redraws == 3 and quiet.redraws == 0
    assert all(png.startswith(b"\x89PNG") for png in displayed + handle.shown)
    assert lab.evaluate(model, data.test)["accuracy"] == history.epochs[-1]["val_accuracy"]
    assert list(tmp_path.iterdir()) == []   # no run directory, nothing written
    picture = lab.show_mistakes(model, data.test, count=30)
    assert picture.size[0] == 10 * (28 * 2 + 2)


def test_fit_with_ema_ends_with_the_averages_its_epochs_were_evaluated_with(data):
    small = data.subset(train=2000, test=500)
    config = lab.settings("softmax", epochs=2, ema=0.9)
    model = lab.build("softmax", config, small)
    history = lab.fit(model, small, config)
    scores = lab.evaluate(model, small.validation)
    assert scores["accuracy"] == history.epochs[-1]["val_accuracy"]
    assert scores["loss"] == pytest.approx(history.epochs[-1]["val_loss"], rel=1e-5)


def test_subset_keeps_the_first_examples_and_validates_on_the_cut_test_set(data):
    small = data.subset(train=1000, test=300)
    assert [len(split) for split in (small.train, small.validation, small.test)] == [1000, 300, 300]
    assert small.validation is small.test and small.image_shape == (28, 28, 1) and small.num_classes == 10
    for cut, full in ((small.train, data.train), (small.test, data.test)):
        np.testing.assert_array_equal(cut.images[-1], full.images[len(cut) - 1])
        assert int(cut.labels[-1]) == int(full.labels[len(cut) - 1])
    assert data.subset() == data and data.subset(test=10**6).test is data.test
    holdout = lab.Data(data.train, data.train, data.test, (28, 28, 1), 10, "").subset(test=100)
    assert holdout.validation is data.train   # a held-out validation split is not the test set: left whole
    with pytest.raises(ValueError, match="at least one example"):
        data.subset(train=0)


def test_no_data_is_one_line_saying_how_to_get_it(tmp_path):
    try:
        lab.mnist(tmp_path / "empty", download=False)
    except DataNotFound as error:
        lines = error._render_traceback_()
        assert len(lines) == 1 and "\n" not in lines[0], lines
        assert lines[0].startswith("DataNotFound: no MNIST files in ") and "TF_BY_HAND_DATA_DIR=DIR" in lines[0]
    else:
        raise AssertionError("no error")


def test_a_learners_mistakes_are_named_in_one_message(data):
    """What a learner types wrong in a notebook is said in the words of the API: the setting misspelled and
    its likely name, the value as typed, and what fit and evaluate take."""
    with pytest.raises(ValueError, match=r"^unknown setting 'epoch'; did you mean 'epochs'\? the settings are: "):
        lab.settings("dense", epoch=3)
    with pytest.raises(ValueError, match=r"^epochs must be a positive integer, got '3'$"):
        lab.settings("dense", epochs="3")
    config = lab.settings("dense", epochs=1, steps_per_epoch=2)
    model = lab.build("dense", config, data)
    with pytest.raises(TypeError, match=r"^data must be a lab.Data, such as lab.mnist\(\), got str$"):
        lab.fit(model, "mnist", config)
    with pytest.raises(TypeError, match=r"^model must be a network, such as lab.build\('dense', config, data\), got "
                                        r"str$"):
        lab.fit("dense", data, config)
    with pytest.raises(TypeError, match=r"^data must be a lab.Data, such as lab.mnist\(\), got str$"):
        lab.build("dense", config, "mnist")
    with pytest.raises(TypeError, match=r"^config must be a TrainingConfig, such as lab.settings\('dense'\), got "
                                        r"NoneType$"):
        lab.fit(model, data, None)
    with pytest.raises(TypeError, match=r"pair \(images \[N, \.\.\.\], labels \[N\]\), got list of 3$"):
        lab.evaluate(model, [1, 2, 3])
    with pytest.raises(ValueError, match=r"^expected images \[N, \.\.\.\] and labels \[N\], got images \[5, 784\] "
                                         r"and labels \[4\]$"):
        lab.evaluate(model, (np.zeros((5, 784)), np.zeros(4)))
    with pytest.raises(ValueError, match=r"^labels must be in \[0, 10\) for this model's 10 classes, got 1 to 99$"):
        lab.evaluate(model, (np.zeros((3, 28, 28, 1)), np.array([1, 2, 99])))
    with pytest.raises(ValueError, match=r"^no examples to predict$"):
        lab.evaluate(model, (np.zeros((0, 28, 28, 1)), np.zeros(0, int)))
    images = data.test.images[:5].numpy().astype(np.float32) / 255
    assert 0 <= lab.evaluate(model, (images, data.test.labels[:5].numpy()))["accuracy"] <= 1  # a pair is taken
