"""lab's API without Jupyter: fit on real MNIST with no run directory, LiveCurves' redraws, show_mistakes, and
the one line a learner without data sees."""
import lab
from lab.api import DataNotFound


class FakeHandle:
    def __init__(self):
        self.shown = []

    def update(self, picture):
        self.shown.append(picture._repr_png_())


def test_fit_returns_the_history_and_livecurves_redraws_one_figure_per_epoch(mnist_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = lab.mnist(mnist_dir)
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


def test_no_data_is_one_line_saying_how_to_get_it(tmp_path):
    try:
        lab.mnist(tmp_path / "empty", download=False)
    except DataNotFound as error:
        lines = error._render_traceback_()
        assert len(lines) == 1 and "missing" in lines[0] and "--data_dir" in lines[0] or "DATA_DIR" in lines[0]
    else:
        raise AssertionError("no error")
